"""``cosell-sandbox``: run the emulators and print the Airflow connections for them.

Besides the ``AIRFLOW_CONN_*`` lines it prints the ``AIRFLOW__COSELL__WEBHOOK_*`` settings
that make the webhook receiver trust the sandbox's signed deliveries (certificate host,
trust root, issuer organisation, CA bundle).

cosell-sandbox serve [--home DIR] [--base-port N] [--seed-referrals N]
cosell-sandbox env   [--home DIR] [--format shell|json]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .runtime import Sandbox, default_home, load_credentials, render_env


def _serve(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve() if args.home else default_home()
    home.mkdir(parents=True, exist_ok=True)
    # Reusing the credentials keeps earlier `env` output (and Airflow connections made from it) valid.
    sandbox = Sandbox(home, base_port=args.base_port, credentials=load_credentials(home)).start()
    if args.seed_referrals:
        assert sandbox.partner_center is not None
        sandbox.partner_center.seed(args.seed_referrals, seed=args.seed)
    state_file = sandbox.write_state()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"# cosell sandbox running (state: {state_file}); origins:", flush=True)
    for name, origin in sandbox.state()["origins"].items():
        print(f"#   {name:<15} {origin}", flush=True)
    print(render_env(sandbox.env()), flush=True)
    print("# ready", flush=True)
    try:
        stop.wait()
    finally:
        sandbox.stop()
    return 0


def _env(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve() if args.home else default_home()
    path = home / "state.json"
    if not path.exists():
        print(f"cosell-sandbox: no sandbox state in {home}; run 'cosell-sandbox serve' first", file=sys.stderr)
        return 1
    env = json.loads(path.read_text())["env"]
    print(json.dumps(env, indent=2) if args.format == "json" else render_env(env))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cosell-sandbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start every emulator and print AIRFLOW_CONN_* and AIRFLOW__COSELL__* lines")
    serve.add_argument("--home", help="state directory (default: $COSELL_SANDBOX_HOME or ./.sandbox)")
    serve.add_argument("--base-port", type=int, default=0, help="first port (default 0: pick free ports)")
    serve.add_argument("--seed-referrals", type=int, default=0, help="seed this many realistic referrals")
    serve.add_argument("--seed", type=int, default=0, help="random seed for seeding")
    serve.set_defaults(func=_serve)
    env = sub.add_parser("env", help="print the environment lines of the running sandbox again")
    env.add_argument("--home")
    env.add_argument("--format", choices=["shell", "json"], default="shell")
    env.set_defaults(func=_env)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
