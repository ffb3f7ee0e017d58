"""``cosell-sync login partner-center``: the device-code sign-in.

msal's device-code flow (a public client flow: the app registration needs "Allow public client
flows" on; no secret is sent) against the connection's authority and tenant, trusting its
``ca_bundle``. The refresh token it gives is stored in the connection's extras as
``refresh_token``, with ``public_client`` so that the hook redeems it without the client secret
(Entra refuses a secret with a public client's refresh token, AADSTS700025). A connection in the
metadata DB is updated there; one from an environment variable or a secrets backend cannot be,
so the updated ``AIRFLOW_CONN_<ID>`` line goes to a new 0600 file instead. No token or secret
is ever printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import msal

from cosell_sync.cli.connections import (
    connection_json,
    find_connection,
    update_extra_in_db,
    write_env_file,
)
from cosell_sync.errors import ConfigurationError

SERVICE_ACCOUNT_ADVICE = (
    "Sign in as a service account (a dedicated Partner Center user with the Referrals admin role), "
    "not as yourself: a person's refresh token stops working when they leave the company or their "
    "password or MFA changes, and every sync would stop with it."
)
# What msal's result ``error`` means for the person at the terminal.
ERROR_HINTS = {
    "authorization_declined": "The sign-in was declined. Run the command again to retry.",
    "expired_token": "The code expired before the sign-in finished (15 minutes). Run the command again.",
    "authorization_pending": "The code expired before the sign-in finished. Run the command again.",
    "bad_verification_code": "The token service no longer knows this code. Run the command again.",
}


@click.group()
def login() -> None:
    """Sign in to a system and store the credential where the hook reads it."""


@login.command("partner-center")
@click.option("--conn-id", default="partner_center_default", show_default=True, help="The partner_center connection.")
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the updated AIRFLOW_CONN_<ID> line when the connection comes from an environment "
    "variable or a secrets backend (a new file, mode 0600). Default: ./<conn id>.env",
)
def partner_center(conn_id: str, env_file: Path | None) -> None:
    """Sign in to Partner Center with a device code and store the refresh token in the connection.

    Prints a URL and a code: open the URL in any browser, enter the code and sign in as the
    Partner Center user the sync should act as. The command waits until the sign-in is done.
    """
    try:
        _login(conn_id, env_file)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


def _login(conn_id: str, env_file: Path | None) -> None:
    from cosell_sync.hooks.entra import authority_url, msal_app
    from cosell_sync.hooks.http import TrustedSession
    from cosell_sync.hooks.partner_center import PartnerCenterSettings

    stored = find_connection(conn_id)
    settings = PartnerCenterSettings.from_connection(stored.conn, validate=False)
    if not settings.client_id or not settings.tenant_id:
        raise ConfigurationError(
            f"Connection '{conn_id}' needs the app's client id (login) and 'tenant_id' in its extras."
        )
    click.echo(f"Connection '{conn_id}' (from {stored.source}), tenant {settings.tenant_id}.")
    click.echo(SERVICE_ACCOUNT_ADVICE)
    authority = authority_url(settings.authority, settings.tenant_id)
    app = msal_app(authority, settings.client_id, None, TrustedSession(settings.ca_bundle))
    assert isinstance(app, msal.PublicClientApplication)  # no secret: the device flow is a public client's
    flow = app.initiate_device_flow(scopes=[settings.referrals_scope])
    if "user_code" not in flow:
        raise ConfigurationError(f"The token service refused the sign-in: {_describe(flow)}")
    click.echo("")
    click.echo(flow["message"])
    click.echo("Waiting for the sign-in...")
    result = app.acquire_token_by_device_flow(flow)
    if "refresh_token" not in result:
        raise ConfigurationError(f"Sign-in failed: {_describe(result)}")
    user = (result.get("id_token_claims") or {}).get("preferred_username") or "the user"
    click.echo(f"Signed in as {user}.")
    _store(stored, result["refresh_token"], env_file)


def _store(stored: Any, refresh_token: str, env_file: Path | None) -> None:
    from cosell_sync.hooks.entra import RefreshTokenStore
    from cosell_sync.hooks.partner_center import PartnerCenterSettings

    old = PartnerCenterSettings.from_connection(stored.conn, validate=False)
    changes = {"refresh_token": refresh_token, "public_client": True}
    if stored.writable:
        update_extra_in_db(stored.conn_id, changes)
        click.echo(f"Stored the refresh token in connection '{stored.conn_id}' in the Airflow metadata DB.")
    else:
        extra = {**(stored.conn.extra_dejson or {}), **changes}
        path = write_env_file(
            env_file or Path.cwd() / f"{stored.conn_id}.env", stored.env_var, connection_json(stored.conn, extra)
        )
        click.echo(
            f"The connection comes from {stored.source}, which this command cannot change.\n"
            f"Wrote the updated {stored.env_var} line to {path} (mode 0600; it holds the connection's "
            "credentials: keep it private).\n"
            f"Use it in place of the old value: `source {path}` in the shell that runs Airflow, or copy its "
            f"value to where {stored.env_var} is set (your .env file, Helm values or secrets backend), "
            "then delete the file."
        )
    if old.refresh_token:
        # The rotated tokens of the old sign-in are keyed by its seed token: never used again.
        store = RefreshTokenStore(Path(old.token_store_path)) if old.token_store_path else RefreshTokenStore.default()
        store.forget(RefreshTokenStore.key(stored.conn_id, old.client_id, old.refresh_token))
    click.echo("Done. The next Partner Center call uses this sign-in.")


def _describe(result: dict[str, Any]) -> str:
    """The error of msal's result for a person: a hint, else the service's first line (no token
    or secret is ever in an error response)."""
    error = str(result.get("error") or "unknown error")
    description = str(result.get("error_description") or "").split("\r\n")[0].split("\n")[0]
    if "AADSTS7000218" in description:
        return (
            f"{error}: the app registration does not allow public client flows. In the Entra admin center, "
            "App registrations > the app > Authentication > Advanced settings, set 'Allow public client "
            "flows' to Yes, then run the command again."
        )
    hint = ERROR_HINTS.get(error)
    return f"{error}: {hint}" if hint else f"{error}: {description}"
