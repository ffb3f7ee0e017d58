"""``cosell-sync login partner-center``: the device-code sign-in (to be built, issue 18)."""

from __future__ import annotations

import click


@click.group()
def login() -> None:
    """Sign in to a system and store the credential where the hook reads it."""
