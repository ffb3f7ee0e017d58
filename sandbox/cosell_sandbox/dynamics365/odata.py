"""A small OData ``$filter`` / ``$orderby`` evaluator for the sandbox emulators.

The Partner Center Referrals and Dataverse Web API emulators keep their records as
nested JSON dicts. This module compiles a ``$filter`` expression into a predicate over
such a record, parses ``$orderby`` and sorts records accordingly. Anything it cannot
understand raises :class:`ODataError`, whose message is meant for an HTTP 400 body.

Supported ``$filter`` grammar (keywords are case-insensitive)::

    or_expr    := and_expr ("or" and_expr)*
    and_expr   := unary ("and" unary)*
    unary      := "not" unary | primary
    primary    := "(" or_expr ")" | function | operand cmp_op operand
    function   := ("contains" | "startswith" | "endswith") "(" operand "," operand ")"
    cmp_op     := "eq" | "ne" | "gt" | "ge" | "lt" | "le"
    operand    := property path ("a/b/c") | 'string' | number | true | false | null
                  | datetime | date | guid

Evaluation never raises: a comparison between values of incompatible types is simply
false (for ``ne`` too), and any ordering comparison involving null is false.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

__all__ = [
    "FilterOptions",
    "ODataError",
    "compile_filter",
    "parse_orderby",
    "resolve_path",
    "sort_records",
]

Predicate = Callable[[Mapping[str, Any]], bool]

MAX_EXPRESSION_LENGTH = 4000
MAX_NESTING_DEPTH = 50
STRING_FUNCTIONS = frozenset({"contains", "startswith", "endswith"})

_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
_KEYWORDS = frozenset({"and", "or", "not", *_COMPARISONS})

# A token must not run straight into another word-ish character ("12ab", "a.b", "1-2").
_END = r"(?![\w.:/+-])"
_TOKEN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("guid", re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}" + _END, re.ASCII)),
    (
        "datetime",
        re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?" + _END, re.ASCII),
    ),
    ("date", re.compile(r"\d{4}-\d{2}-\d{2}" + _END, re.ASCII)),
    ("number", re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?" + _END, re.ASCII)),
    ("word", re.compile(r"[A-Za-z_]\w*(?:/[A-Za-z_]\w*)*" + _END, re.ASCII)),
)
_PATH_RE = re.compile(r"[A-Za-z_]\w*(?:/[A-Za-z_]\w*)*", re.ASCII)
_ISO_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?"
    r"(Z|z|[+-]\d{2}:?\d{2})?",
    re.ASCII,
)


class ODataError(ValueError):
    """Invalid $filter/$orderby; str(err) is a human-readable message suitable for an HTTP 400 error body."""


@dataclass(frozen=True)
class FilterOptions:
    """What a given emulator accepts in ``$filter``.

    ``allowed_paths``: when set, only these property paths (compared case-insensitively)
    may appear. ``functions``: the allowed subset of contains/startswith/endswith.
    ``case_insensitive_strings``: Dataverse compares strings case-insensitively.
    """

    allowed_paths: frozenset[str] | None = None
    functions: frozenset[str] = frozenset()
    case_insensitive_strings: bool = False

    def __post_init__(self) -> None:
        unknown = {name.lower() for name in self.functions} - STRING_FUNCTIONS
        if unknown:
            raise ValueError(f"unsupported OData functions: {sorted(unknown)}")


_DEFAULT_OPTIONS = FilterOptions()


# ---------------------------------------------------------------------------
# Values


def resolve_path(record: Mapping[str, Any], path: str) -> Any:
    """Follow a ``/``-separated path through nested mappings; missing -> None.

    Each key is looked up exactly first, then case-insensitively.
    """
    current: Any = record
    for segment in path.split("/"):
        if not isinstance(current, Mapping):
            return None
        if segment in current:
            current = current[segment]
            continue
        folded = segment.casefold()
        for key, value in current.items():
            if isinstance(key, str) and key.casefold() == folded:
                current = value
                break
        else:
            return None
    return current


def _parse_iso(text: str) -> datetime | None:
    """Parse an ISO-8601 date or datetime (any number of fractional digits) into an aware datetime."""
    match = _ISO_RE.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz = UTC
    try:
        if offset and offset not in ("Z", "z"):
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        return _parse_iso(value)
    return None


def _as_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return None


# ---------------------------------------------------------------------------
# $filter: tokens and operands


@dataclass(frozen=True)
class _Token:
    kind: str  # "(", ")", ",", "end", "string", "number", "datetime", "date", "guid", "word"
    text: str
    pos: int
    value: Any = None


@dataclass(frozen=True)
class _Operand:
    kind: str  # "property" or a literal kind: "string", "number", "bool", "null", "datetime", "guid"
    value: Any  # the path for a property, else the literal value

    def evaluate(self, record: Mapping[str, Any]) -> Any:
        return resolve_path(record, self.value) if self.kind == "property" else self.value


def _show(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _syntax_error(option: str, pos: int, message: str) -> ODataError:
    return ODataError(f"Syntax error at position {pos} in '{option}': {message}")


def _check_length(expr: str, option: str) -> None:
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise ODataError(
            f"The '{option}' expression is too long ({len(expr)} characters; the limit is {MAX_EXPRESSION_LENGTH})"
        )


def _scan_string(expr: str, start: int) -> tuple[str, int]:
    """Read a single-quoted literal starting at ``start``; ``''`` is an escaped quote."""
    chars: list[str] = []
    i = start + 1
    while i < len(expr):
        if expr[i] == "'":
            if expr.startswith("''", i):
                chars.append("'")
                i += 2
                continue
            return "".join(chars), i + 1
        chars.append(expr[i])
        i += 1
    raise _syntax_error("$filter", start, f"unterminated string literal {_show(expr[start:])}")


def _tokenize(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(expr):
        char = expr[i]
        if char.isspace():
            i += 1
        elif char in "(),":
            tokens.append(_Token(char, char, i))
            i += 1
        elif char == "'":
            value, end = _scan_string(expr, i)
            tokens.append(_Token("string", expr[i:end], i, value))
            i = end
        else:
            for kind, pattern in _TOKEN_PATTERNS:
                match = pattern.match(expr, i)
                if match:
                    tokens.append(_Token(kind, match.group(), i))
                    i = match.end()
                    break
            else:
                end = i + 1
                while end < len(expr) and not expr[end].isspace() and expr[end] not in "(),'":
                    end += 1
                bad = expr[i:end]
                raise _syntax_error("$filter", i, f"unknown token '{_show(bad)}'")
    tokens.append(_Token("end", "", len(expr)))
    return tokens


def _literal(token: _Token) -> _Operand:
    if token.kind in ("datetime", "date"):
        moment = _parse_iso(token.text)
        if moment is None:
            raise _syntax_error("$filter", token.pos, f"invalid date/time literal '{token.text}'")
        return _Operand("datetime", moment)
    if token.kind == "number":
        return _Operand("number", Decimal(token.text))
    if token.kind == "string":
        return _Operand("string", token.value)
    return _Operand("guid", token.text)


# ---------------------------------------------------------------------------
# $filter: evaluation


def _coerce(a: Any, a_kind: str, b: Any, b_kind: str, fold: bool) -> tuple[Any, Any] | None:
    """Bring two non-null values to a comparable pair, or None when their types do not match."""
    if "datetime" in (a_kind, b_kind):
        x, y = _as_datetime(a), _as_datetime(b)
        return (x, y) if x is not None and y is not None else None
    if isinstance(a, str) and isinstance(b, str):
        x, y = _parse_iso(a), _parse_iso(b)
        if x is not None and y is not None:
            return x, y
        if fold or "guid" in (a_kind, b_kind):
            return a.casefold(), b.casefold()
        return a, b
    if isinstance(a, bool) or isinstance(b, bool):
        return (a, b) if isinstance(a, bool) and isinstance(b, bool) else None
    m, n = _as_decimal(a), _as_decimal(b)
    return (m, n) if m is not None and n is not None else None


def _compare(op: str, left: _Operand, right: _Operand, record: Mapping[str, Any], fold: bool) -> bool:
    a, b = left.evaluate(record), right.evaluate(record)
    if a is None or b is None:
        if op == "eq":
            return a is None and b is None
        if op == "ne":
            return not (a is None and b is None)
        return False
    pair = _coerce(a, left.kind, b, right.kind, fold)
    if pair is None:
        return False
    try:
        return bool(_COMPARISONS[op](*pair))
    except (TypeError, ArithmeticError):
        return False


def _call(name: str, first: _Operand, second: _Operand, record: Mapping[str, Any], fold: bool) -> bool:
    haystack, needle = first.evaluate(record), second.evaluate(record)
    if not isinstance(haystack, str) or not isinstance(needle, str):
        return False
    if fold:
        haystack, needle = haystack.casefold(), needle.casefold()
    if name == "contains":
        return needle in haystack
    if name == "startswith":
        return haystack.startswith(needle)
    return haystack.endswith(needle)


def _any_of_equals(terms: list[Predicate]) -> Predicate | None:
    """``a eq 'x' or a eq 'y' or ...`` (or a single ``a eq 'x'``) on one property, as one set
    lookup (a lookup of many ids would otherwise compare every record with every id, each
    comparison trying both sides as dates first); None when ``terms`` are anything else.

    Exactly :func:`_compare`'s answer: a text literal that is not a date/time equals a value
    only when that value is text and the same (case-folded for a GUID literal or with
    case-insensitive strings); null, numbers, booleans and nested values never equal it."""
    found = [getattr(term, "equals", None) for term in terms]
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:  # type: ignore[index]
        return None
    if any(_parse_iso(str(value)) is not None for _, value, _ in found):  # type: ignore[misc]
        return None  # a date/time literal compares as a moment: not a plain text match
    path = found[0][0]  # type: ignore[index]
    exact = frozenset(str(value) for _, value, folded in found if not folded)  # type: ignore[misc]
    folded = frozenset(str(value).casefold() for _, value, fold in found if fold)  # type: ignore[misc]

    top_level = "/" not in path

    def predicate(record: Mapping[str, Any]) -> bool:
        # resolve_path's exact-key step, inline for a top-level property: a lookup scans every row
        value = record[path] if top_level and path in record else resolve_path(record, path)
        if not isinstance(value, str):
            return False
        if value in exact:
            return True
        return bool(folded) and value.casefold() in folded

    predicate.any_of = (path, exact | folded)  # type: ignore[attr-defined]  # for a store's index
    return predicate


# ---------------------------------------------------------------------------
# $filter: parser


class _FilterParser:
    def __init__(self, expr: str, options: FilterOptions) -> None:
        self.tokens = _tokenize(expr)
        self.index = 0
        self.depth = 0
        self.options = options
        self.functions = frozenset(name.lower() for name in options.functions)
        self.allowed = None if options.allowed_paths is None else frozenset(p.lower() for p in options.allowed_paths)

    # -- helpers -------------------------------------------------------------

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.peek()
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def previous(self) -> _Token | None:
        return self.tokens[self.index - 1] if self.index > 0 else None

    def error(self, token: _Token, message: str) -> ODataError:
        return _syntax_error("$filter", token.pos, message)

    @staticmethod
    def is_keyword(token: _Token, *words: str) -> bool:
        return token.kind == "word" and token.text.lower() in words

    @staticmethod
    def found(token: _Token) -> str:
        return "reached the end of the expression" if token.kind == "end" else f"found '{_show(token.text)}'"

    def after(self) -> str:
        prev = self.previous()
        return f" after '{_show(prev.text)}'" if prev else ""

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING_DEPTH:
            raise ODataError(
                f"The '$filter' expression is nested too deeply at position {token.pos} "
                f"(more than {MAX_NESTING_DEPTH} levels of parentheses or 'not')"
            )

    # -- grammar -------------------------------------------------------------

    def parse(self) -> Predicate:
        if self.peek().kind == "end":
            raise ODataError("The '$filter' expression is empty")
        predicate = self.parse_or()
        token = self.peek()
        if token.kind == ")":
            raise self.error(token, "unbalanced parentheses: unexpected ')'")
        if token.kind != "end":
            raise self.error(token, f"expected 'and', 'or' or the end of the expression but {self.found(token)}")
        return predicate

    def parse_or(self) -> Predicate:
        terms = [self.parse_and()]
        while self.is_keyword(self.peek(), "or"):
            self.advance()
            terms.append(self.parse_and())
        if len(terms) == 1:
            return _any_of_equals(terms) or terms[0]
        return _any_of_equals(terms) or (lambda record: any(term(record) for term in terms))

    def parse_and(self) -> Predicate:
        terms = [self.parse_unary()]
        while self.is_keyword(self.peek(), "and"):
            self.advance()
            terms.append(self.parse_unary())
        if len(terms) == 1:
            return terms[0]
        return lambda record: all(term(record) for term in terms)

    def parse_unary(self) -> Predicate:
        token = self.peek()
        if not self.is_keyword(token, "not"):
            return self.parse_primary()
        self.advance()
        self.enter(token)
        inner = self.parse_unary()
        self.depth -= 1
        return lambda record: not inner(record)

    def parse_primary(self) -> Predicate:
        token = self.peek()
        if token.kind == "(":
            self.advance()
            self.enter(token)
            inner = self.parse_or()
            closing = self.peek()
            if closing.kind != ")":
                raise self.error(
                    closing,
                    f"unbalanced parentheses: expected ')' to close the '(' at position {token.pos} "
                    f"but {self.found(closing)}",
                )
            self.advance()
            self.depth -= 1
            return inner
        if token.kind == "word" and self.peek(1).kind == "(":
            return self.parse_function()
        return self.parse_comparison()

    def parse_function(self) -> Predicate:
        name_token = self.advance()
        name = name_token.text.lower()
        if name not in STRING_FUNCTIONS:
            raise self.error(name_token, f"unknown function '{_show(name_token.text)}'")
        if name not in self.functions:
            raise ODataError(
                f"The function '{name_token.text}' (position {name_token.pos}) is not supported in '$filter'"
            )
        self.enter(self.advance())  # the "(" checked by parse_primary
        first = self.parse_operand()
        if self.peek().kind != ",":
            raise self.error(self.peek(), f"expected ',' in {name}() but {self.found(self.peek())}")
        self.advance()
        second = self.parse_operand()
        if self.peek().kind != ")":
            raise self.error(self.peek(), f"expected ')' to close {name}() but {self.found(self.peek())}")
        self.advance()
        self.depth -= 1
        fold = self.options.case_insensitive_strings
        return lambda record: _call(name, first, second, record, fold)

    def parse_comparison(self) -> Predicate:
        left = self.parse_operand()
        token = self.peek()
        op = token.text.lower()
        if token.kind != "word" or op not in _COMPARISONS:
            if token.kind == "word" and op not in _KEYWORDS:
                raise self.error(
                    token, f"unknown operator '{_show(token.text)}'; expected one of eq, ne, gt, ge, lt, le"
                )
            raise self.error(token, f"expected a comparison operator{self.after()} but {self.found(token)}")
        self.advance()
        right = self.parse_operand()
        fold = self.options.case_insensitive_strings

        def predicate(record: Mapping[str, Any]) -> bool:
            return _compare(op, left, right, record, fold)

        if op == "eq" and left.kind == "property" and right.kind in ("string", "guid"):
            # "path eq 'text'": what an "or" of many of them needs to become one set lookup
            predicate.equals = (left.value, right.value, fold or right.kind == "guid")  # type: ignore[attr-defined]
        return predicate

    def parse_operand(self) -> _Operand:
        token = self.peek()
        if token.kind in ("string", "number", "datetime", "date", "guid"):
            self.advance()
            return _literal(token)
        word = token.text.lower()
        if token.kind == "word" and word not in _KEYWORDS:
            if self.peek(1).kind == "(":
                raise self.error(token, f"function '{_show(token.text)}' cannot be used as a comparison operand")
            self.advance()
            if word in ("true", "false"):
                return _Operand("bool", word == "true")
            if word == "null":
                return _Operand("null", None)
            if self.allowed is not None and word not in self.allowed:
                raise ODataError(
                    f"Could not find a property named '{_show(token.text)}' (position {token.pos} in '$filter')"
                )
            return _Operand("property", token.text)
        raise self.error(token, f"expected a literal or property{self.after()} but {self.found(token)}")


def compile_filter(expr: str, options: FilterOptions = _DEFAULT_OPTIONS) -> Predicate:
    """Compile an OData ``$filter`` expression into a predicate over a record.

    Raises ODataError when the expression is invalid or not allowed by ``options``.
    """
    _check_length(expr, "$filter")
    try:
        return _FilterParser(expr, options).parse()
    except RecursionError as exc:  # pragma: no cover - the nesting limit keeps recursion shallow
        raise ODataError("The '$filter' expression is nested too deeply") from exc


# ---------------------------------------------------------------------------
# $orderby


def parse_orderby(expr: str, allowed_paths: frozenset[str] | None = None) -> list[tuple[str, bool]]:
    """Parse ``path [asc|desc], ...`` into ``[(path, descending), ...]``; empty -> []."""
    _check_length(expr, "$orderby")
    if not expr.strip():
        return []
    allowed = None if allowed_paths is None else frozenset(p.lower() for p in allowed_paths)
    order: list[tuple[str, bool]] = []
    start = 0
    for item in expr.split(","):
        pos = start + len(item) - len(item.lstrip())
        parts = item.split()
        start += len(item) + 1
        if not parts:
            raise _syntax_error("$orderby", pos, "expected a property path but found an empty item")
        path = parts[0]
        if not _PATH_RE.fullmatch(path):
            raise _syntax_error("$orderby", pos, f"'{_show(path)}' is not a valid property path")
        if allowed is not None and path.lower() not in allowed:
            raise ODataError(f"Could not find a property named '{_show(path)}' (position {pos} in '$orderby')")
        if len(parts) > 2:
            raise _syntax_error("$orderby", pos, f"unexpected '{_show(parts[2])}' after '{path} {parts[1]}'")
        direction = parts[1].lower() if len(parts) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise _syntax_error(
                "$orderby", pos, f"invalid sort direction '{_show(parts[1])}'; expected 'asc' or 'desc'"
            )
        order.append((path, direction == "desc"))
    return order


def _sort_key(value: Any) -> tuple[Any, ...]:
    """A key under which any two values are comparable: None < bools < numbers < datetimes < strings."""
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    number = _as_decimal(value)
    if number is not None:
        return (2, number) if not number.is_nan() else (5,)
    moment = _as_datetime(value)
    if moment is not None:
        return (3, moment)
    if isinstance(value, str):
        return (4, value)
    return (5,)


def _key_for(path: str) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    return lambda record: _sort_key(resolve_path(record, path))


def sort_records(records: list[Mapping[str, Any]], order: list[tuple[str, bool]]) -> list[Mapping[str, Any]]:
    """Return the records sorted by ``order`` (stable; None first ascending, last descending)."""
    result = list(records)
    for path, descending in reversed(order):
        result.sort(key=_key_for(path), reverse=descending)
    return result
