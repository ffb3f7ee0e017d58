"""The readiness checks behind ``cosell-sync check``: each one a line, ✔ or ✘ with the exact fix.

Every check goes through the product's own hooks and the calls the sync itself makes (the
mapping the DAG loads, the Salesforce side's picklist check, the Dataverse choice metadata
read, the webhook registration operator's validation event), so a ✔ here means the run's
own call works. Nothing here prints a secret: the hooks' errors never carry one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cosell_sync import crms
from cosell_sync.engine.mapping import FieldMapping, MappingError, SyncMapping, resolve_choices
from cosell_sync.errors import AuthenticationError, CosellError

log = logging.getLogger(__name__)
RECEIVER_PATH = "/cosell/webhooks/partner-center"  # the plugin's mount (/cosell) + the receiver's route
REGISTRATION_DAG = "partner_center_webhook_registration"

# Compatible CRM types of each mapping type: Salesforce describe() types, Dataverse AttributeType.
SALESFORCE_TYPES: dict[str, set[str]] = {
    "string": {"string", "textarea", "url", "email", "phone", "picklist"},
    "decimal": {"currency", "double", "int", "percent"},
    "date": {"date", "datetime"},
    "currency": {"picklist", "string"},
    "country": {"string", "picklist"},
    "email": {"email", "string"},
    "enum": {"picklist", "string"},
    "id_list": {"string", "textarea", "multipicklist"},
    "boolean": {"boolean"},
}
DATAVERSE_TYPES: dict[str, set[str]] = {
    "string": {"String", "Memo"},
    "decimal": {"Money", "Decimal", "Double", "Integer", "BigInt"},
    "date": {"DateTime"},
    "currency": {"String", "Lookup"},
    "country": {"String"},
    "email": {"String"},
    "enum": {"Picklist", "State", "Status", "String"},
    "id_list": {"String", "Memo"},
    "boolean": {"Boolean"},
}
# The types of the mapping's ``records:`` fields on the opportunity (the link, the flag, ...).
RECORD_TYPES: dict[str, dict[str, set[str]]] = {
    crms.SALESFORCE: {
        "link_field": {"string"},
        "link_url_field": {"url", "string"},
        "sync_flag_field": {"boolean"},
        "audit_field": {"textarea"},
        "sync_status_field": {"picklist"},
        "modified_field": {"datetime"},
        "closed_field": {"boolean"},
    },
    crms.DYNAMICS365: {
        "link_field": {"String"},
        "link_url_field": {"String"},
        "sync_flag_field": {"Boolean"},
        "audit_field": {"Memo", "String"},
        "sync_status_field": {"Picklist"},
        "modified_field": {"DateTime"},
        "closed_field": {"State"},
    },
}


@dataclass(frozen=True)
class Item:
    """One line of the checklist."""

    ok: bool
    what: str
    fix: str | None = None

    def lines(self) -> list[str]:
        if self.ok:
            return [f"✔ {self.what}"]
        return [f"✘ {self.what}", *(f"    fix: {line}" for line in (self.fix or "").splitlines() if line)]


def passed(what: str) -> Item:
    return Item(True, what)


def failed(what: str, fix: str) -> Item:
    return Item(False, what, fix)


def attempt(what: str, call: Callable[[], Any], fix: Callable[[BaseException], str]) -> tuple[Item, Any]:
    """``call()`` as one line: ✔ ``what``, or ✘ with the error and ``fix(error)``."""
    try:
        value = call()
    except (CosellError, OSError, ValueError) as exc:
        return failed(f"{what}: {exc}", fix(exc)), None
    except Exception as exc:  # a client library's own error (simple-salesforce, SQLAlchemy ...)
        return failed(f"{what}: {type(exc).__name__}: {exc}", fix(exc)), None
    return passed(what), value


def env_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


# -- Partner Center ----------------------------------------------------------------------------
def partner_center(conn_id: str) -> Iterator[Item]:
    """The connection (an app+user token), then the role: it can list referrals."""
    from cosell_sync.hooks.partner_center import PartnerCenterHook

    hook = PartnerCenterHook(conn_id)
    where = f"Partner Center ({conn_id})"

    def token_fix(exc: BaseException) -> str:
        return (
            f"sign in again: `cosell-sync login partner-center --conn-id {conn_id}` (a service account is "
            f"recommended); check the client id, secret and tenant of the connection ({env_var(conn_id)})"
        )

    item, _ = attempt(
        f"{where}: app+user token acquired", lambda: hook.get_token(hook.settings.referrals_scope), token_fix
    )
    yield item
    if not item.ok:
        return

    def role_fix(exc: BaseException) -> str:
        if isinstance(exc, AuthenticationError):
            return (
                "give the signed-in user a Partner Center role that can read referrals: Referrals admin (to "
                "create and update them, as the sync does) in Partner Center > Account settings > User management"
            )
        return f"check the connection's referrals_url ({hook.settings.referrals_url}) and the network path to it"

    yield attempt(
        f"{where}: the signed-in user can list referrals", lambda: next(hook.iter_referral_pages(top=1)), role_fix
    )[0]


def webhook(conn_id: str, *, expected_url: str | None, validate: bool, timeout: float) -> Iterator[Item]:
    """The registration: there is one, its URL is the receiver's, it has the events the sync
    needs; with ``validate``, a validation event is delivered."""
    from cosell_sync.hooks.partner_center import REFERRAL_EVENTS, PartnerCenterHook, registration_value
    from cosell_sync.operators.webhook_registration import display_url, send_validation_event

    hook = PartnerCenterHook(conn_id)
    url_hint = expected_url or f"https://<your Airflow host>{RECEIVER_PATH}"
    register = (
        f"register it: trigger the {REGISTRATION_DAG} DAG with webhook_url={url_hint} "
        f'(`airflow dags trigger {REGISTRATION_DAG} --conf \'{{"webhook_url": "{url_hint}", "overwrite": true}}\'`)'
    )
    item, doc = attempt(
        "Partner Center webhook: registration read",
        hook.get_webhook_registration,
        lambda exc: "the webhooks API needs the same app+user sign-in; check the connection's webhooks_url",
    )
    if not item.ok:
        yield item
        return
    if doc is None:
        yield failed("Partner Center webhook: no registration (changes reach the CRM only on the schedule)", register)
        return
    url = str(registration_value(doc, "WebhookUrl") or "")
    shown = display_url(url)
    parts = urlsplit(url)
    if expected_url is not None and url != expected_url:
        yield failed(f"Partner Center webhook: registered to {shown}, not to {display_url(expected_url)}", register)
    elif expected_url is None and (parts.scheme != "https" or not parts.path.endswith(RECEIVER_PATH)):
        yield failed(
            f"Partner Center webhook: registered to {shown}, which is not an https:// URL of the receiver "
            f"(…{RECEIVER_PATH})",
            register,
        )
    else:
        yield passed(f"Partner Center webhook: registered to {shown}")
    events = {str(e).lower() for e in registration_value(doc, "WebhookEvents") or []}
    missing = [e for e in REFERRAL_EVENTS if e not in events]
    if missing:
        yield failed(
            f"Partner Center webhook: the events {', '.join(missing)} are not registered",
            f"{register}; its default events are the ones the sync needs ({', '.join(REFERRAL_EVENTS)})",
        )
    else:
        yield passed(f"Partner Center webhook: the events the sync needs ({', '.join(REFERRAL_EVENTS)})")
    if not validate:
        return
    if "test-created" not in events:
        yield failed(
            "Partner Center webhook: a validation event needs the test-created event registered",
            f"trigger the {REGISTRATION_DAG} DAG with send_test_event=true (it registers test-created and "
            "sends a validation event)",
        )
        return

    def sent() -> dict[str, Any]:
        return send_validation_event(hook, url, timeout=timeout, poll_interval=2.0, log=log)

    item, result = attempt(
        "Partner Center webhook: validation event delivered",
        sent,
        lambda exc: (
            "make the receiver reachable from the internet over https (Airflow's API server with the "
            "cosell-sync plugin), then check again"
        ),
    )
    if item.ok:
        item = passed(f"{item.what} ({result['correlation_id']}: {', '.join(result['response_codes']) or 'no result'})")
    yield item


# -- the CRM -----------------------------------------------------------------------------------
def mapping_of(crm: str) -> SyncMapping:
    """The mapping the DAG would use: the ``cosell_mapping_<crm>`` Variable, else the environment, else the default."""
    from cosell_sync.dag_factory import mapping_override
    from cosell_sync.engine.mapping import load_mapping

    return load_mapping(crm, mapping_override(crm))


def _split(path: str, records: Mapping[str, str]) -> tuple[str, str]:
    """(record kind, field) of a mapping's CRM path: ``Account.Name`` -> ("account", "Name")."""
    head, dot, rest = path.partition(".")
    kinds = {records[k].lower(): k for k in ("account", "contact")} | {"account": "account", "contact": "contact"}
    if dot and head.lower() in kinds:
        return kinds[head.lower()], rest
    return "opportunity", path


def field_items(
    crm: str,
    mapping: SyncMapping,
    tables: Mapping[str, Mapping[str, str]],
    fix_missing: Callable[[str, str], str],
) -> Iterator[Item]:
    """Every mapped CRM field exists in ``tables`` (record kind -> field -> CRM type) with a type
    compatible with the mapping's; the ``records:`` fields too."""
    compatible = SALESFORCE_TYPES if crm == crms.SALESFORCE else DATAVERSE_TYPES
    wanted: list[tuple[str, str, str, set[str]]] = []  # (mapping key, kind, field, compatible types)
    for fm in mapping.fields.values():
        kind, name = _split(fm.crm, mapping.records)
        if "." in name:  # a lookup's field (transactioncurrency.isocurrencycode): the lookup column
            name, kind = f"{name.split('.')[0]}id", kind
            wanted.append((f"fields.{fm.name}", kind, name, {"Lookup"}))
            continue
        wanted.append((f"fields.{fm.name}", kind, name, compatible[fm.type]))
    for key, types in RECORD_TYPES[crm].items():
        wanted.append((f"records.{key}", "opportunity", mapping.records[key], types))
    bad = []
    for key, kind, name, types in wanted:
        table = {k.lower(): (k, v) for k, v in tables.get(kind, {}).items()}
        found = table.get(name.lower())
        where = f"{mapping.records[kind]}.{name}"
        if found is None:
            bad.append(failed(f"{key}: the field {where} does not exist", fix_missing(kind, name)))
        elif found[1] not in types:
            bad.append(
                failed(
                    f"{key}: the field {where} is of type {found[1]}, not one the mapping can write "
                    f"({', '.join(sorted(types))})",
                    f"give {where} one of those types, or map {key} to another field in {mapping.source}",
                )
            )
    yield from bad or [passed(f"{crms.label(crm)}: all {len(wanted)} mapped fields exist with compatible types")]


def _connected(
    crm: str, what: str, hook: Any, token: Callable[[], Any], token_fix: str, read_fix: str
) -> Generator[Item, None, SyncMapping | None]:
    """A CRM's token (``what``), its Test button's cheap read, then the mapping its DAG uses:
    the lines, and the mapping (None after a ✘)."""
    item, _ = attempt(what, token, lambda exc: token_fix)
    yield item
    if not item.ok:
        return None
    ok, message = hook.test_connection()
    yield Item(ok, f"{what.rsplit(':', 1)[0]}: {message}", None if ok else read_fix)
    item, mapping = attempt(
        f"{crms.label(crm)} mapping loads", lambda: mapping_of(crm), lambda exc: "fix the mapping file"
    )
    yield item
    return mapping if item.ok else None


def salesforce(conn_id: str) -> Iterator[Item]:
    from cosell_sync.hooks.salesforce import SalesforceSyncHook

    where = f"Salesforce ({conn_id})"
    hook = SalesforceSyncHook(salesforce_conn_id=conn_id)
    mapping = yield from _connected(
        crms.SALESFORCE,
        f"{where}: signed in",
        hook,
        lambda: hook.conn,
        f"check the connection's instance_url and access token or login fields ({env_var(conn_id)})",
        "check the integration user's API access (API Enabled)",
    )
    if mapping is None:
        return
    described: dict[str, dict[str, Any]] = {}
    for kind in ("opportunity", "account", "contact"):
        obj = mapping.records[kind]
        item, doc = attempt(
            f"Salesforce: describe {obj}",
            lambda obj=obj: hook.describe(obj),
            lambda exc, obj=obj: f"give the integration user read access to {obj}",
        )
        if not item.ok:
            yield item
            return
        described[kind] = doc
    tables = {kind: {f["name"]: f["type"] for f in doc.get("fields", [])} for kind, doc in described.items()}

    def fix_missing(kind: str, name: str) -> str:
        if name.endswith("__c"):
            return (
                "deploy the custom fields: `cosell-sync setup salesforce` prints the commands; if the field exists, "
                "give the integration user read and edit access to it (the Cosell_Sync permission set)"
            )
        return f"give the integration user access to {mapping.records[kind]}.{name} (field-level security)"

    yield from field_items(crms.SALESFORCE, mapping, tables, fix_missing)
    yield from _salesforce_picklists(hook, mapping, described["opportunity"])
    link = mapping.records["link_field"]
    spec = next((f for f in described["opportunity"].get("fields", []) if f["name"].lower() == link.lower()), None)
    if spec is not None and spec.get("externalId") and spec.get("unique"):
        yield passed(f"Salesforce: {link} is an External ID, unique")
    elif spec is not None:
        yield failed(
            f"Salesforce: {link} is not {'an External ID' if not spec.get('externalId') else 'unique'} "
            "(creates are upserts keyed by it)",
            f"Setup > Object Manager > Opportunity > Fields & Relationships > {link} > Edit: tick "
            "'External ID' and 'Unique' (or deploy `cosell-sync setup salesforce`)",
        )


def _salesforce_picklists(hook: Any, mapping: SyncMapping, described: Mapping[str, Any]) -> Iterator[Item]:
    from cosell_sync.sides.salesforce import SalesforceSide

    problems = SalesforceSide(hook, mapping).picklist_problems(described)
    for problem in problems:
        field_name = problem.split(":")[0].split(".")[1]
        fm = mapping.fields[field_name]
        yield failed(
            f"Salesforce picklist: {problem}",
            f"add the value to the {fm.crm} picklist (Setup > Object Manager > Opportunity > Fields & "
            f"Relationships > {fm.crm} > Values > New), or change fields.{field_name}.values.crm in {mapping.source}",
        )
    status = next(
        (f for f in described.get("fields", []) if f["name"].lower() == mapping.records["sync_status_field"].lower()),
        None,
    )
    values = [str(p["value"]) for p in (status or {}).get("picklistValues") or [] if p.get("active", True)]
    missing = [s for s in ("Synced", "Pending", "Error") if status is not None and s not in values]
    if missing:
        problems.append("status")
        column = mapping.records["sync_status_field"]
        yield failed(
            f"Salesforce picklist: {column} lacks {', '.join(map(repr, missing))}",
            f"add them to the {column} picklist (or deploy `cosell-sync setup salesforce`)",
        )
    if not problems:
        yield passed("Salesforce: every picklist value the mapping writes exists")


def dynamics365(conn_id: str) -> Iterator[Item]:
    from cosell_sync.hooks.dataverse_metadata import alternate_keys, column_types
    from cosell_sync.hooks.dynamics365 import DynamicsHook
    from cosell_sync.sides.dynamics365.choices import choice_options, sync_statuses

    where = f"Dynamics 365 ({conn_id})"
    hook = DynamicsHook(conn_id)
    mapping = yield from _connected(
        crms.DYNAMICS365,
        f"{where}: token acquired",
        hook,
        hook.get_token,
        f"check the connection's client id, secret, tenant and host ({env_var(conn_id)}); the app needs an "
        "application user in the environment (Power Platform admin center > Application users)",
        "give the application user a security role",
    )
    if mapping is None:
        return
    tables = {}
    for kind in ("opportunity", "account", "contact"):
        entity_set = mapping.records[kind]
        item, columns = attempt(
            f"Dataverse: the {entity_set} table's columns read",
            lambda s=entity_set: column_types(hook, s),
            lambda exc: "give the application user read access to table definitions (a security role)",
        )
        if not item.ok:
            yield item
            return
        tables[kind] = columns

    def fix_missing(kind: str, name: str) -> str:
        if name.startswith("cosell_"):
            return f"create the cosell columns: `cosell-sync setup dynamics365 --conn-id {conn_id}`"
        return f"give the application user access to the column {name} of {mapping.records[kind]}"

    yield from field_items(crms.DYNAMICS365, mapping, tables, fix_missing)
    item, options = attempt(
        "Dataverse: the choice columns' options read",
        lambda: choice_options(hook, mapping),
        lambda exc: f"create the cosell columns: `cosell-sync setup dynamics365 --conn-id {conn_id}`",
    )
    if not item.ok:
        yield item
    else:
        yield from _dataverse_labels(mapping, options, conn_id, sync_statuses)
    link = mapping.records["link_field"]
    item, keys = attempt(
        "Dataverse: the opportunity table's alternate keys read",
        lambda: alternate_keys(hook, mapping.records["opportunity"]),
        lambda exc: "give the application user read access to table definitions",
    )
    if not item.ok:
        yield item
    elif any(cols == [link] for cols in keys.values()):
        yield passed(f"Dataverse: {link} is an alternate key of opportunity")
    else:
        yield failed(
            f"Dataverse: no alternate key on {link} alone (creates are upserts keyed by it)",
            f"create it: `cosell-sync setup dynamics365 --conn-id {conn_id}`",
        )


def _dataverse_labels(mapping: SyncMapping, options: Any, conn_id: str, sync_statuses: Callable) -> Iterator[Item]:
    bad = []
    try:
        resolve_choices(mapping, options, where="this Dataverse org")
    except MappingError as exc:
        for problem in exc.problems:
            field_name = problem.split(":")[0].split(".")[1] if problem.startswith("fields.") else ""
            fm: FieldMapping | None = mapping.fields.get(field_name)
            column = fm.crm if fm else "the column"
            bad.append(
                failed(
                    f"Dataverse choice: {problem}",
                    f"add the option to the choice column {column} (Power Apps > Tables > Opportunity > Columns > "
                    f"{column} > Choices), or change fields.{field_name}.values.crm in {mapping.source}",
                )
            )
    try:
        sync_statuses(mapping, options)
    except CosellError as exc:
        bad.append(failed(f"Dataverse choice: {exc}", f"`cosell-sync setup dynamics365 --conn-id {conn_id}`"))
    yield from bad or [passed("Dataverse: every choice label the mapping writes exists")]


# -- the state DB ------------------------------------------------------------------------------
def state_db(*, migrate: bool) -> Iterator[Item]:
    from cosell_sync.state import SCHEMA_VERSION, StateStore
    from cosell_sync.state.db import DEFAULT_CONN_ID

    item, store = attempt(
        "State DB: connection",
        lambda: StateStore.from_airflow(),
        lambda exc: f"fix the {DEFAULT_CONN_ID} connection ({env_var(DEFAULT_CONN_ID)}): a SQLAlchemy URL in its host",
    )
    if not item.ok:
        yield item
        return
    with store:
        if migrate:
            yield attempt(f"State DB {store.url}: migrated now", store.migrate, lambda exc: "see the error")[0]
        item, version = attempt(
            f"State DB {store.url}: reachable",
            store.schema_version,
            lambda exc: f"start the database or fix the {DEFAULT_CONN_ID} connection ({env_var(DEFAULT_CONN_ID)})",
        )
        if not item.ok:
            yield item
        elif version == SCHEMA_VERSION:
            yield passed(f"State DB {store.url}: reachable, migrated (schema version {version})")
        elif version < SCHEMA_VERSION:
            yield failed(
                f"State DB {store.url}: schema version {version}, this cosell-sync needs {SCHEMA_VERSION}",
                "migrate it: `cosell-sync check --migrate-state` (the first sync run also does)",
            )
        else:
            yield failed(
                f"State DB {store.url}: schema version {version} is newer than this cosell-sync's ({SCHEMA_VERSION})",
                "upgrade cosell-sync on this machine to the version the DAGs run",
            )
