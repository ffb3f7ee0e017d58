"""Records of the Dataverse emulator: the web service's errors, request helpers (preferences,
ETags, keys), behaviour switches, and the row store with change tracking and transactions."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..server import Headers, HTTPError, Request, Response
from .choices import DEFAULT_CHOICE_BASE
from .schema import _GUID_RE, _KEY_PAIR, API, DELTA_TOKEN_LIFETIME, EDM, JSON_TYPE, TABLES, Column, Table

# ---------------------------------------------------------------------------
# Errors (codes from the Dataverse web service error codes reference)


def _err(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTTPError:
    return HTTPError(status, code, message, headers=headers)


def _not_found(table: Table, row_id: str) -> HTTPError:
    # ObjectDoesNotExist, 404 (the Web API maps 0x80040217 to 404).
    return _err(404, "0x80040217", f"Entity '{table.logical}' With Id = {row_id} Does Not Exist")


def _key_not_found(table: Table) -> HTTPError:
    # Observed for alternate-key misses: 0x80060891, 404.
    return _err(404, "0x80060891", f"A record with the specified key values does not exist in {table.logical} entity")


def _duplicate() -> HTTPError:
    # DuplicateRecord 0x80040237; the Web API answers 412 with this fixed message.
    return _err(412, "0x80040237", "A record with matching key values already exists.")


PAYLOAD_ERROR = "0x80048d19"
_HELP = (
    "For more information on this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293"
)


def payload_error(detail: str, entity: str = "") -> HTTPError:
    """The error Dataverse returns when it cannot read a payload (code 0x80048d19)."""
    return HTTPError(
        400,
        PAYLOAD_ERROR,
        f"Error identified in Payload provided by the user for Entity :'{entity}', {_HELP}  ---->  "
        f"InnerException : {detail}",
    )


def _payload(table: Table | None, inner: str) -> HTTPError:
    return payload_error(inner, table.set if table else "")


def _query_error(message: str) -> HTTPError:
    return _err(400, "0x80060888", message)


def _validation(message: str) -> HTTPError:
    return _err(400, "0x80044331", message)


def _invalid_property(table: Table, name: str) -> HTTPError:
    return _payload(
        table,
        f"Microsoft.Crm.CrmException: Invalid property '{name}' was found in entity '{table.type_name}'. ---> "
        f"Microsoft.OData.ODataException: The property '{name}' does not exist on type '{table.type_name}'. "
        "Make sure to only use property names that are defined by the type or mark the type as open type.",
    )


def _undeclared(table: Table, name: str) -> HTTPError:
    return _payload(
        table,
        f"Microsoft.OData.ODataException: An undeclared property '{name}' which only has property annotations in "
        "the payload but no property value was found in the payload. In OData, only declared navigation properties "
        "and declared named streams can be represented as properties without values.",
    )


def _unknown_property(table: Table, name: str) -> HTTPError:
    return _query_error(f"Could not find a property named '{name}' on type '{table.type_name}'.")


def _not_convertible(table: Table, value: Any, column: Column) -> HTTPError:
    shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return _payload(
        table,
        f"Microsoft.OData.ODataException: Cannot convert the literal '{shown}' to the expected type "
        f"'{EDM[column.kind]}'.",
    )


def _segment_not_found(segment: str) -> HTTPError:
    return _err(404, "0x8006088a", f"Resource not found for the segment '{segment}'.")


def _throttle(code: str, message: str, retry_after: float) -> HTTPError:
    return _err(429, code, message, {"Retry-After": str(max(1, math.ceil(retry_after)))})


# ---------------------------------------------------------------------------
# Small helpers


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _etag(row: dict[str, Any]) -> str:
    return f'W/"{row["versionnumber"]}"'


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(status, json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    resp.headers.set("Content-Type", JSON_TYPE)
    for key, value in (headers or {}).items():
        resp.headers.set(key, value)
    return resp


@dataclass
class Preferences:
    maxpagesize: int | None = None
    track_changes: bool = False
    return_representation: bool = False
    continue_on_error: bool = False


def _preferences(headers: Headers) -> Preferences:
    """Every ``Prefer`` header, comma-separated or repeated (quoted values may hold commas)."""
    prefs = Preferences()
    for key, raw in headers.items():
        if key.lower() != "prefer":
            continue
        for item in re.findall(r'(?:[^,"]|"[^"]*")+', raw):
            name, _, value = item.strip().partition("=")
            name = name.strip().lower()
            if name == "odata.maxpagesize":
                with contextlib.suppress(ValueError):
                    prefs.maxpagesize = int(value.strip().strip('"'))
            elif name == "odata.track-changes":
                prefs.track_changes = True
            elif name == "return" and value.strip().lower() == "representation":
                prefs.return_representation = True
            elif name == "odata.continue-on-error":
                prefs.continue_on_error = True
    return prefs


FORMATTED_VALUE = "OData.Community.Display.V1.FormattedValue"


def _wants_formatted_values(headers: Headers) -> bool:
    """``Prefer: odata.include-annotations="OData.Community.Display.V1.FormattedValue"`` (or ``"*"``, or a
    namespace wildcard): reads carry ``<column>@OData.Community.Display.V1.FormattedValue`` (Microsoft
    Learn, "Query data using the Web API: formatted values")."""
    for key, raw in headers.items():
        if key.lower() != "prefer":
            continue
        for item in re.findall(r'(?:[^,"]|"[^"]*")+', raw):
            name, _, value = item.strip().partition("=")
            if name.strip().lower() != "odata.include-annotations":
                continue
            for pattern in value.strip().strip('"').split(","):
                pattern = pattern.strip()
                if pattern.startswith("-"):
                    continue
                if (
                    pattern == "*"
                    or pattern == FORMATTED_VALUE
                    or (pattern.endswith(".*") and FORMATTED_VALUE.startswith(pattern[:-1]))
                ):
                    return True
    return False


def _restore(store: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        store.pop(key, None)
    else:
        store[key] = value


def _etag_matches(header: str, row: dict[str, Any]) -> bool:
    """``If-Match`` / ``If-None-Match``: ``*`` or a list of (weak) ETags."""
    if header.strip() == "*":
        return True
    wanted = re.findall(r'"([^"]*)"', header) or [header.strip()]
    return str(row["versionnumber"]) in wanted


def _condition(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    # Clients routinely send "If-None-Match: null" on every request; it means no condition.
    if value is None or not value.strip() or value.strip().lower() == "null":
        return None
    return value.strip()


@dataclass(frozen=True)
class KeyRef:
    kind: str  # "id" or "alt"
    value: str  # the id, or the alternate key value

    def segment(self, table: Table) -> str:
        if self.kind == "id":
            return f"{table.set}({self.value})"
        escaped = self.value.replace("'", "''")
        return f"{table.set}({table.alternate_key}='{escaped}')"


def _parse_key(table: Table, text: str) -> KeyRef:
    """``(<guid>)``, ``(<pk>=<guid>)`` or ``(<alternate key>='value')`` (quotes doubled)."""
    text = text.strip()
    if _GUID_RE.match(text):
        return KeyRef("id", text.lower())
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _KEY_PAIR.match(text, pos)
        if not match:
            raise _query_error(f"Bad Request - Error in query syntax: the key '({text})' is not valid.")
        pairs.append((match.group(1), match.group(2)))
        pos = match.end()
    if len(pairs) != 1:
        raise _query_error(f"The key '({text})' does not match any key defined for entity '{table.logical}'.")
    name, literal = pairs[0]
    if name == table.pk and _GUID_RE.match(literal):
        return KeyRef("id", literal.lower())
    if name == table.alternate_key and literal.startswith("'"):
        return KeyRef("alt", literal[1:-1].replace("''", "'"))
    raise _query_error(
        f"The key attribute '{name}' does not match any alternate key defined for entity '{table.logical}'."
    )


# ---------------------------------------------------------------------------
# Behaviour switches and parsed query options


@dataclass
class DataverseConfig:
    """Behaviour switches (control plane ``/_sandbox/config``)."""

    enforce_required: bool = True
    # Dataverse lets the API update a won/lost opportunity (only quotes, orders and invoices are
    # read-only when inactive); "reject" makes the sandbox refuse such writes instead.
    closed_opportunity_writes: str = "allow"
    delta_token_lifetime_seconds: float = DELTA_TOKEN_LIFETIME
    # The option value base of the publisher's custom choice columns (cosell_*): their options are
    # base + 0, base + 1, ... (a publisher's option value prefix x 10,000, e.g. 858,880,000).
    choice_value_base: int = DEFAULT_CHOICE_BASE
    # False: an org without the cosell_* columns and key yet (for `cosell-sync setup dynamics365`).
    cosell_columns: bool = True
    # How long a new alternate key's index stays Pending before it is Active (built asynchronously).
    key_activation_seconds: float = 2.0


class StoreMixin:
    """The row store of :class:`Dynamics365Emulator` (callers hold ``self.lock``)."""

    # -- state primitives (callers hold self.lock) ----------------------------------------------
    def _log(self, table: Table, row_id: str) -> None:
        if self._undo is not None:
            self._undo.append(
                (
                    table,
                    row_id,
                    self.tables[table.set].get(row_id),
                    self._row_seq[table.set].get(row_id),
                    self._deleted[table.set].get(row_id),
                )
            )

    def _index(self, table: Table, row: dict[str, Any] | None, add: bool) -> None:
        if table.alternate_key is None or row is None or row.get(table.alternate_key) is None:
            return
        folded = str(row[table.alternate_key]).casefold()  # SQL's case-insensitive collation
        if add:
            self._alt[table.set][folded] = row[table.pk]
        elif self._alt[table.set].get(folded) == row[table.pk]:
            del self._alt[table.set][folded]

    def _store(self, table: Table, row: dict[str, Any]) -> None:
        row_id = row[table.pk]
        self._log(table, row_id)
        self._index(table, self.tables[table.set].get(row_id), add=False)
        self.tables[table.set][row_id] = row
        self._index(table, row, add=True)
        self._seq += 1
        self._row_seq[table.set][row_id] = self._seq
        self._deleted[table.set].pop(row_id, None)

    def _discard(self, table: Table, row_id: str) -> None:
        self._log(table, row_id)
        self._index(table, self.tables[table.set].pop(row_id), add=False)
        self._row_seq[table.set].pop(row_id, None)
        self._seq += 1
        self._deleted[table.set][row_id] = self._seq

    def _rollback(self, undo: list[tuple[Table, str, dict[str, Any] | None, int | None, int | None]]) -> None:
        for table, row_id, row, seq, deleted in reversed(undo):
            self._index(table, self.tables[table.set].get(row_id), add=False)
            _restore(self.tables[table.set], row_id, row)
            _restore(self._row_seq[table.set], row_id, seq)
            _restore(self._deleted[table.set], row_id, deleted)
            self._index(table, row, add=True)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All writes inside apply together or not at all (nestable; hold self.lock)."""
        outer, self._undo = self._undo, []
        try:
            yield
        except BaseException:
            self._rollback(self._undo)
            self._undo = outer
            raise
        if outer is not None:
            outer.extend(self._undo)
        self._undo = outer

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    # -- tables and rows ---------------------------------------------------------------------
    def _table(self, name: str) -> Table:
        table = TABLES.get(name)
        if table is None:
            raise _segment_not_found(name)
        return table

    def _writable(self, name: str) -> Table:
        table = self._table(name)
        if table.read_only:
            # PrivilegeDenied (0x80040220), which the Web API answers with 403.
            raise _err(403, "0x80040220", "The user does not hold the necessary privileges.")
        return table

    def _find(self, table: Table, ref: KeyRef) -> dict[str, Any] | None:
        if ref.kind == "id":
            return self.tables[table.set].get(ref.value)
        if not self._key_active(table):  # no key yet, or its index is still being built
            raise _query_error(
                f"The key attribute '{table.alternate_key}' does not match any alternate key defined for entity "
                f"'{table.logical}'."
            )
        row_id = self._alt[table.set].get(ref.value.casefold())
        return self.tables[table.set].get(row_id) if row_id else None

    def _missing(self, table: Table, ref: KeyRef) -> HTTPError:
        return _not_found(table, ref.value) if ref.kind == "id" else _key_not_found(table)

    def _url(self, path: str) -> str:
        return f"{self.audience()}{API}/{path}"

    def _public(self, table: Table, row: dict[str, Any], select: list[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": _etag(row)}
        formatted = getattr(self._local, "formatted", False)
        for name in select if select is not None else self._names(table):
            if name != table.pk:
                out[name] = row.get(name)
                if formatted and row.get(name) is not None:
                    label = self._formatted(table, name, row[name])
                    if label is not None:
                        out[f"{name}@{FORMATTED_VALUE}"] = label
        out[table.pk] = row[table.pk]
        return out

    def _formatted(self, table: Table, name: str, value: Any) -> str | None:
        """A choice column's option label (or Yes/No), as the FormattedValue annotation carries it."""
        column = table.column(name)
        if column is not None and column.kind == "choice":
            return self.metadata.label(table.logical, name, value)
        if column is not None and column.kind == "bool":
            return "Yes" if value else "No"
        return None

    def _context(self, table: Table, select: list[str] | None, suffix: str = "") -> str:
        columns = f"({','.join(select)})" if select else ""
        return f"{self.audience()}{API}/$metadata#{table.set}{columns}{suffix}"
