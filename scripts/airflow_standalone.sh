#!/usr/bin/env bash
# `make airflow`: the sandbox plus `airflow standalone`, with the connections set up.
# UI: http://127.0.0.1:8080 (every local user is admin: this is a sandbox).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PATH="$PWD/$BIN:$PATH"  # airflow standalone starts its components as `airflow ...`
mkdir -p "$AIRFLOW_HOME" "$COSELL_SANDBOX_HOME"
log="$COSELL_SANDBOX_HOME/serve.log"
"$BIN/cosell-sandbox" serve --base-port "${COSELL_SANDBOX_PORT:-47400}" --seed-referrals 200 >"$log" 2>&1 &
sandbox_pid=$!
trap 'kill "$sandbox_pid" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 150); do grep -q '^# ready' "$log" && break; sleep 0.2; done
grep -q '^# ready' "$log" || { cat "$log"; echo "sandbox did not start" >&2; exit 1; }
eval "$("$BIN/cosell-sandbox" env)"
grep '^#' "$log" | grep -v ready
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=8080
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True
"$BIN/airflow" db migrate >/dev/null
"$BIN/airflow" standalone
