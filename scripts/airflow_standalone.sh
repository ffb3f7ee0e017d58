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
setsid "$BIN/airflow" standalone &  # its own process group: stopping it stops every component
airflow_pid=$!
trap 'kill -- -"$airflow_pid" 2>/dev/null || true; kill "$sandbox_pid" 2>/dev/null || true' EXIT INT TERM
# Register the receiver (the plugin route on the API server) as the sandbox's webhook, so a
# Microsoft-side edit (POST /_sandbox/referrals/<id>/microsoft-edit) triggers cosell_referral_events.
for _ in $(seq 300); do curl -fsS http://127.0.0.1:8080/api/v2/monitor/health >/dev/null 2>&1 && break; sleep 1; done
"$BIN/python" - <<'PY'
from cosell_sync.hooks.partner_center import REFERRAL_EVENTS, PartnerCenterHook

url = "http://127.0.0.1:8080/cosell/webhooks/partner-center"  # the sandbox's loopback; production needs https
hook = PartnerCenterHook()
if hook.get_webhook_registration() is None:
    hook.create_webhook_registration(url, REFERRAL_EVENTS)
else:
    hook.update_webhook_registration(url, REFERRAL_EVENTS)
print(f"# webhook registered: {url} (unpause cosell_referral_events to sync on events)")
PY
wait "$airflow_pid"
