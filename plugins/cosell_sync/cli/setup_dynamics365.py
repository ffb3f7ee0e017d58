"""``cosell-sync setup dynamics365``: the ``cosell_*`` columns, their choice options and the
``cosell_referralid`` alternate key, created through the Dataverse Web API metadata endpoints.

Idempotent: it reads the table's definition first and creates only what is missing (a choice
column that lacks options gets them added); a second run changes nothing and says so. A column
that exists with another type is an error naming it, and nothing is written. ``--dry-run``
prints the plan and writes nothing.
"""

from __future__ import annotations

import time

import click

from cosell_sync.engine.dataverse_setup import SetupPlan, plan_setup, required_columns
from cosell_sync.errors import ApiError, ConfigurationError

LOGICAL, ENTITY_SET = "opportunity", "opportunities"


@click.command("dynamics365")
@click.option("--conn-id", default="dynamics365_default", show_default=True, help="The dynamics365 connection.")
@click.option("--dry-run", is_flag=True, help="Print what would be created; write nothing.")
@click.option("--solution", default=None, help="Unmanaged solution (unique name) to add the new columns and key to.")
@click.option(
    "--wait", default=120.0, show_default=True, help="Seconds to wait for the alternate key's index to become Active."
)
def dynamics365(conn_id: str, dry_run: bool, solution: str | None, wait: float) -> None:
    """Create the cosell_* opportunity columns, their choice options and the alternate key.

    Reads the table's definition first and creates only what is missing; running it again
    changes nothing. A column that exists with another type is reported, never changed.
    """
    try:
        _setup(conn_id, dry_run, solution, wait)
    except (ConfigurationError, ApiError) as exc:
        raise click.ClickException(str(exc)) from None


def _setup(conn_id: str, dry_run: bool, solution: str | None, wait: float) -> None:
    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.hooks import dataverse_metadata as meta
    from cosell_sync.hooks.dynamics365 import DynamicsHook
    from cosell_sync.sides.dynamics365.choices import SYNC_STATUSES

    mapping = load_mapping("dynamics365")
    hook = DynamicsHook(conn_id)
    specs = required_columns(mapping, SYNC_STATUSES)
    key_column = mapping.records["link_field"]
    click.echo(
        f"Dataverse {hook.settings.url}: table {LOGICAL}, {len(specs)} custom columns and the key on {key_column}."
    )
    plan = plan_setup(specs, meta.read_columns(hook, LOGICAL, ENTITY_SET), meta.read_keys(hook, LOGICAL), key_column)
    _show(plan)
    if plan.errors:
        raise click.ClickException(f"{len(plan.errors)} column(s) cannot be used as they are; nothing was changed.")
    if not plan.changes:
        click.echo("Nothing to do: every column, option and the key are already there. No changes made.")
        return
    if dry_run:
        click.echo("Dry run: nothing was written.")
        return
    by_name = {s.name: s for s in specs}
    for spec in plan.create:
        meta.create_column(hook, LOGICAL, spec, solution)
        click.echo(f"✔ created column {spec.name}")
    for column, labels in plan.add_options.items():
        for text in labels:
            meta.add_option(hook, LOGICAL, column, text, solution)
        click.echo(f"✔ added options to {column}: {', '.join(labels)}")
    if plan.create_key:
        display = by_name[key_column].display if key_column in by_name else key_column
        meta.create_key(hook, LOGICAL, key_column, display, solution)
        click.echo(f"✔ created alternate key on {key_column}; Dataverse builds its index in the background")
        _wait_for_key(hook, key_column, wait)
    click.echo("Done.")


def _show(plan: SetupPlan) -> None:
    for error in plan.errors:
        click.echo(f"✘ {error}")
    if plan.present:
        click.echo(f"Already there: {', '.join(plan.present)}.")
    if plan.key_status:
        click.echo(f"Alternate key on {plan.key_column}: {plan.key_status}.")
    if plan.changes and not plan.errors:
        click.echo("Plan:")
        for line in plan.lines():
            click.echo(line)


def _wait_for_key(hook: object, key_column: str, wait: float) -> None:
    from cosell_sync.hooks import dataverse_metadata as meta

    deadline = time.monotonic() + wait
    status: str | None = "Pending"
    while time.monotonic() < deadline:
        status = next((s for cols, s in meta.read_keys(hook, LOGICAL) if cols == [key_column]), None)  # type: ignore[arg-type]
        if status != "Pending":
            break
        time.sleep(1)
    if status == "Active":
        click.echo(f"✔ alternate key on {key_column} is Active")
    elif status == "Failed":
        raise click.ClickException(
            f"The alternate key's index failed (EntityKeyIndexStatus Failed): rows share a {key_column} value. "
            "Remove the duplicates, then reactivate the key (ReactivateEntityKey) or run setup again."
        )
    else:
        click.echo(f"The alternate key on {key_column} is still {status}; the sync can run once it is Active.")
