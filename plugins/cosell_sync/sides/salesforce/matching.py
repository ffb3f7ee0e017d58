"""Salesforce accounts and contacts of new opportunities: matched (accounts by name + postal
code, contacts by e-mail) or created, and the contact made the primary contact role.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from cosell_sync.errors import AuthenticationError, ConfigurationError
from cosell_sync.hooks.soql import Condition
from cosell_sync.sides.base import RunContext, match_key, plain
from cosell_sync.sides.crm import NEW_ID, Pending
from cosell_sync.sides.salesforce.writes import error_of

log = logging.getLogger(__name__)


ROLE_ATTEMPTS = 3  # tries of the primary contact roles of new opportunities (see _ensure_roles)
CREATE_ATTEMPTS = 3  # tries of the accounts and contacts of new opportunities (see _tried_again)
ROLE_OBJECT = "OpportunityContactRole"


class SalesforceMatching:
    """The create steps ``ensure_accounts`` and ``ensure_contacts``, and the contact roles."""

    def ensure_accounts(self, rows: list[Pending], ctx: RunContext) -> None:
        errors = [r.error for r in rows]
        account_ids = self._tried_again(self._ensure_accounts, [r.values for r in rows], errors)
        for row, account_id, error in zip(rows, account_ids, errors, strict=True):
            row.account_id = account_id
            if error is not None:
                row.fail(*error)

    def ensure_contacts(self, rows: list[Pending], ctx: RunContext) -> None:
        errors = [r.error for r in rows]
        contact_ids = self._tried_again(
            self._ensure_contacts, [r.values for r in rows], errors, [r.account_id for r in rows]
        )
        for row, contact_id, error in zip(rows, contact_ids, errors, strict=True):
            row.contact_id = contact_id
            if error is not None:
                row.fail(*error)

    @staticmethod
    def _tried_again(
        ensure: Callable[..., list[str | None]],
        values: list[dict[str, Any]],
        errors: list[tuple[str, str] | None],
        *columns: list[Any],
    ) -> list[str | None]:
        """``ensure`` (match or create accounts, or contacts) for the rows, then again, up to
        :data:`CREATE_ATTEMPTS` times in all, for the rows it failed: a create whose call failed
        as a whole (a 500, a lost answer) is not sent again by the hook, as it may have landed;
        the next try looks it up first (found, it is used) and creates only what is missing.
        Without this, one transient fault costs the record a run."""
        failed_before = [e is not None for e in errors]  # not ours to try again
        ids = ensure(values, errors, *columns)
        for _ in range(CREATE_ATTEMPTS - 1):
            again = [i for i, e in enumerate(errors) if e is not None and not failed_before[i]]
            if not again:
                break
            sub_errors: list[tuple[str, str] | None] = [None] * len(again)
            sub_ids = ensure([values[i] for i in again], sub_errors, *([c[i] for i in again] for c in columns))
            for k, i in enumerate(again):
                ids[i], errors[i] = sub_ids[k], sub_errors[k]
        return ids

    def _lookup(
        self,
        query: Callable[[], list[dict[str, Any]]],
        keys: Sequence[Any],
        errors: list[tuple[str, str] | None],
        what: str,
    ) -> list[dict[str, Any]] | None:
        """``query()``'s records; if it fails (for a reason about records, not the task), every
        row with a key fails with ``what`` and the error, and None."""
        try:
            return query()
        except (AuthenticationError, ConfigurationError):
            raise
        except Exception as exc:
            message, code = error_of(exc)
            for i, key in enumerate(keys):
                if key is not None:
                    errors[i] = (f"{what}: {message}", code)
            return None

    def _create_missing(
        self, sobject: str, missing: list[str], payloads: list[dict[str, Any]], label: Callable[[str], str]
    ) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
        """One new ``sobject`` record per key of ``missing`` (``payloads`` in the same order):
        (key -> new Id, key -> (message, code) for those not created)."""
        created: dict[str, str] = {}
        failed: dict[str, tuple[str, str]] = {}
        if self.previewed is not None:  # a preview: recorded, not created
            pairs = zip(missing, payloads, strict=True)
            self.previewed += [{"object": sobject, "key": k, "values": v} for k, v in pairs]
            return dict.fromkeys(missing, NEW_ID), failed
        for key, outcome in zip(missing, self._write("create", sobject, payloads), strict=True):
            if outcome.ok and outcome.id:
                created[key] = outcome.id
            else:
                failed[key] = (f"{label(key)}: {outcome.error or 'not created'}", outcome.code or "UNKNOWN")
        return created, failed

    def _primary_roles(self, opportunities: Sequence[str]) -> set[str]:
        """The opportunities (15-character ids) of ``opportunities`` that have a primary contact role."""
        roles = self._query_in(
            ROLE_OBJECT,
            ["Id", "OpportunityId"],
            "OpportunityId",
            opportunities,
            extra=[Condition("IsPrimary", "=", True)],
        )
        return {str(r["OpportunityId"])[:15] for r in roles}

    def _ensure_accounts(self, rows: list[dict[str, Any]], errors: list[tuple[str, str] | None]) -> list[str | None]:
        """Per row: the Id of the account matched (or created) by name + postal code; rows whose
        account cannot be found or created get that account's error."""
        n = len(rows)
        account_ids: list[str | None] = [None] * n
        name_fm = self._field_for(f"{self.account}.Name")
        if name_fm is None:
            return account_ids
        postal_fm = self._field_for(f"{self.account}.BillingPostalCode")

        def account_key(row: dict[str, Any]) -> str | None:
            account_name = plain(row.get(name_fm.name))
            if account_name is None or not str(account_name).strip():
                return None
            return match_key(account_name, plain(row.get(postal_fm.name)) if postal_fm else None)

        keys, first_row = _keyed(rows, errors, account_key)
        if not first_row:
            return account_ids

        # Existing accounts: by name (as given, and with its spaces collapsed) and by postal code
        # (as given, and without spaces), matched here on the normalized key.
        names: list[str] = []
        postals: list[str] = []
        for i in first_row.values():
            account_name = str(plain(rows[i].get(name_fm.name))).strip()
            names += [account_name, " ".join(account_name.split())]
            postal = plain(rows[i].get(postal_fm.name)) if postal_fm else None
            if postal is not None and str(postal).strip():
                postals += [str(postal).strip(), re.sub(r"\s+", "", str(postal))]
        fields = ["Id", "Name", "BillingPostalCode", "CreatedDate"]
        order = ["CreatedDate", "Id"]
        found = self._lookup(
            lambda: (
                self._query_in(self.account, fields, "Name", names, order_by=order)
                + self._query_in(self.account, fields, "BillingPostalCode", postals, order_by=order)
            ),
            keys,
            errors,
            "account lookup",
        )
        if found is None:
            return account_ids
        by_key: dict[str, str] = {}
        for record in sorted(found, key=lambda r: (r.get("CreatedDate") or "", r["Id"])):
            by_key.setdefault(match_key(record.get("Name"), record.get("BillingPostalCode")), record["Id"])

        missing = [key for key in first_row if key not in by_key]
        payloads = [self._side_fields(rows[first_row[key]], self.account_fields) for key in missing]
        created, failed = self._create_missing(
            self.account, missing, payloads, lambda key: f"account '{plain(rows[first_row[key]].get(name_fm.name))}'"
        )
        by_key.update(created)
        for i, key in enumerate(keys):
            if key is None:
                continue
            if key in failed:
                errors[i] = failed[key]
            else:
                account_ids[i] = by_key[key]
        return account_ids

    def _ensure_contacts(
        self, rows: list[dict[str, Any]], errors: list[tuple[str, str] | None], account_ids: list[str | None]
    ) -> list[str | None]:
        """Per row: the Id of the contact matched (or created) by email; a contact that cannot be
        created fails its rows (the deal is retried with its contact, never silently without)."""
        n = len(rows)
        contact_ids: list[str | None] = [None] * n
        email_fm = self._field_for(f"{self.contact}.Email")
        if email_fm is None:
            return contact_ids

        def email_key(row: dict[str, Any]) -> str | None:
            email = plain(row.get(email_fm.name))
            return None if email is None or not str(email).strip() else str(email).strip().lower()

        emails, first_row = _keyed(rows, errors, email_key)
        if not first_row:
            return contact_ids
        fields = ["Id", "Email", "AccountId", "CreatedDate"]
        found = self._lookup(
            lambda: self._query_in(self.contact, fields, "Email", list(first_row), order_by=["CreatedDate", "Id"]),
            emails,
            errors,
            "contact lookup",
        )
        if found is None:
            return contact_ids
        existing: dict[str, list[dict[str, Any]]] = {}
        for record in sorted(found, key=lambda r: (r.get("CreatedDate") or "", r["Id"])):
            if record.get("Email"):
                existing.setdefault(str(record["Email"]).strip().lower(), []).append(record)

        missing = [email for email in first_row if email not in existing]
        payloads = []
        for email in missing:
            i = first_row[email]
            values = self._side_fields(rows[i], self.contact_fields)
            if not values.get("LastName"):
                values["LastName"] = email.split("@", 1)[0]  # LastName is required by Salesforce
            if account_ids[i]:
                values["AccountId"] = account_ids[i]
            payloads.append(values)
        created, failed = self._create_missing(self.contact, missing, payloads, lambda email: f"contact '{email}'")
        for i, email in enumerate(emails):
            if email is None:
                continue
            if email in failed:
                errors[i] = failed[email]
            elif email in created:
                contact_ids[i] = created[email]
            else:
                candidates = existing[email]
                same_account = [c for c in candidates if account_ids[i] and c.get("AccountId") == account_ids[i]]
                contact_ids[i] = (same_account or candidates)[0]["Id"]
        return contact_ids

    def _ensure_roles(
        self,
        items: list[tuple[int, str | None, str | None, bool | None]],
        errors: list[tuple[str, str] | None],
    ) -> None:
        """The contact as the primary contact role of each opportunity (row, opp id, contact id,
        created). An opportunity that existed already (a rerun) gets one only if it has no primary
        contact yet, so a rerun never adds a second role and never overrides a seller's choice."""
        wanted = [(i, opp, contact) for i, opp, contact, _ in items if opp and contact]
        if not wanted:
            return
        rerun = [opp for i, opp, contact, created in items if opp and contact and not created]
        has_primary: set[str] = set()
        if rerun:
            try:
                has_primary = self._primary_roles(rerun)
            except (AuthenticationError, ConfigurationError):
                raise
            except Exception as exc:
                message, code = error_of(exc)
                for i, opp, _contact, created in items:
                    if opp in rerun and not created:
                        errors[i] = (f"contact role lookup: {message}", code)
                rerun_failed = set(rerun)
                wanted = [w for w in wanted if w[1] not in rerun_failed]
        todo = [(i, opp, contact) for i, opp, contact in wanted if str(opp)[:15] not in has_primary]
        for attempt in range(1, ROLE_ATTEMPTS + 1):
            payloads = [{"OpportunityId": opp, "ContactId": contact, "IsPrimary": True} for _, opp, contact in todo]
            failed = []
            for item, outcome in zip(todo, self._write("create", ROLE_OBJECT, payloads), strict=True):
                if outcome.ok:
                    errors[item[0]] = None  # an earlier attempt's error is mended
                else:
                    failed.append(item)
                    errors[item[0]] = (
                        f"primary contact role: {outcome.error or 'not created'}",
                        outcome.code or "UNKNOWN",
                    )
            if not failed or attempt == ROLE_ATTEMPTS:
                return
            # A role that failed is created nowhere else: once the opportunity is linked, the
            # next run does not create it again. So it is tried again now, after looking which
            # ones exist (a create whose answer was lost did create them).
            try:
                landed = self._primary_roles([opp for _, opp, _ in failed])
            except (AuthenticationError, ConfigurationError):
                raise
            except Exception:
                log.warning("Salesforce: could not look for the contact roles that failed", exc_info=True)
                return
            todo = []
            for i, opp, contact in failed:
                if str(opp)[:15] in landed:
                    errors[i] = None
                else:
                    todo.append((i, opp, contact))
            if not todo:
                return


def _keyed(
    rows: list[dict[str, Any]], errors: list[tuple[str, str] | None], key_of: Callable[[dict[str, Any]], str | None]
) -> tuple[list[str | None], dict[str, int]]:
    """Each row's match key (None: the row failed already, or has nothing to match on), and
    the first row of each key."""
    keys: list[str | None] = [None] * len(rows)
    first_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        if errors[i] is None:
            keys[i] = key = key_of(row)
            if key is not None:
                first_row.setdefault(key, i)
    return keys, first_row
