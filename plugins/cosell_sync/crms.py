"""The CRMs the sync knows, in one registry: everything else (the mapping loader, the DAG
factory, the event DAG, the Co-sell page, the run reports) reads this.

Adding a CRM starts here: its name (the DAG id's suffix, the mapping file's stem, the state
DB's ``crm`` column), its label, its connection id, the id field of its opportunities, its
hook and its side. Hooks and sides are named by import path and imported on first use, so
that parsing a DAG file imports neither the HTTP clients nor pandas.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any

DYNAMICS365 = "dynamics365"
SALESFORCE = "salesforce"
log = logging.getLogger(__name__)


def _load(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (the module imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Crm:
    """One CRM the sync writes opportunities to."""

    name: str  # as the DAG id (cosell_sync_<name>), the mapping file and the state DB name it
    label: str  # as people name it (DAG descriptions, run notes, the Co-sell page)
    store: str  # the system that stores its records, as validation messages name it
    conn_id: str  # the Airflow connection the DAGs use
    id_field: str  # the field of an opportunity's id
    hook: str  # "module:Class" of its hook (imported on first use)
    side: str  # "module:Class" of its side of the sync (imported on first use)
    record_path: str  # a record's page, under the connection's host: "{crm_id}" is replaced
    deprecated_conn_ids: tuple[str, ...] = ()  # older ids still read, with a warning

    @property
    def conn_ids(self) -> tuple[str, ...]:
        """The connection id, then the deprecated ones (the first that exists is used)."""
        return (self.conn_id, *self.deprecated_conn_ids)

    def hook_class(self) -> type:
        return _load(self.hook)

    def side_class(self) -> type:
        return _load(self.side)

    def connection(self, conn_id: str | None = None) -> Any:
        """The Airflow connection ``conn_id`` (default: the CRM's). The CRM's own id falls back to
        a deprecated one when only that exists, with a DeprecationWarning and a log line saying
        how to rename it; any other missing id raises Airflow's not-found error."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        conn_id = conn_id or self.conn_id
        try:
            return BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            if conn_id != self.conn_id or not self.deprecated_conn_ids:
                raise
        for old in self.deprecated_conn_ids:
            try:
                conn = BaseHook.get_connection(old)
            except AirflowNotFoundException:
                continue
            message = (
                f"the {self.label} connection id {old!r} is deprecated: name it {self.conn_id!r} "
                f"(AIRFLOW_CONN_{self.conn_id.upper()}); {old!r} is read while {self.conn_id!r} is absent"
            )
            warnings.warn(message, DeprecationWarning, stacklevel=3)
            log.warning(message)
            return conn
        raise AirflowNotFoundException(f"The conn_id `{self.conn_id}` isn't defined")


CRMS: dict[str, Crm] = {
    crm.name: crm
    for crm in (
        Crm(
            name=DYNAMICS365,
            label="Dynamics 365",
            store="Dataverse",
            conn_id="dynamics365_default",
            deprecated_conn_ids=("dynamics_default",),
            id_field="opportunityid",
            hook="cosell_sync.hooks.dynamics365:DynamicsHook",
            side="cosell_sync.sides.dynamics365:DynamicsSide",
            record_path="/main.aspx?pagetype=entityrecord&etn=opportunity&id={crm_id}",
        ),
        Crm(
            name=SALESFORCE,
            label="Salesforce",
            store="Salesforce",
            conn_id="salesforce_default",
            id_field="Id",
            hook="cosell_sync.hooks.salesforce:SalesforceSyncHook",
            side="cosell_sync.sides.salesforce:SalesforceSide",
            record_path="/lightning/r/Opportunity/{crm_id}/view",
        ),
    )
}
NAMES: tuple[str, ...] = tuple(CRMS)  # ("dynamics365", "salesforce")


def get(name: str) -> Crm:
    """The CRM named ``name``; a ValueError naming the known ones otherwise."""
    try:
        return CRMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown CRM {name!r} (known: {', '.join(NAMES)})") from None


def label(name: str | None, default: str | None = None) -> str:
    """The CRM's label; ``default`` (else the name itself) for one the registry lacks."""
    crm = CRMS.get(name or "")
    if crm is not None:
        return crm.label
    return default if default is not None else str(name)
