#!/usr/bin/env bash
# `make airflow`: the sandbox plus `airflow standalone`, with the connections set up, started
# fresh together. UI on http://127.0.0.1:${AIRFLOW_PORT:-8080} (login is off: this is a sandbox);
# `source .airflow/env.sh` points the airflow CLI at it. The logic and its documentation are in
# sandbox/cosell_sandbox/standalone.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m cosell_sandbox.standalone
