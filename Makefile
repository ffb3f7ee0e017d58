# cosell-sync: every target creates .venv from the lock file on first use.
SHELL := /bin/bash
PY := $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
TOOLS := .tools
VENV := .venv
UV := $(TOOLS)/bin/uv
BIN := $(VENV)/bin

export UV_PYTHON_DOWNLOADS := never
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export COSELL_SANDBOX_HOME ?= $(CURDIR)/.sandbox

.PHONY: venv browser test test-fast lint demo tour connect-tour airflow bench clean

$(UV):
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PY)
	touch $@

venv: $(VENV)/.synced

# The real-browser UI test (tests/ui) drives Debian's Chromium through Playwright. Browsers cannot be
# downloaded at install time here, so Playwright's own are never used (no `playwright install`):
# where /usr/bin/chromium is missing, this installs Debian's package, and says so.
CHROMIUM := /usr/bin/chromium

browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		echo "installing Debian's chromium for the browser tests"; \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else sudo=none; fi; \
		if [ "$$sudo" = none ] || ! command -v apt-get >/dev/null \
			|| ! { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium; } \
			|| [ ! -x $(CHROMIUM) ]; then \
			echo "could not install chromium: the browser tests need Debian's chromium at $(CHROMIUM)." >&2; \
			echo "Install it as root: apt-get update && apt-get install -y chromium (never 'playwright install')." >&2; \
			exit 1; \
		fi; \
	fi

lint: venv
	$(BIN)/ruff check .

# Three xdist workers on this 2-core machine. The tests that start real Airflow components
# (scheduler, Celery workers, API server, `airflow standalone`, the browser's Airflow) run in two
# lanes, xdist groups "airflow-cluster-a" and "airflow-cluster-b": a lane's tests run one after
# another on one worker, so at most two clusters run at once. The tests that only need "an
# Airflow with our DAGs and plugin" (the Co-sell page, webhooks end to end, the browser) share
# one cluster in lane a, started once and reset between them (tests/shared_airflow.py); the
# topologies of their own (a backfill's in lane a; Celery, `make airflow` and a per-minute
# schedule's in lane b) start theirs. --dist loadgroup hands out the groups first, so both lanes
# start at once. A lane's worker spends much of its time waiting on its cluster (a scheduler's
# loop, a minute's schedule), so the third worker runs the rest of the suite from the start and
# the lanes' workers join it as they free up: both cores stay busy. The 25 slowest tests are listed.
test: venv lint browser
	$(BIN)/python -m pytest -n 3 --dist loadgroup --durations=25

# The fast tier: pure logic and the emulators, no Airflow components, under two minutes.
test-fast: venv lint
	$(BIN)/python -m pytest -n 2 tests/unit tests/sandbox

demo: venv
	$(BIN)/python scripts/demo.py

tour: venv
	$(BIN)/python scripts/hook_tour.py

# The README's "Connect your tenant" path against the sandbox: sign-in, setup, check, preview, first run.
connect-tour: venv
	$(BIN)/python scripts/connect_tour.py

airflow: venv
	bash scripts/airflow_standalone.sh

bench: venv
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(TOOLS) .airflow .sandbox .pytest_cache .ruff_cache
