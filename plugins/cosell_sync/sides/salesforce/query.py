"""Salesforce reads: SOQL built with :mod:`cosell_sync.hooks.soql` (every value escaped), IN lists
chunked to keep the GET URL short (a few chunks read at once); the extract of opportunities with
their account and primary contact, and the audit trail (with ``SystemModstamp``) read right
before a write.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from cosell_sync.errors import AuthenticationError, ConfigurationError
from cosell_sync.hooks.pool import map_on_threads
from cosell_sync.hooks.soql import Condition, literal, select
from cosell_sync.sides.base import missing
from cosell_sync.sides.crm import Selection
from cosell_sync.sides.salesforce.writes import error_of

log = logging.getLogger(__name__)
T = TypeVar("T")


IN_LIMIT = 200  # values per IN (...) list
IN_CHARS = 8000  # and at most this many characters of literals, so the GET query URL stays short
CONTACT_ROLES = "OpportunityContactRoles"  # the child relationship from Opportunity
# Chunked queries (IN lists) sent at once: short requests, far below Salesforce's limit of 25
# concurrent long-running (over 20 s) requests per org.
PARALLEL_QUERIES = 4
_SF_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")


def valid_id(value: Any) -> str | None:
    text = None if missing(value) else str(value).strip()
    return text if text and _SF_ID.fullmatch(text) else None


def _chunks(values: Sequence[Any], limit: int = IN_LIMIT, chars: int = IN_CHARS) -> Iterator[list[Any]]:
    """``values`` in IN-list sized pieces: at most ``limit`` values and about ``chars`` characters."""
    chunk: list[Any] = []
    size = 0
    for value in values:
        width = len(literal(value)) + 2
        if chunk and (len(chunk) >= limit or size + width > chars):
            yield chunk
            chunk, size = [], 0
        chunk.append(value)
        size += width
    if chunk:
        yield chunk


def _strip_attributes(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_attributes(v) for k, v in value.items() if k != "attributes"}
    if isinstance(value, list):
        return [_strip_attributes(v) for v in value]
    return value


def as_aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _stamp(value: Any) -> datetime | None:
    """A ``SystemModstamp`` as an aware datetime ("...+0000", "...Z", "...+00:00"); None if unreadable."""
    if isinstance(value, datetime):
        return as_aware(value)
    try:
        return as_aware(datetime.fromisoformat(re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", str(value).strip())))
    except ValueError:
        return None


def same_stamp(a: Any, b: Any) -> bool:
    """Two ``SystemModstamp`` values name the same instant (texts compared when one is unreadable)."""
    ta, tb = _stamp(a), _stamp(b)
    if ta is None or tb is None:
        return str(a).strip() == str(b).strip()
    return ta == tb


class SalesforceReads:
    """The side's queries and its extract."""

    def _query(self, soql: str) -> list[dict[str, Any]]:
        return [_strip_attributes(r) for r in self.hook.query_records(soql)]

    def _each_chunk(self, work: Callable[[list[Any]], T], values: Sequence[Any]) -> list[tuple[list[Any], T]]:
        """``work`` over ``values`` in IN-list chunks, :data:`PARALLEL_QUERIES` at once: (chunk,
        its result) in the chunks' order; the first chunk's exception, if any, once all ended."""
        chunks = list(_chunks(values))
        if len(chunks) > 1:
            self.hook.conn  # noqa: B018 - the connection is made once, before the threads share it
        results = map_on_threads(work, chunks, PARALLEL_QUERIES) if len(chunks) > 1 else [work(c) for c in chunks]
        return list(zip(chunks, results, strict=True))

    def _query_in(
        self,
        sobject: str,
        fields: Sequence[str],
        field: str,
        values: Iterable[Any],
        *,
        order_by: Sequence[str] = (),
        extra: Sequence[Condition] = (),
    ) -> list[dict[str, Any]]:
        """Every record whose ``field`` is one of ``values`` (IN lists chunked), de-duplicated by Id."""
        distinct = list(dict.fromkeys(v for v in values if v is not None and v != ""))
        out: dict[str, dict[str, Any]] = {}

        def read(chunk: list[Any]) -> list[dict[str, Any]]:
            return self._query(select(sobject, fields, [*extra, Condition(field, "IN", chunk)], order_by=order_by))

        for _, records in self._each_chunk(read, distinct):
            for record in records:
                out.setdefault(record["Id"], record)
        return list(out.values())

    def _read_audit(
        self,
        values: Sequence[str],
        *,
        by: str = "Id",
        stamps: dict[str, str | None] | None = None,
        links: dict[str, str | None] | None = None,
    ) -> tuple[dict[str, str | None], dict[str, tuple[str, str]]]:
        """The audit field of the opportunities whose ``by`` field is one of ``values``:
        (key -> text, key -> (error, code) for values whose read failed). Keys: an Id's
        15-character (case-sensitive) form, or the case-folded value of another field.
        ``stamps``: also read each one's ``SystemModstamp`` (same query) into it, by the same key;
        ``links``: the same for the referral id it holds."""
        key: Callable[[Any], str] = (lambda v: str(v)[:15]) if by == "Id" else (lambda v: str(v).casefold())
        audit: dict[str, str | None] = {}
        failed: dict[str, tuple[str, str]] = {}
        extra = [*(["SystemModstamp"] if stamps is not None else []), *([self.link_field] if links is not None else [])]
        fields = list(dict.fromkeys(["Id", by, self.audit_field, *extra]))

        def read(chunk: list[Any]) -> list[dict[str, Any]] | tuple[str, str]:
            try:
                return self._query(select(self.opportunity, fields, [Condition(by, "IN", chunk)]))
            except (AuthenticationError, ConfigurationError):
                raise
            except Exception as exc:
                return error_of(exc)

        for chunk, answer in self._each_chunk(read, list(dict.fromkeys(values))):
            if isinstance(answer, tuple):
                failed.update({key(v): answer for v in chunk})
                continue
            for record in answer:
                audit[key(record[by])] = record.get(self.audit_field)
                if stamps is not None:
                    stamps[key(record[by])] = record.get("SystemModstamp")
                if links is not None:
                    links[key(record[by])] = record.get(self.link_field)
        return audit, failed

    def extract_fields(self) -> list[str]:
        """The Opportunity fields (and parent relationship paths) read by :meth:`extract`."""
        r = self.mapping.records
        wanted = [
            "Id",
            "AccountId",
            "SystemModstamp",
            "IsClosed",
            *[fm.crm for fm in self.opp_fields],
            r["link_field"],
            r["link_url_field"],
            r["sync_flag_field"],
            r["audit_field"],
            r["sync_status_field"],
            r["modified_field"],
            r["closed_field"],
            *[f"{self.account}.{f}" for _, f in self.account_fields],
            *self.parent_paths,
        ]
        seen: set[str] = set()
        out = []
        for item in wanted:
            if item.lower() not in seen:  # SOQL refuses a field selected twice
                seen.add(item.lower())
                out.append(item)
        return out

    def _contact_subquery(self) -> str:
        fields = {"contactid": "ContactId"}
        for _, f in self.contact_fields:
            if f.lower() != "id":
                fields.setdefault(f"contact.{f.lower()}", f"Contact.{f}")
        return select(CONTACT_ROLES, list(fields.values()), [Condition("IsPrimary", "=", True)])

    def _extract_soql(self, where: Sequence[Condition]) -> str:
        outer = select(self.opportunity, self.extract_fields(), where, order_by=["SystemModstamp", "Id"])
        # The child subquery is itself built by select() (names checked, values escaped); it goes
        # into the field list, which select() only accepts as plain names.
        head = f" FROM {self.opportunity}"
        return outer.replace(head, f", ({self._contact_subquery()}){head}", 1)

    def _flatten(self, record: dict[str, Any]) -> dict[str, Any]:
        roles = record.pop(CONTACT_ROLES, None)
        rows = roles.get("records") if isinstance(roles, dict) else None
        contact = None
        if rows:
            role = rows[0]
            nested = role.get("Contact") or {}
            contact = {"Id": role.get("ContactId"), **{k: v for k, v in nested.items() if k != "Id"}}
        record[self.contact] = contact
        return record

    def read_opportunities(self, which: Selection) -> list[dict[str, Any]]:
        """Opportunities as nested records (``Account``: the account's mapped fields, ``Contact``:
        the primary contact or None), ordered by ``SystemModstamp, Id``.

        ``since``/``until``: ``SystemModstamp > since`` and ``<= until`` (naive datetimes are UTC).
        ``crm_ids``/``referral_ids``: only these (the union when both are given); an empty list
        selects nothing, and ids that cannot be Salesforce ids are skipped (they match nothing,
        and Salesforce would refuse the whole query). No arguments: every opportunity.
        """
        since, until, crm_ids, referral_ids = which.since, which.until, which.crm_ids, which.referral_ids
        window: list[Condition] = []
        if since is not None:
            window.append(Condition("SystemModstamp", ">", as_aware(since)))
        if until is not None:
            window.append(Condition("SystemModstamp", "<=", as_aware(until)))
        if crm_ids is None and referral_ids is None:
            return [self._flatten(r) for r in self._query(self._extract_soql(window))]
        filters: list[tuple[str, list[Any]]] = []
        if crm_ids is not None:
            valid = [v for v in (valid_id(i) for i in crm_ids) if v]
            skipped = len([i for i in crm_ids if not missing(i)]) - len(valid)
            if skipped:
                log.warning("Skipped %d value(s) that are not Salesforce ids", skipped)
            filters.append(("Id", list(dict.fromkeys(valid))))
        if referral_ids is not None:
            refs = [str(i) for i in referral_ids if not missing(i) and str(i) != ""]
            filters.append((self.link_field, list(dict.fromkeys(refs))))
        found: dict[str, dict[str, Any]] = {}
        for field, values in filters:

            def read(chunk: list[Any], field: str = field) -> list[dict[str, Any]]:
                return self._query(self._extract_soql([*window, Condition(field, "IN", chunk)]))

            for _, records in self._each_chunk(read, values):
                for record in records:
                    found.setdefault(record["Id"], record)
        records = sorted(found.values(), key=lambda r: (r.get("SystemModstamp") or "", r["Id"]))
        return [self._flatten(r) for r in records]
