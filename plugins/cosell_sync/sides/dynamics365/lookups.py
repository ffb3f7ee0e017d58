"""Accounts and contacts of new opportunities: matched (accounts by name + postal code, contacts
by e-mail, active ones first, then the oldest) or created in ``$batch`` with ids generated up
front, so a retried call cannot duplicate them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cosell_sync.hooks.batch import BatchRequest, BatchResponse
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.odata import eq, quote
from cosell_sync.sides.base import (
    RunContext,
    fails_the_task,
    match_key,
    missing,
)
from cosell_sync.sides.crm import NEW_ID, Pending
from cosell_sync.sides.dynamics365.batch import (
    DUPLICATE_RECORD,
    OUTCOMES,
    Outcomes,
    exception_error,
    response_error,
)
from cosell_sync.sides.dynamics365.values import (
    ACCOUNT_NAME,
    ACCOUNT_POSTAL_CODE,
    CONTACT_ACCOUNT_LOOKUP,
    CONTACT_EMAIL,
    CONTACT_LAST_NAME,
    chunks,
    email_key,
    every_row,
)

log = logging.getLogger(__name__)


LAST_NAME_MAX = 50  # contact.lastname length; the e-mail's local part is cut to fit


class DynamicsLookups:
    """The create steps ``ensure_accounts`` and ``ensure_contacts``."""

    def ensure_accounts(self, rows: list[Pending], ctx: RunContext) -> None:
        self._ensure_accounts(rows, ctx, OUTCOMES)

    def ensure_contacts(self, rows: list[Pending], ctx: RunContext) -> None:
        self._ensure_contacts(rows, ctx, OUTCOMES)

    def _ensure_accounts(self, rows: list[Pending], ctx: RunContext, outcomes: Outcomes) -> None:
        """Match each row's account by name + postal code (case- and space-insensitive), or create it."""
        if self._account_name is None:
            return
        need: dict[str, list[Pending]] = {}
        for row in rows:
            name = row.values.get(self._account_name)
            if missing(name) or not str(name).strip():
                continue
            postal = row.values.get(self._account_postal) if self._account_postal else None
            need.setdefault(match_key(name, postal), []).append(row)
        if not need:
            return
        found = self._find_accounts({key: str(group[0].values[self._account_name]) for key, group in need.items()})
        label = {key: f"account '{group[0].values[self._account_name]}'" for key, group in need.items()}
        creating: list[tuple[Pending, BatchRequest]] = []
        key_of: dict[int, str] = {}  # position of the group's first row -> match key
        for key, group in need.items():
            if key in found:
                continue
            try:
                body = self._nested_body(group[0].values, self.account_fields)
            except ValueError as exc:
                for row in group:
                    outcomes.fail(row, f"{label[key]}: {exc}")
                continue
            body[self.account_pk] = str(uuid.uuid4())  # known up front: a retry cannot duplicate it
            creating.append((group[0], BatchRequest("POST", self.account_set, body)))
            key_of[group[0].pos] = key

        self._create_grouped(creating, key_of, need, found, self.account_pk, label.__getitem__, outcomes)
        log.info("dynamics365 create: %d accounts matched, %d to create", len(need) - len(creating), len(creating))
        for key, group in need.items():
            for row in group:
                row.account_id = found.get(key)

    def _create_grouped(
        self,
        creating: list[tuple[Pending, BatchRequest]],
        key_of: Mapping[int, str],
        need: Mapping[str, list[Pending]],
        found: dict[str, str],
        pk: str,
        describe: Callable[[str], str],
        outcomes: Outcomes,
    ) -> None:
        """POST one new record per group (accounts by match key, contacts by e-mail) in
        ``$batch``: its id goes to ``found[key]`` (the id we generated when the answer has
        none), or every row of the group fails with the part's error.

        Each create names the id generated for it, so the hook sends the call again after a
        lost answer; a create that landed on the earlier send is then refused as DuplicateRecord.
        Such a record is read back by its id: found, it is the one we created."""
        if self.previewed is not None:  # a preview: recorded, not created
            for first, request in creating:
                key = key_of[first.pos]
                self.previewed.append({"object": request.url, "key": key, "values": dict(request.body or {})})
                found[key] = NEW_ID
            return
        request_of = {row.pos: request for row, request in creating}
        duplicate: list[tuple[Pending, str]] = []

        def failed(first: Pending, message: str, code: str | None = None) -> None:
            key = key_of[first.pos]
            for row in need[key]:
                outcomes.fail(row, f"{describe(key)}: {message}", code)

        def answered(first: Pending, resp: BatchResponse) -> None:
            generated = (request_of[first.pos].body or {}).get(pk)
            if resp.ok:
                found[key_of[first.pos]] = resp.entity_id or str(generated)
            elif resp.error_code == DUPLICATE_RECORD and generated:
                duplicate.append((first, str(generated).lower()))
            else:
                failed(first, *response_error(resp))

        self._run_batch(creating, answered, failed)
        if duplicate:
            self._landed(duplicate, request_of, pk, found, key_of, failed)

    def _landed(
        self,
        duplicate: list[tuple[Pending, str]],
        request_of: Mapping[int, BatchRequest],
        pk: str,
        found: dict[str, str],
        key_of: Mapping[int, str],
        failed: Callable[..., None],
    ) -> None:
        """Creates refused as DuplicateRecord: those whose generated id exists were ours (an
        earlier send of the call landed); the others fail with the refusal."""
        entity_set = request_of[duplicate[0][0].pos].url
        ids = [row_id for _, row_id in duplicate]
        exists: set[str] = set()
        try:
            for chunk in chunks(ids, self.id_chunk):
                flt = " or ".join(eq(pk, uuid.UUID(i)) for i in chunk)
                exists |= {str(r[pk]).lower() for r in self.hook.query(entity_set, select=[pk], filter=flt)}
        except Exception as exc:
            if fails_the_task(exc):
                raise
            message, code = exception_error(exc)
            for first, _ in duplicate:
                failed(first, f"reading back a create refused as a duplicate: {message}", code)
            return
        for first, row_id in duplicate:
            if row_id in exists:
                found[key_of[first.pos]] = row_id
            else:
                failed(first, "A record with matching key values already exists.", DUPLICATE_RECORD)

    def _find_accounts(self, wanted: Mapping[str, str]) -> dict[str, str]:
        """Existing accounts for match keys. Candidates are the accounts whose name starts with
        the name's first word (so a different spacing or case still finds them); they are
        compared on the match key. Active accounts win, then the oldest."""
        prefixes = sorted({name.split()[0] for name in wanted.values() if name.split()})
        select = [self.account_pk, ACCOUNT_NAME, "statecode", "createdon"]
        if self._account_postal:
            select.append(ACCOUNT_POSTAL_CODE)
        candidates: dict[str, list[dict[str, Any]]] = {}
        filters = [
            " or ".join(f"startswith({ACCOUNT_NAME},{quote(prefix)})" for prefix in chunk)
            for chunk in chunks(prefixes, self.id_chunk)
        ]
        for row in every_row(self.hook.query_each(self.account_set, filters, select=select)):
            postal = row.get(ACCOUNT_POSTAL_CODE) if self._account_postal else None
            key = match_key(row.get(ACCOUNT_NAME), postal)
            if key in wanted:
                candidates.setdefault(key, []).append(row)
        return {key: str(_preferred(rows)[self.account_pk]).lower() for key, rows in candidates.items()}

    def _ensure_contacts(self, rows: list[Pending], ctx: RunContext, outcomes: Outcomes) -> None:
        """Match each row's contact by e-mail (case-insensitive), or create it under the row's account."""
        if self._contact_email is None:
            return
        need: dict[str, list[Pending]] = {}
        for row in rows:
            email = email_key(row.values.get(self._contact_email))
            if email:
                need.setdefault(email, []).append(row)
        if not need:
            return
        select = [self.contact_pk, CONTACT_EMAIL, "statecode", "createdon"]
        candidates: dict[str, list[dict[str, Any]]] = {}
        filters = [" or ".join(eq(CONTACT_EMAIL, e) for e in chunk) for chunk in chunks(list(need), self.id_chunk)]
        for row in every_row(self.hook.query_each(self.contact_set, filters, select=select)):
            email = email_key(row.get(CONTACT_EMAIL))
            if email in need:
                candidates.setdefault(email, []).append(row)
        found = {email: str(_preferred(rows)[self.contact_pk]).lower() for email, rows in candidates.items()}
        creating: list[tuple[Pending, BatchRequest]] = []
        email_of: dict[int, str] = {}
        for email, group in need.items():
            if email in found:
                continue
            first = group[0]
            try:
                body = self._nested_body(first.values, self.contact_fields)
            except ValueError as exc:
                for row in group:
                    outcomes.fail(row, f"contact '{email}': {exc}")
                continue
            body.setdefault(CONTACT_EMAIL, email)
            if not body.get(CONTACT_LAST_NAME):  # required: fall back to the e-mail's local part
                body[CONTACT_LAST_NAME] = (email.partition("@")[0] or email)[:LAST_NAME_MAX]
            if first.account_id and first.account_id != NEW_ID:  # (a preview's new account has no id)
                body[f"{CONTACT_ACCOUNT_LOOKUP}@odata.bind"] = DynamicsHook.bind(self.account_set, first.account_id)
            body[self.contact_pk] = str(uuid.uuid4())
            creating.append((first, BatchRequest("POST", self.contact_set, body)))
            email_of[first.pos] = email

        self._create_grouped(
            creating, email_of, need, found, self.contact_pk, lambda email: f"contact '{email}'", outcomes
        )
        for email, group in need.items():
            for row in group:
                row.contact_id = found.get(email)


def _preferred(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of several matching accounts or contacts: active ones first, then the oldest."""
    return min(rows, key=lambda r: (r.get("statecode") or 0, str(r.get("createdon") or "")))
