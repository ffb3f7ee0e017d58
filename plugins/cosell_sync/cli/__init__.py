"""``cosell-sync``: the partner's command line, from a fresh tenant to the first real run.

Each subcommand lives in its own module and is registered here:

- ``login``   (login.py):   sign in to Partner Center with the device-code flow and store the
  refresh token where the hook reads it;
- ``setup``   (setup.py):   the CRM's custom fields (Salesforce metadata source to deploy, or
  Dataverse columns, choices and the alternate key created through the Web API);
- ``check``   (check.py):   a readiness checklist, each line ✔ or ✘ with its fix;
- ``preview`` (preview.py): what one record would become on the other side, writing nothing.
"""

from __future__ import annotations

import click

from cosell_sync.cli import check, login, preview, setup


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cosell-sync", prog_name="cosell-sync")
def main() -> None:
    """Connect cosell-sync to a real tenant: sign in, set up the CRM, check, preview."""


main.add_command(login.login)
main.add_command(setup.setup)
main.add_command(check.check)
main.add_command(preview.preview)
