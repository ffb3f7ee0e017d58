"""``cosell-sync setup salesforce|dynamics365``: the CRM's custom fields.

``setup salesforce`` writes nothing to the org: the fields ship as Salesforce metadata source
(SFDX source format) inside the package, at ``cosell_sync/crm/salesforce/`` (:data:`SALESFORCE_SOURCE`),
so they are deployed the way a Salesforce admin deploys any metadata, with the Salesforce CLI.
The command prints where that source is (or copies it to ``--copy-to``) and the commands that
deploy it and grant the fields to the integration user (the ``Cosell_Sync`` permission set).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import click

from cosell_sync.cli.setup_dynamics365 import dynamics365

#: The Salesforce metadata source shipped with the package (fields, permission set, manifest).
SALESFORCE_SOURCE = Path(__file__).resolve().parent.parent / "crm" / "salesforce"
PERMISSION_SET = "Cosell_Sync"


@click.group()
def setup() -> None:
    """Create the custom CRM fields the sync maps (or print how to deploy them)."""


def salesforce_fields(source: Path = SALESFORCE_SOURCE) -> list[str]:
    """The custom Opportunity fields the shipped metadata source defines (their API names)."""
    folder = source / "force-app" / "main" / "default" / "objects" / "Opportunity" / "fields"
    return sorted(p.name.removesuffix(".field-meta.xml") for p in folder.glob("*.field-meta.xml"))


@setup.command("salesforce")
@click.option(
    "--target-org",
    default="<your-org-alias>",
    show_default=True,
    help="The alias or username of the org, as `sf org login web --alias ...` named it.",
)
@click.option(
    "--integration-user",
    default=None,
    help="The username the sync connects as: the permission set is assigned to it.",
)
@click.option(
    "--copy-to",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Copy the metadata source (an SFDX project) to this folder first, e.g. to keep it in your repository.",
)
def salesforce(target_org: str, integration_user: str | None, copy_to: Path | None) -> None:
    """Print how to deploy the custom Opportunity fields (Salesforce CLI); writes nothing to the org."""
    source = SALESFORCE_SOURCE
    if copy_to is not None:
        if copy_to.exists() and any(copy_to.iterdir()):
            raise click.ClickException(f"{copy_to} is not empty: choose a new or empty folder for --copy-to.")
        shutil.copytree(source, copy_to, dirs_exist_ok=True)
        source = copy_to.resolve()
    fields = salesforce_fields(source)
    org = shlex.quote(target_org)
    user = f" --on-behalf-of {shlex.quote(integration_user)}" if integration_user else ""
    click.echo(f"The custom Opportunity fields cosell-sync maps ({len(fields)}) ship as Salesforce metadata source:")
    click.echo(f"  {source}")
    for name in fields:
        click.echo(f"    {name}")
    click.echo(f"  and the permission set {PERMISSION_SET} (read and edit access to each of them).")
    click.echo("")
    click.echo("1. Deploy them with the Salesforce CLI (sf), signed in to the org (`sf org login web --alias ...`):")
    click.echo(f"  cd {shlex.quote(str(source))}")
    click.echo(f"  sf project deploy start --source-dir force-app --target-org {org}")
    click.echo("")
    click.echo("2. Field-level security: the sync's integration user must read and edit every field. Assign the")
    click.echo("   permission set to it (and to the sellers who should see the fields):")
    click.echo(f"  sf org assign permset --name {PERMISSION_SET} --target-org {org}{user or ' --on-behalf-of <user>'}")
    click.echo("")
    click.echo("The opportunity's currency (CurrencyIsoCode) needs multiple currencies enabled in the org.")
    click.echo("Then run `cosell-sync check --crm salesforce`.")


setup.add_command(dynamics365)
