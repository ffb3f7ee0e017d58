"""The Dynamics 365 extract: opportunities modified in a window (or named), each with its
``account``, ``contact`` and ``transactioncurrency`` nested, read through OData.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from cosell_sync.hooks.odata import eq
from cosell_sync.sides.base import (
    missing,
)
from cosell_sync.sides.crm import Selection
from cosell_sync.sides.dynamics365.values import (
    ACCOUNT,
    ACCOUNT_LOOKUP,
    CONTACT,
    CONTACT_LOOKUP,
    CURRENCY,
    CURRENCY_CODE,
    CURRENCY_LOOKUP,
    chunks,
    every_row,
    is_guid,
)

log = logging.getLogger(__name__)


class DynamicsReads:
    """The extract."""

    def opportunity_select(self) -> list[str]:
        """The opportunity columns an extract reads."""
        columns = [
            self.opportunity_pk,
            *(fm.crm for fm in self.opportunity_fields.values()),
            self.closed_field,
            "statecode",
            "statuscode",
            self.modified_field,
            "modifiedon",
            f"_{ACCOUNT_LOOKUP}_value",
            f"_{CONTACT_LOOKUP}_value",
            f"_{CURRENCY_LOOKUP}_value",
            self.link_field,
            self.link_url_field,
            self.sync_flag_field,
            self.sync_status_field,
            self.audit_field,
        ]
        return list(dict.fromkeys(columns))

    def read_opportunities(self, which: Selection) -> list[dict[str, Any]]:
        """Opportunities modified in ``(since, until]`` (every one when neither is given), or,
        with ``crm_ids`` and/or ``referral_ids``, those opportunities (an empty list names none),
        each with its ``account``, ``contact`` and ``transactioncurrency`` nested."""
        since, until, crm_ids, referral_ids = which.since, which.until, which.crm_ids, which.referral_ids
        filters: list[str | None]
        if crm_ids is None and referral_ids is None:
            filters = [None]
        else:
            clauses: list[str] = []
            for crm_id in dict.fromkeys(str(i).strip() for i in crm_ids or [] if not missing(i)):
                if is_guid(crm_id):
                    clauses.append(eq(self.opportunity_pk, uuid.UUID(crm_id)))
                else:
                    log.warning("dynamics365 extract: %r is not an opportunity id (GUID); skipped", crm_id)
            for referral_id in dict.fromkeys(str(i) for i in referral_ids or [] if not missing(i) and str(i)):
                clauses.append(eq(self.link_field, referral_id))
            filters = [" or ".join(chunk) for chunk in chunks(clauses, self.id_chunk)]
        rows: dict[str, dict[str, Any]] = {}
        select = self.opportunity_select()

        def read(flt: str | None) -> list[dict[str, Any]]:
            return list(
                self.hook.read_modified_since(self.opportunity_set, since, select=select, extra_filter=flt, until=until)
            )

        # Reads by id (a load's lookups before its creates: 200 of them for 10,000 referrals) go
        # out as many at a time as the org's x-ms-dop-hint says; rows merged in filter order.
        for found in self.hook.map_concurrently(read, filters):
            for row in found:
                rows.setdefault(str(row[self.opportunity_pk]).lower(), row)
        records = sorted(rows.values(), key=lambda r: (str(r.get("modifiedon") or ""), str(r[self.opportunity_pk])))
        self._nest(records)
        log.info("dynamics365 extract: %d opportunities", len(records))
        return records

    def _nest(self, records: list[dict[str, Any]]) -> None:
        account_ref, contact_ref, currency_ref = (
            f"_{ACCOUNT_LOOKUP}_value",
            f"_{CONTACT_LOOKUP}_value",
            f"_{CURRENCY_LOOKUP}_value",
        )
        accounts = self._read_by_ids(
            self.account_set,
            self.account_pk,
            [r[account_ref] for r in records if r.get(account_ref)],
            [self.account_pk, *dict.fromkeys(self.account_fields.values())],
        )
        contacts = self._read_by_ids(
            self.contact_set,
            self.contact_pk,
            [r[contact_ref] for r in records if r.get(contact_ref)],
            [self.contact_pk, *dict.fromkeys(self.contact_fields.values())],
        )
        currencies = self._currency_rows([r[currency_ref] for r in records if r.get(currency_ref)])
        for record in records:
            account_id, contact_id, currency_id = (record.get(k) for k in (account_ref, contact_ref, currency_ref))
            record[ACCOUNT] = accounts.get(str(account_id).lower()) if account_id else None
            record[CONTACT] = contacts.get(str(contact_id).lower()) if contact_id else None
            currency = currencies.get(str(currency_id).lower()) if currency_id else None
            record[CURRENCY] = {CURRENCY_CODE: currency.get(CURRENCY_CODE)} if currency else None

    def _read_by_ids(
        self, entity_set: str, pk: str, ids: Iterable[str], select: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """Rows by primary key, ``id eq a or id eq b ...`` in chunks read concurrently; keyed by the
        lowercase id."""
        wanted = list(dict.fromkeys(str(i).lower() for i in ids if is_guid(str(i))))
        filters = [" or ".join(eq(pk, uuid.UUID(i)) for i in chunk) for chunk in chunks(wanted, self.id_chunk)]
        answers = self.hook.query_each(entity_set, filters, select=select)
        return {str(row[pk]).lower(): row for row in every_row(answers)}

    def _currency_rows(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The currency table, read once (again only if an opportunity names an unknown currency)."""
        wanted = {str(i).lower() for i in ids}
        if not wanted:
            return self._currencies or {}
        if self._currencies is None or not wanted <= set(self._currencies):
            select = ["transactioncurrencyid", CURRENCY_CODE]
            self._currencies = {
                str(row["transactioncurrencyid"]).lower(): row
                for row in self.hook.query("transactioncurrencies", select=select)
            }
        return self._currencies
