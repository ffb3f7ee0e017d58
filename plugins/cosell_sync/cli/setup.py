"""``cosell-sync setup salesforce|dynamics365``: the CRM's custom fields (to be built, issue 18)."""

from __future__ import annotations

import click


@click.group()
def setup() -> None:
    """Create the custom CRM fields the sync maps (or print how to deploy them)."""


from cosell_sync.cli.setup_dynamics365 import dynamics365  # noqa: E402

setup.add_command(dynamics365)
