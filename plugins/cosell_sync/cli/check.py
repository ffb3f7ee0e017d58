"""``cosell-sync check``: the readiness checklist (to be built, issue 18)."""

from __future__ import annotations

import click


@click.command()
def check() -> None:
    """Check connections, permissions, fields, labels, the webhook and the state DB."""
    raise click.ClickException("not built yet")
