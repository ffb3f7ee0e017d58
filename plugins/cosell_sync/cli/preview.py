"""``cosell-sync preview``: one record on the other side, nothing written (to be built, issue 18)."""

from __future__ import annotations

import click


@click.command()
def preview() -> None:
    """Show what one opportunity or referral would become on the other side; writes nothing."""
    raise click.ClickException("not built yet")
