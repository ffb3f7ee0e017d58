"""``cosell-sync check``: the readiness checklist, each line ✔ or ✘ followed by the exact fix.

The checks themselves are in :mod:`cosell_sync.cli.checks`; this module picks which to run
(every CRM whose connection exists, or ``--crm``), prints them and sets the exit code (1 when
anything is ✘).
"""

from __future__ import annotations

from collections.abc import Iterator

import click

from cosell_sync import crms
from cosell_sync.cli import checks
from cosell_sync.cli.checks import Item


def crm_connections(wanted: str | None) -> tuple[list[tuple[str, str]], list[Item]]:
    """([(crm, connection id)] to check, lines about connections that are missing)."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    found, items = [], []
    for name in [wanted] if wanted else list(crms.NAMES):
        entry = crms.get(name)
        try:
            conn = entry.connection()
        except AirflowNotFoundException:
            if wanted:
                items.append(
                    checks.failed(
                        f"{entry.label}: no connection {entry.conn_id!r}",
                        f"define it: {checks.env_var(entry.conn_id)} (see SPEC §4), or in Airflow's connections",
                    )
                )
            continue
        found.append((name, str(conn.conn_id)))
    if not found and not wanted:
        names = " or ".join(checks.env_var(crms.get(n).conn_id) for n in crms.NAMES)
        items.append(checks.failed("No CRM connection", f"define {names}"))
    return found, items


def run_checks(
    crm: str | None, *, pc_conn_id: str, webhook_url: str | None, validate: bool, timeout: float, migrate: bool
) -> Iterator[Item]:
    yield from checks.partner_center(pc_conn_id)
    targets, missing = crm_connections(crm)
    yield from missing
    for name, conn_id in targets:
        yield from (checks.salesforce if name == crms.SALESFORCE else checks.dynamics365)(conn_id)
    yield from checks.webhook(pc_conn_id, expected_url=webhook_url, validate=validate, timeout=timeout)
    yield from checks.state_db(migrate=migrate)


@click.command()
@click.option(
    "--crm",
    type=click.Choice(list(crms.NAMES)),
    default=None,
    help="Check this CRM only (default: every CRM with a connection).",
)
@click.option(
    "--validate-webhook", is_flag=True, help="Also have Partner Center send a validation event and wait for its result."
)
@click.option(
    "--webhook-url",
    default=None,
    help="The receiver's public URL the registration must have (default: any https://…/cosell/webhooks/partner-center).",
)
@click.option("--partner-center-conn-id", default="partner_center_default", show_default=True)
@click.option(
    "--validation-timeout", default=120.0, show_default=True, help="Seconds to wait for the validation event."
)
@click.option("--migrate-state", is_flag=True, help="Migrate the state DB first (the first sync run does it too).")
def check(
    crm: str | None,
    validate_webhook: bool,
    webhook_url: str | None,
    partner_center_conn_id: str,
    validation_timeout: float,
    migrate_state: bool,
) -> None:
    """Check connections, permissions, fields, labels, the webhook and the state DB; exits 1 if anything is ✘."""
    bad = 0
    for item in run_checks(
        crm,
        pc_conn_id=partner_center_conn_id,
        webhook_url=webhook_url,
        validate=validate_webhook,
        timeout=validation_timeout,
        migrate=migrate_state,
    ):
        bad += not item.ok
        for line in item.lines():
            click.echo(line)
    click.echo("")
    if bad:
        click.echo(f"{bad} problem(s) to fix; then run `cosell-sync check` again.")
        raise SystemExit(1)
    click.echo("Ready: trigger a sync DAG with dry_run ticked to preview the first run.")
