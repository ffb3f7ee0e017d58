"""Fixtures for the real-browser tests of the Airflow UI (SPEC §9, issue 15).

* ``browser``: Debian's Chromium (``/usr/bin/chromium``; ``make browser`` installs it), driven by
  Playwright. Browsers cannot be downloaded here, so Playwright's own are never used, and the
  flags keep Chromium from reaching for the internet, which this machine refuses.
* ``airflow_ui``: a real Airflow (API server, scheduler, DAG processor, triggerer as processes)
  against the sandbox: the shared one (tests/shared_airflow.py), over HTTPS, with Airflow's
  simple auth manager and a real user, ``ada`` (role ``user``: reads DAGs and triggers runs, not
  an admin), whose password only the tests know.
* ``screens``: screenshots of each step under the test's output folder
  (``tmp_path / "screenshots"``, their paths printed), and one of the page as it was when the
  test failed, so a failure shows what the user saw.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cosell_sandbox.airflow_cluster import AirflowCluster
from tests.shared_airflow import SharedAirflow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
USERNAME = "ada"  # role "user" in the shared Airflow (viewer < user < op < admin): may trigger DAG runs


@dataclass
class AirflowUI:
    af: AirflowCluster
    username: str
    password: str = field(repr=False)

    @property
    def url(self) -> str:
        return self.af.url

    def run_state(self, dag_id: str, run_id: str) -> str:
        """The run's state and note, for failure messages only (never a step of the test)."""
        rows = self.af.query(
            "select r.state, n.content from dag_run r left join dag_run_note n on n.dag_run_id = r.id"
            " where r.dag_id = ? and r.run_id = ?",
            dag_id,
            run_id,
        )
        return f"{dag_id} {run_id}: " + (f"state {rows[0][0]}, note {rows[0][1]!r}" if rows else "no such run")


@dataclass
class Screens:
    """Numbered full-page screenshots of the steps; ``page`` is the page a failure shot takes."""

    folder: Path
    page: object = None
    shots: list[tuple[Path, str]] = field(default_factory=list)

    def snap(self, page, name: str, what: str) -> Path:
        self.page = page
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.shots) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.shots.append((path, what))
        (self.folder / "index.txt").write_text("".join(f"{p.name}: {w}\n" for p, w in self.shots))
        print(f"screenshot {path}: {what}")
        return path


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Debian's Chromium is not installed at {CHROMIUM}: run `make browser`, or as root "
            "`apt-get update && apt-get install -y chromium` (never `playwright install`)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def screens(browser, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Screens]:
    """Needs ``browser``, so the failure shot is taken before the browser closes."""
    shots = Screens(tmp_path / "screenshots")
    yield shots
    page = shots.page
    if request.node.stash.get(_CALL_FAILED, False) and page is not None and not page.is_closed():
        try:
            shots.snap(page, "failure", f"the page when the test failed ({page.url})")
        except Exception as exc:  # the failure itself is what matters; say why there is no shot
            print(f"no failure screenshot: {exc}")
    if shots.shots:
        print(f"screenshots in {shots.folder} (index.txt says what each shows)")


@pytest.fixture
def airflow_ui(shared_airflow: SharedAirflow) -> AirflowUI:
    """The shared real Airflow on the sandbox (as ``make airflow`` runs it: LocalExecutor, SQLite,
    the state DB at its default place under ``$AIRFLOW_HOME``; a sync schedule that never comes
    due, so the trigger form, which unpauses the DAG, starts only the run it triggers), reset for
    this test, behind the simple auth manager; the user ``ada``."""
    return AirflowUI(shared_airflow.af, USERNAME, shared_airflow.passwords[USERNAME])
