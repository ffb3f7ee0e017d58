"""The SOQL subset the Salesforce emulator understands, and the schema model it resolves names against.

Supported: ``SELECT`` field lists (parent relationship paths such as ``Account.Name``, returned
nested with ``attributes`` as Salesforce does; child subqueries such as
``(SELECT ContactId FROM OpportunityContactRoles)``; ``FIELDS(ALL|STANDARD|CUSTOM)``; ``COUNT()``
and ``COUNT(field)``), ``FROM`` with an optional alias, ``WHERE`` with ``= != <> < <= > >=``,
``[NOT] IN (values)``, ``IN (SELECT ...)`` semi-joins, ``LIKE``, ``AND``/``OR``/``NOT`` and
parentheses (mixing ``AND`` and ``OR`` without parentheses is an error, as in SOQL), string
literals with backslash escapes, numbers, ``TRUE``/``FALSE``/``NULL``, date and datetime literals
and the common relative date literals (``TODAY``, ``LAST_N_DAYS:n`` ...), ``ORDER BY`` with
``ASC``/``DESC`` and ``NULLS FIRST``/``LAST``, ``LIMIT`` and ``OFFSET`` (at most 2,000).

Not supported (answered with ``MALFORMED_QUERY``): ``GROUP BY``/``HAVING``, aggregate functions
other than ``COUNT``, ``TYPEOF``, ``WITH``, ``FOR VIEW/UPDATE``, ``INCLUDES``/``EXCLUDES``, bind
variables, ``convertCurrency()``/``toLabel()``, polymorphic relationships.

Errors mimic the real ones: ``[{"message": "\\n<query line>\\n<caret>\\nERROR at Row:1:Column:N\\n..."}]``
with ``MALFORMED_QUERY``, ``INVALID_FIELD``, ``INVALID_TYPE`` or ``INVALID_QUERY_FILTER_OPERATOR``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

MAX_OFFSET = 2000
STRING_TYPES = frozenset({"string", "textarea", "url", "email", "phone", "picklist", "multipicklist", "combobox"})
NUMBER_TYPES = frozenset({"currency", "double", "percent", "int", "long"})
ID_TYPES = frozenset({"id", "reference"})


# ---------------------------------------------------------------------------
# schema model


@dataclass(frozen=True)
class FieldDef:
    """One field as ``describe`` reports it (the attributes the emulator needs)."""

    name: str
    type: str
    label: str
    length: int = 0
    nillable: bool = True
    createable: bool = True
    updateable: bool = True
    external_id: bool = False
    unique: bool = False
    picklist: tuple[str, ...] = ()
    restricted: bool = False
    reference_to: tuple[str, ...] = ()
    relationship_name: str | None = None
    default: Any = None
    defaulted_on_create: bool = False
    custom: bool = False
    calculated: bool = False
    name_field: bool = False
    precision: int = 0
    scale: int = 0

    @property
    def long_text(self) -> bool:
        return self.type == "textarea" and self.length > 255

    @property
    def filterable(self) -> bool:
        return not self.long_text

    @property
    def sortable(self) -> bool:
        return not self.long_text

    @property
    def required(self) -> bool:
        """Required on create: not nillable, createable and not defaulted by the server."""
        return not self.nillable and self.createable and not self.defaulted_on_create and self.type != "boolean"


@dataclass(frozen=True)
class ChildRelationship:
    name: str  # e.g. OpportunityContactRoles
    child: str  # e.g. OpportunityContactRole
    field: str  # the lookup on the child, e.g. OpportunityId
    cascade_delete: bool = True


@dataclass
class ObjectDef:
    name: str
    label: str
    label_plural: str
    key_prefix: str
    fields: dict[str, FieldDef]
    children: list[ChildRelationship] = field(default_factory=list)
    custom: bool = False

    def field(self, name: str) -> FieldDef | None:
        exact = self.fields.get(name)
        if exact is not None:
            return exact
        lname = name.lower()
        for fname, fdef in self.fields.items():
            if fname.lower() == lname:
                return fdef
        return None

    def parent_relationship(self, name: str) -> FieldDef | None:
        lname = name.lower()
        for fdef in self.fields.values():
            if fdef.relationship_name and fdef.relationship_name.lower() == lname:
                return fdef
        return None

    def child_relationship(self, name: str) -> ChildRelationship | None:
        lname = name.lower()
        for rel in self.children:
            if rel.name.lower() == lname:
                return rel
        return None


class Schema:
    def __init__(self, objects: Iterable[ObjectDef] = ()) -> None:
        self.objects: dict[str, ObjectDef] = {o.name: o for o in objects}

    def get(self, name: str) -> ObjectDef | None:
        exact = self.objects.get(name)
        if exact is not None:
            return exact
        lname = name.lower()
        for oname, odef in self.objects.items():
            if oname.lower() == lname:
                return odef
        return None


class DataSource(Protocol):
    """What the evaluator needs from the record store."""

    def rows(self, obj: str, include_deleted: bool) -> Iterable[dict[str, Any]]: ...

    def by_id(self, obj: str, record_id: str) -> dict[str, Any] | None: ...

    def children(self, child: str, fk: str, parent_id: str, include_deleted: bool) -> list[dict[str, Any]]: ...


# ---------------------------------------------------------------------------
# errors


class QueryError(Exception):
    """A SOQL error: ``code`` is the Salesforce errorCode, ``message`` the full message text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _located(text: str, pos: int, code: str, message: str) -> QueryError:
    """The real error layout: the query line (a window of it when long), a caret, the position, the text."""
    pos = max(0, min(pos, len(text)))
    line_start = text.rfind("\n", 0, pos) + 1
    line_end = text.find("\n", pos)
    line = text[line_start : line_end if line_end >= 0 else len(text)]
    row = text.count("\n", 0, pos) + 1
    col = pos - line_start + 1
    start = 0 if col <= 60 else col - 31
    window = line[start : start + 120]
    caret = " " * (col - 1 - start) + "^"
    return QueryError(code, f"\n{window}\n{caret}\nERROR at Row:{row}:Column:{col}\n{message}")


def no_such_column(field_name: str, obj: str) -> str:
    return (
        f"No such column '{field_name}' on entity '{obj}'. If you are attempting to use a custom field, be sure "
        "to append the '__c' after the custom field name. Please reference your WSDL or the describe call for "
        "the appropriate names."
    )


def unsupported_type(obj: str) -> str:
    return (
        f"sObject type '{obj}' is not supported. If you are attempting to use a custom object, be sure to append "
        "the '__c' after the entity name. Please reference your WSDL or the describe call for the appropriate names."
    )


def _bad_relationship(name: str) -> str:
    return (
        f"Didn't understand relationship '{name}' in field path. If you are attempting to use a custom "
        "relationship, be sure to append the '__r' after the custom relationship name. Please reference your WSDL "
        "or the describe call for the appropriate names."
    )


# ---------------------------------------------------------------------------
# lexer


@dataclass
class Token:
    kind: str  # ident, string, number, date, datetime, op, lparen, rparen, comma, eof
    text: str
    pos: int
    value: Any = None


_TOKEN_RE = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:\d{2}))
    |(?P<baddatetime>\d{4}-\d{2}-\d{2}T[0-9:.+\-]*)
    |(?P<date>\d{4}-\d{2}-\d{2})(?![0-9T])
    |(?P<number>[+-]?(?:\d+(?:\.\d+)?|\.\d+))(?![A-Za-z_])
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?::[0-9]+)?)
    |(?P<op>!=|<>|<=|>=|=|<|>)
    |(?P<lparen>\()
    |(?P<rparen>\))
    |(?P<comma>,)
    """,
    re.X,
)
_SIMPLE_ESCAPES = {"'": "'", '"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            tokens.append(_string_token(text, i))
            i += len(tokens[-1].text)
            continue
        match = _TOKEN_RE.match(text, i)
        if not match:
            raise _located(text, i, "MALFORMED_QUERY", f"line 1:{i} no viable alternative at character '{ch}'")
        kind = match.lastgroup or ""
        if kind == "baddatetime":
            raise _located(text, i, "MALFORMED_QUERY", f"line 1:{i} no viable alternative at character '{ch}'")
        if kind != "ws":
            tokens.append(Token(kind, match.group(kind), i))
        i = match.end()
    tokens.append(Token("eof", "<EOF>", len(text)))
    return tokens


def _string_token(text: str, start: int) -> Token:
    """A quoted string; ``value`` is a list of (char, escaped) pairs so LIKE can tell ``\\%`` from ``%``."""
    chars: list[tuple[str, bool]] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "'":
            return Token("string", text[start : i + 1], start, chars)
        if ch == "\\":
            if i + 1 >= len(text):
                break
            nxt = text[i + 1]
            if nxt in _SIMPLE_ESCAPES:
                chars.append((_SIMPLE_ESCAPES[nxt], True))
                i += 2
            elif nxt in "%_":
                chars.append((nxt, True))
                i += 2
            elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
                chars.append((chr(int(text[i + 2 : i + 6], 16)), True))
                i += 6
            else:
                literal = text[start : text.find("'", i + 2) + 1 or len(text)]
                raise _located(
                    text,
                    start,
                    "MALFORMED_QUERY",
                    f"Invalid string literal {literal}. Illegal character sequence '\\{nxt}' in string literal.",
                )
            continue
        chars.append((ch, False))
        i += 1
    raise _located(text, len(text), "MALFORMED_QUERY", f"line 1:{len(text)} mismatched character '<EOF>' expecting '''")


# ---------------------------------------------------------------------------
# syntax tree


@dataclass
class Ref:
    path: list[str]
    pos: int

    @property
    def text(self) -> str:
        return ".".join(self.path)


@dataclass
class Literal:
    kind: str  # string, number, date, datetime, dateliteral, bool, null
    value: Any
    pos: int
    text: str


@dataclass
class Compare:
    ref: Ref
    op: str
    value: Literal


@dataclass
class InList:
    ref: Ref
    negated: bool
    values: list[Literal]
    subquery: Query | None = None


@dataclass
class Like:
    ref: Ref
    pattern: Literal


@dataclass
class BoolOp:
    op: str  # AND / OR
    items: list[Any]


@dataclass
class Not:
    item: Any


@dataclass
class SelectField:
    ref: Ref


@dataclass
class SelectCount:
    ref: Ref | None
    alias: str | None
    pos: int


@dataclass
class SelectFields:
    kind: str  # ALL, STANDARD, CUSTOM
    pos: int


@dataclass
class SelectChild:
    query: Query


@dataclass
class OrderItem:
    ref: Ref
    desc: bool
    nulls_first: bool | None


@dataclass
class Query:
    select: list[Any]
    obj: str
    obj_pos: int
    alias: str | None = None
    where: Any = None
    order: list[OrderItem] = field(default_factory=list)
    limit: int | None = None
    offset: int | None = None


KEYWORDS = frozenset(
    {
        "select",
        "from",
        "where",
        "and",
        "or",
        "not",
        "in",
        "like",
        "order",
        "by",
        "asc",
        "desc",
        "nulls",
        "first",
        "last",
        "limit",
        "offset",
        "group",
        "having",
        "with",
        "for",
        "using",
        "includes",
        "excludes",
        "null",
        "true",
        "false",
        "typeof",
    }
)
UNSUPPORTED_CLAUSES = frozenset({"group", "having", "with", "for", "using", "typeof", "includes", "excludes"})
DATE_LITERALS = frozenset(
    {
        "YESTERDAY",
        "TODAY",
        "TOMORROW",
        "LAST_WEEK",
        "THIS_WEEK",
        "NEXT_WEEK",
        "LAST_MONTH",
        "THIS_MONTH",
        "NEXT_MONTH",
        "LAST_90_DAYS",
        "NEXT_90_DAYS",
        "THIS_YEAR",
        "LAST_YEAR",
        "NEXT_YEAR",
    }
)
DATE_N_LITERALS = frozenset({"LAST_N_DAYS", "NEXT_N_DAYS", "N_DAYS_AGO", "LAST_N_MONTHS", "NEXT_N_MONTHS"})


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    # -- helpers ------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def is_word(self, *words: str) -> bool:
        return self.tok.kind == "ident" and self.tok.text.lower() in words

    def accept_word(self, word: str) -> bool:
        if self.is_word(word):
            self.i += 1
            return True
        return False

    def expect_word(self, word: str) -> Token:
        if not self.is_word(word):
            self.unexpected()
        return self.advance()

    def expect(self, kind: str) -> Token:
        if self.tok.kind != kind:
            self.unexpected()
        return self.advance()

    def unexpected(self, token: Token | None = None) -> None:
        token = token or self.tok
        if token.kind == "ident" and token.text.lower() in UNSUPPORTED_CLAUSES:
            raise _located(
                self.text,
                token.pos,
                "MALFORMED_QUERY",
                f"unexpected token: '{token.text}' (the sandbox SOQL subset does not support it)",
            )
        shown = "<EOF>" if token.kind == "eof" else f"'{token.text}'"
        raise _located(self.text, token.pos, "MALFORMED_QUERY", f"unexpected token: {shown}")

    def error(self, pos: int, message: str, code: str = "MALFORMED_QUERY") -> QueryError:
        return _located(self.text, pos, code, message)

    # -- grammar -------------------------------------------------------------
    def parse(self) -> Query:
        query = self.query()
        if self.tok.kind != "eof":
            self.unexpected()
        return query

    def query(self) -> Query:
        self.expect_word("select")
        select = self.select_list()
        self.expect_word("from")
        obj_tok = self.tok
        if obj_tok.kind != "ident" or obj_tok.text.lower() in KEYWORDS or "." in obj_tok.text:
            self.unexpected()
        self.advance()
        query = Query(select=select, obj=obj_tok.text, obj_pos=obj_tok.pos)
        if self.tok.kind == "ident" and self.tok.text.lower() not in KEYWORDS and "." not in self.tok.text:
            query.alias = self.advance().text
        if self.accept_word("where"):
            query.where = self.condition()
        if self.is_word("order"):
            self.advance()
            self.expect_word("by")
            query.order = self.order_list()
        if self.accept_word("limit"):
            query.limit = self.integer()
        if self.accept_word("offset"):
            query.offset = self.integer()
            if query.offset > MAX_OFFSET:
                raise QueryError("NUMBER_OUTSIDE_VALID_RANGE", f"Maximum SOQL offset allowed is {MAX_OFFSET}")
        return query

    def integer(self) -> int:
        token = self.tok
        if token.kind != "number" or not re.fullmatch(r"\d+", token.text):
            self.unexpected()
        self.advance()
        return int(token.text)

    def select_list(self) -> list[Any]:
        items = [self.select_item()]
        while self.tok.kind == "comma":
            self.advance()
            items.append(self.select_item())
        return items

    def select_item(self) -> Any:
        token = self.tok
        if token.kind == "lparen":
            self.advance()
            if not self.is_word("select"):
                self.unexpected()
            sub = self.query()
            self.expect("rparen")
            return SelectChild(sub)
        if token.kind != "ident" or token.text.lower() in KEYWORDS:
            self.unexpected()
        nxt = self.tokens[self.i + 1]
        if token.text.lower() == "count" and nxt.kind == "lparen":
            self.i += 2
            ref = None
            if self.tok.kind == "ident":
                ref = Ref(self.advance().text.split("."), self.tokens[self.i - 1].pos)
            self.expect("rparen")
            alias = None
            if ref is not None and self.tok.kind == "ident" and self.tok.text.lower() not in KEYWORDS:
                alias = self.advance().text
            return SelectCount(ref, alias, token.pos)
        if token.text.lower() == "fields" and nxt.kind == "lparen":
            self.i += 2
            kind_tok = self.expect("ident")
            if kind_tok.text.upper() not in ("ALL", "STANDARD", "CUSTOM"):
                self.unexpected(kind_tok)
            self.expect("rparen")
            return SelectFields(kind_tok.text.upper(), token.pos)
        if nxt.kind == "lparen":
            raise self.error(
                token.pos, f"unexpected token: '{token.text}' (the sandbox SOQL subset supports only COUNT())"
            )
        self.advance()
        return SelectField(Ref(token.text.split("."), token.pos))

    def field_ref(self) -> Ref:
        token = self.tok
        if token.kind != "ident" or token.text.lower() in KEYWORDS or ":" in token.text:
            self.unexpected()
        self.advance()
        return Ref(token.text.split("."), token.pos)

    def order_list(self) -> list[OrderItem]:
        items = []
        while True:
            ref = self.field_ref()
            desc = False
            if self.accept_word("desc"):
                desc = True
            else:
                self.accept_word("asc")
            nulls_first = None
            if self.accept_word("nulls"):
                if self.accept_word("first"):
                    nulls_first = True
                else:
                    self.expect_word("last")
                    nulls_first = False
            items.append(OrderItem(ref, desc, nulls_first))
            if self.tok.kind != "comma":
                return items
            self.advance()

    def condition(self) -> Any:
        first = self.unary()
        connective: str | None = None
        items = [first]
        while self.is_word("and", "or"):
            word = self.tok.text.upper()
            if connective is not None and word != connective:
                self.unexpected()  # SOQL needs parentheses to mix AND and OR
            connective = word
            self.advance()
            items.append(self.unary())
        return first if connective is None else BoolOp(connective, items)

    def unary(self) -> Any:
        if self.accept_word("not"):
            return Not(self.unary())
        if self.tok.kind == "lparen":
            self.advance()
            inner = self.condition()
            self.expect("rparen")
            return inner
        return self.comparison()

    def comparison(self) -> Any:
        ref = self.field_ref()
        token = self.tok
        if token.kind == "op":
            self.advance()
            op = "!=" if token.text == "<>" else token.text
            return Compare(ref, op, self.literal())
        if self.accept_word("like"):
            return Like(ref, self.literal())
        negated = False
        if self.is_word("not") and self.tokens[self.i + 1].kind == "ident":
            if self.tokens[self.i + 1].text.lower() != "in":
                self.unexpected(self.tokens[self.i + 1])
            self.advance()
            negated = True
        if self.accept_word("in"):
            self.expect("lparen")
            if self.is_word("select"):
                sub = self.query()
                self.expect("rparen")
                return InList(ref, negated, [], sub)
            values = [self.literal()]
            while self.tok.kind == "comma":
                self.advance()
                values.append(self.literal())
            self.expect("rparen")
            return InList(ref, negated, values)
        self.unexpected()
        raise AssertionError("unreachable")

    def literal(self) -> Literal:
        token = self.tok
        if token.kind == "string":
            self.advance()
            return Literal("string", token.value, token.pos, token.text)
        if token.kind == "number":
            self.advance()
            value: Any = float(token.text) if "." in token.text else int(token.text)
            return Literal("number", value, token.pos, token.text)
        if token.kind == "date":
            self.advance()
            try:
                value = date.fromisoformat(token.text)
            except ValueError:
                raise self.error(
                    token.pos, f"line 1:{token.pos} no viable alternative at character '{token.text[0]}'"
                ) from None
            return Literal("date", value, token.pos, token.text)
        if token.kind == "datetime":
            self.advance()
            try:
                value = datetime.fromisoformat(token.text.replace("Z", "+00:00")).astimezone(UTC)
            except ValueError:
                raise self.error(
                    token.pos, f"line 1:{token.pos} no viable alternative at character '{token.text[0]}'"
                ) from None
            return Literal("datetime", value, token.pos, token.text)
        if token.kind == "ident":
            word = token.text.upper()
            if word in ("TRUE", "FALSE"):
                self.advance()
                return Literal("bool", word == "TRUE", token.pos, token.text)
            if word == "NULL":
                self.advance()
                return Literal("null", None, token.pos, token.text)
            name, _, n = word.partition(":")
            if (name in DATE_LITERALS and not n) or (name in DATE_N_LITERALS and n):
                self.advance()
                return Literal("dateliteral", (name, int(n) if n else None), token.pos, token.text)
        self.unexpected()
        raise AssertionError("unreachable")


def parse(text: str) -> Query:
    return Parser(text).parse()


# ---------------------------------------------------------------------------
# values


def sf_datetime(ts: datetime) -> str:
    """The Salesforce wire format of a datetime: ``2026-01-02T03:04:05.000+0000`` (UTC)."""
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}+0000"


def parse_datetime(value: str) -> datetime:
    """Parse the datetime formats Salesforce accepts (``Z``, ``+hh:mm``, ``+hhmm``, optional fraction)."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    match = re.fullmatch(r"(.*[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)([+-]\d{2})(\d{2})", text)
    if match:
        text = f"{match.group(1)}{match.group(2)}:{match.group(3)}"
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


_SUFFIX_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def id_suffix(id15: str) -> str:
    """The 3-character case-safe checksum that turns a 15-character Salesforce Id into 18."""
    out = []
    for chunk in range(3):
        bits = 0
        for j, ch in enumerate(id15[chunk * 5 : chunk * 5 + 5]):
            if "A" <= ch <= "Z":
                bits |= 1 << j
        out.append(_SUFFIX_CHARS[bits])
    return "".join(out)


def normalize_id(value: str) -> str | None:
    """The canonical 18-character form of a 15- or 18-character Id, or None when it is not a valid Id.

    An 18-character Id is case-insensitive: its suffix encodes which of the first 15 characters are
    upper case, so ``001...aaa`` lower-cased still resolves (this is what the suffix is for).
    """
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", value):
        return None
    if len(value) == 15:
        return value + id_suffix(value)
    suffix = value[15:].upper()
    chars = list(value[:15])
    for chunk in range(3):
        index = _SUFFIX_CHARS.find(suffix[chunk])
        if index < 0:
            return None
        for j in range(5):
            pos = chunk * 5 + j
            upper = bool(index & (1 << j))
            ch = chars[pos]
            if upper:
                if not ch.isalpha():
                    return None
                chars[pos] = ch.upper()
            elif ch.isalpha():
                chars[pos] = ch.lower()
    id15 = "".join(chars)
    return id15 + id_suffix(id15)


def _week_start(day: date) -> date:
    return day - timedelta(days=(day.weekday() + 1) % 7)  # weeks start on Sunday (en_US)


def _month_start(day: date, delta: int = 0) -> date:
    month = day.month - 1 + delta
    return date(day.year + month // 12, month % 12 + 1, 1)


def date_literal_range(name: str, n: int | None, now: datetime) -> tuple[date, date]:
    """[start, end) of a relative date literal, in UTC days."""
    today = now.astimezone(UTC).date()
    one = timedelta(days=1)
    if name == "TODAY":
        return today, today + one
    if name == "YESTERDAY":
        return today - one, today
    if name == "TOMORROW":
        return today + one, today + 2 * one
    if name in ("LAST_WEEK", "THIS_WEEK", "NEXT_WEEK"):
        start = _week_start(today) + timedelta(days=7 * {"LAST_WEEK": -1, "THIS_WEEK": 0, "NEXT_WEEK": 1}[name])
        return start, start + timedelta(days=7)
    if name in ("LAST_MONTH", "THIS_MONTH", "NEXT_MONTH"):
        delta = {"LAST_MONTH": -1, "THIS_MONTH": 0, "NEXT_MONTH": 1}[name]
        return _month_start(today, delta), _month_start(today, delta + 1)
    if name in ("LAST_YEAR", "THIS_YEAR", "NEXT_YEAR"):
        year = today.year + {"LAST_YEAR": -1, "THIS_YEAR": 0, "NEXT_YEAR": 1}[name]
        return date(year, 1, 1), date(year + 1, 1, 1)
    if name == "LAST_90_DAYS":
        return today - timedelta(days=90), today + one
    if name == "NEXT_90_DAYS":
        return today + one, today + timedelta(days=91)
    assert n is not None
    if name == "LAST_N_DAYS":  # includes today: n + 1 days in all
        return today - timedelta(days=n), today + one
    if name == "NEXT_N_DAYS":
        return today + one, today + timedelta(days=n + 1)
    if name == "N_DAYS_AGO":
        return today - timedelta(days=n), today - timedelta(days=n - 1)
    if name == "LAST_N_MONTHS":
        return _month_start(today, -n), _month_start(today)
    if name == "NEXT_N_MONTHS":
        return _month_start(today, 1), _month_start(today, n + 1)
    raise ValueError(name)


def _soap_type(fdef: FieldDef) -> str:
    return {
        "currency": "double",
        "percent": "double",
        "double": "double",
        "int": "int",
        "boolean": "boolean",
        "date": "date",
        "datetime": "dateTime",
    }.get(fdef.type, "string")


def _fold(fdef: FieldDef, value: Any) -> Any:
    """The comparison form of a stored value."""
    if value is None:
        return None
    if fdef.type in STRING_TYPES:
        return str(value).casefold()
    return value


# ---------------------------------------------------------------------------
# compilation and execution


Getter = Callable[[dict[str, Any]], Any]


@dataclass
class _Resolved:
    fdef: FieldDef
    obj: ObjectDef
    hops: list[tuple[FieldDef, ObjectDef]]  # (lookup field, target object) from the root


@dataclass
class _RelNode:
    fk: FieldDef
    obj: ObjectDef
    tree: dict[str, Any]


@dataclass
class _ChildNode:
    rel: ChildRelationship
    plan: Plan


@dataclass
class Plan:
    obj: ObjectDef
    tree: dict[str, Any]
    predicate: Callable[[dict[str, Any]], bool] | None
    sort_keys: list[tuple[Getter, FieldDef, bool, bool]]
    limit: int | None
    offset: int | None
    count: SelectCount | None


@dataclass
class QueryResult:
    total_size: int
    records: list[dict[str, Any]]


class Compiler:
    def __init__(
        self, text: str, schema: Schema, source: DataSource, *, include_deleted: bool, now: datetime, url_prefix: str
    ) -> None:
        self.text = text
        self.schema = schema
        self.source = source
        self.include_deleted = include_deleted
        self.now = now
        self.url_prefix = url_prefix  # e.g. /services/data/v59.0

    def error(self, pos: int, code: str, message: str) -> QueryError:
        return _located(self.text, pos, code, message)

    # -- names -------------------------------------------------------------
    def resolve(self, obj: ObjectDef, ref: Ref, alias: str | None) -> _Resolved:
        path = list(ref.path)
        if alias and len(path) > 1 and path[0].lower() == alias.lower():
            path = path[1:]
        hops: list[tuple[FieldDef, ObjectDef]] = []
        current = obj
        for part in path[:-1]:
            fk = current.parent_relationship(part)
            target = self.schema.get(fk.reference_to[0]) if fk and fk.reference_to else None
            if fk is None or target is None:
                raise self.error(ref.pos, "INVALID_FIELD", _bad_relationship(part))
            hops.append((fk, target))
            current = target
        fdef = current.field(path[-1])
        if fdef is None:
            shown = ref.text if len(path) == 1 else path[-1]
            raise self.error(ref.pos, "INVALID_FIELD", no_such_column(shown, current.name))
        return _Resolved(fdef, current, hops)

    def getter(self, resolved: _Resolved) -> Getter:
        hops = resolved.hops
        name = resolved.fdef.name
        by_id = self.source.by_id

        def get(record: dict[str, Any]) -> Any:
            current: dict[str, Any] | None = record
            for fk, target in hops:
                assert current is not None
                ref_id = current.get(fk.name)
                current = by_id(target.name, ref_id) if ref_id else None
                if current is None:
                    return None
            assert current is not None
            return current.get(name)

        return get

    # -- select --------------------------------------------------------------
    def compile(self, query: Query, parent: ObjectDef | None = None) -> Plan:
        if parent is None:
            obj = self.schema.get(query.obj)
            if obj is None:
                raise self.error(query.obj_pos, "INVALID_TYPE", unsupported_type(query.obj))
        else:
            rel = parent.child_relationship(query.obj)
            obj = self.schema.get(rel.child) if rel else None
            if obj is None:
                raise self.error(
                    query.obj_pos,
                    "INVALID_TYPE",
                    f"Didn't understand relationship '{query.obj}' in FROM part of query call. If you are "
                    "attempting to use a custom relationship, be sure to append the '__r' after the custom "
                    "relationship name. Please reference your WSDL or the describe call for the appropriate names.",
                )
        tree: dict[str, Any] = {}
        count: SelectCount | None = None
        seen: set[str] = set()
        for item in query.select:
            if isinstance(item, SelectCount):
                if len(query.select) > 1 or parent is not None:
                    raise self.error(item.pos, "MALFORMED_QUERY", "COUNT() must be the only element in SELECT")
                if item.ref is not None:
                    self.resolve(obj, item.ref, query.alias)
                count = item
            elif isinstance(item, SelectFields):
                if item.kind != "STANDARD" and (query.limit is None or query.limit > 200):
                    raise self.error(
                        item.pos, "MALFORMED_QUERY", "The SOQL FIELDS function must have a LIMIT of at most 200"
                    )
                for fdef in obj.fields.values():
                    if item.kind == "ALL" or (item.kind == "CUSTOM") == fdef.custom:
                        tree.setdefault(fdef.name, None)
            elif isinstance(item, SelectChild):
                if parent is not None:
                    raise self.error(item.query.obj_pos, "MALFORMED_QUERY", "Nesting of semi join sub-selects")
                rel = obj.child_relationship(item.query.obj)
                plan = self.compile(item.query, obj)
                assert rel is not None
                tree[rel.name] = _ChildNode(rel, plan)
            else:
                resolved = self.resolve(obj, item.ref, query.alias)
                key = ".".join([fk.relationship_name or "" for fk, _ in resolved.hops] + [resolved.fdef.name]).lower()
                if key in seen:
                    raise self.error(item.ref.pos, "MALFORMED_QUERY", f"duplicate field selected: {item.ref.text}")
                seen.add(key)
                node = tree
                for fk, target in resolved.hops:
                    assert fk.relationship_name is not None
                    existing = node.get(fk.relationship_name)
                    if not isinstance(existing, _RelNode):
                        existing = _RelNode(fk, target, {})
                        node[fk.relationship_name] = existing
                    node = existing.tree
                node[resolved.fdef.name] = None
        predicate = self.condition(obj, query.where, query.alias) if query.where is not None else None
        sort_keys = []
        for item in query.order:
            resolved = self.resolve(obj, item.ref, query.alias)
            if not resolved.fdef.sortable:
                raise self.error(
                    item.ref.pos, "INVALID_FIELD", f"field '{resolved.fdef.name}' can not be sorted in a query call"
                )
            nulls_first = (not item.desc) if item.nulls_first is None else item.nulls_first
            sort_keys.append((self.getter(resolved), resolved.fdef, item.desc, nulls_first))
        return Plan(obj, tree, predicate, sort_keys, query.limit, query.offset, count)

    # -- where ---------------------------------------------------------------
    def condition(self, obj: ObjectDef, node: Any, alias: str | None) -> Callable[[dict[str, Any]], bool]:
        if isinstance(node, BoolOp):
            parts = [self.condition(obj, item, alias) for item in node.items]
            if node.op == "AND":
                return lambda r: all(p(r) for p in parts)
            return lambda r: any(p(r) for p in parts)
        if isinstance(node, Not):
            inner = self.condition(obj, node.item, alias)
            return lambda r: not inner(r)
        resolved = self.resolve(obj, node.ref, alias)
        fdef = resolved.fdef
        if not fdef.filterable:
            raise self.error(node.ref.pos, "INVALID_FIELD", f"field '{fdef.name}' can not be filtered in a query call")
        get = self.getter(resolved)
        if isinstance(node, Like):
            if fdef.type not in STRING_TYPES:
                raise self.error(node.ref.pos, "INVALID_FIELD", f"invalid operator on field '{fdef.name}'")
            if node.pattern.kind != "string":
                raise self.error(node.pattern.pos, "MALFORMED_QUERY", f"unexpected token: {node.pattern.text}")
            regex = _like_regex(node.pattern.value)
            return lambda r: (v := get(r)) is not None and regex.fullmatch(str(v)) is not None
        if isinstance(node, InList):
            if node.subquery is not None:
                wanted = self.semi_join(node.subquery, fdef, node.ref.pos)
            else:
                wanted = set()
                for literal in node.values:
                    value = self.coerce(fdef, literal, "IN")
                    wanted.add(_fold(fdef, value))
            negated = node.negated
            return lambda r: (_fold(fdef, get(r)) in wanted) != negated
        assert isinstance(node, Compare)
        return self.compare(fdef, get, node)

    def semi_join(self, sub: Query, fdef: FieldDef, pos: int) -> set[Any]:
        if fdef.type not in ID_TYPES:
            raise self.error(pos, "INVALID_FIELD", f"semi join sub-select can only filter on an Id field: {fdef.name}")
        if len(sub.select) != 1 or not isinstance(sub.select[0], SelectField):
            raise self.error(sub.obj_pos, "MALFORMED_QUERY", "semi join sub-selects can only select one Id field")
        plan = self.compile(sub)
        resolved = self.resolve(plan.obj, sub.select[0].ref, sub.alias)
        if resolved.fdef.type not in ID_TYPES:
            raise self.error(sub.select[0].ref.pos, "INVALID_FIELD", "semi join sub-selects must select an Id field")
        get = self.getter(resolved)
        rows = self.filtered(plan)
        return {get(r) for r in rows if get(r) is not None}

    def coerce(self, fdef: FieldDef, literal: Literal, op: str) -> Any:
        """The literal as a stored value of ``fdef``'s type; raises the real type errors."""
        kind = literal.kind
        if kind == "null":
            return None
        ftype = fdef.type
        quoted = kind == "string"

        def wrong() -> QueryError:
            how = "should be enclosed in quotes" if ftype in STRING_TYPES else "should not be enclosed in quotes"
            return self.error(
                literal.pos,
                "INVALID_FIELD",
                f"value of filter criterion for field '{fdef.name}' must be of type {_soap_type(fdef)} and {how}",
            )

        if ftype in ID_TYPES:
            if not quoted:
                raise wrong()
            raw = "".join(ch for ch, _ in literal.value)
            normalized = normalize_id(raw)
            if normalized is None:
                raise self.error(literal.pos, "INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {raw}")
            return normalized
        if ftype in STRING_TYPES:
            if not quoted:
                raise wrong()
            return "".join(ch for ch, _ in literal.value)
        if ftype == "boolean":
            if kind != "bool":
                raise wrong()
            return literal.value
        if ftype in NUMBER_TYPES:
            if kind != "number":
                raise wrong()
            return literal.value
        if ftype == "date":
            if kind == "date":
                return literal.value.isoformat()
            if kind == "dateliteral" and op != "IN":
                return literal.value
            raise wrong()
        if ftype == "datetime":
            if kind == "datetime":
                return sf_datetime(literal.value)
            if kind == "dateliteral" and op != "IN":
                return literal.value
            raise wrong()
        raise wrong()

    def compare(self, fdef: FieldDef, get: Getter, node: Compare) -> Callable[[dict[str, Any]], bool]:
        op = node.op
        value = self.coerce(fdef, node.value, op)
        if value is None:
            if op == "=":
                return lambda r: get(r) is None
            if op == "!=":
                return lambda r: get(r) is not None
            return lambda r: False
        if node.value.kind == "dateliteral":
            name, n = value
            start, end = date_literal_range(name, n, self.now)
            if fdef.type == "date":
                lo, hi = start.isoformat(), end.isoformat()
            else:
                lo = sf_datetime(datetime(start.year, start.month, start.day, tzinfo=UTC))
                hi = sf_datetime(datetime(end.year, end.month, end.day, tzinfo=UTC))
            ranges: dict[str, Callable[[Any], bool]] = {
                "=": lambda v: lo <= v < hi,
                "!=": lambda v: not lo <= v < hi,
                "<": lambda v: v < lo,
                "<=": lambda v: v < hi,
                ">": lambda v: v >= hi,
                ">=": lambda v: v >= lo,
            }
            check = ranges[op]
            if op == "!=":
                return lambda r: (v := get(r)) is None or check(v)
            return lambda r: (v := get(r)) is not None and check(v)
        if fdef.type == "boolean" and op not in ("=", "!="):
            raise self.error(node.value.pos, "INVALID_FIELD", f"invalid operator on boolean field '{fdef.name}'")
        wanted = _fold(fdef, value)
        ops: dict[str, Callable[[Any, Any], bool]] = {
            "=": lambda a, b: a == b,
            "!=": lambda a, b: a != b,
            "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b,
        }
        fn = ops[op]
        if op == "!=":
            return lambda r: (v := _fold(fdef, get(r))) is None or fn(v, wanted)
        return lambda r: (v := _fold(fdef, get(r))) is not None and fn(v, wanted)

    # -- execution -------------------------------------------------------------
    def filtered(self, plan: Plan, rows: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        if rows is None:
            rows = self.source.rows(plan.obj.name, self.include_deleted)
        predicate = plan.predicate
        matched = [r for r in rows if predicate is None or predicate(r)]
        for get, fdef, desc, nulls_first in reversed(plan.sort_keys):
            present = [r for r in matched if get(r) is not None]
            absent = [r for r in matched if get(r) is None]
            present.sort(key=lambda r, g=get, f=fdef: _sort_value(f, g(r)), reverse=desc)
            matched = absent + present if nulls_first else present + absent
        start = plan.offset or 0
        end = None if plan.limit is None else start + plan.limit
        return matched[start:end]

    def render(self, obj: ObjectDef, record: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attributes": {"type": obj.name, "url": f"{self.url_prefix}/sobjects/{obj.name}/{record['Id']}"}
        }
        for key, node in tree.items():
            if node is None:
                out[key] = record.get(key)
            elif isinstance(node, _RelNode):
                ref_id = record.get(node.fk.name)
                parent = self.source.by_id(node.obj.name, ref_id) if ref_id else None
                out[key] = None if parent is None else self.render(node.obj, parent, node.tree)
            else:
                rows = self.source.children(node.rel.child, node.rel.field, record["Id"], self.include_deleted)
                kids = self.filtered(node.plan, rows)
                out[key] = (
                    None
                    if not kids
                    else {
                        "totalSize": len(kids),
                        "done": True,
                        "records": [self.render(node.plan.obj, k, node.plan.tree) for k in kids],
                    }
                )
        return out

    def run(self, query: Query) -> QueryResult:
        plan = self.compile(query)
        rows = self.filtered(plan)
        if plan.count is not None:
            if plan.count.ref is None:
                return QueryResult(len(rows), [])
            resolved = self.resolve(plan.obj, plan.count.ref, query.alias)
            get = self.getter(resolved)
            value = sum(1 for r in rows if get(r) is not None)
            return QueryResult(1, [{"attributes": {"type": "AggregateResult"}, plan.count.alias or "expr0": value}])
        return QueryResult(len(rows), [self.render(plan.obj, r, plan.tree) for r in rows])


def _sort_value(fdef: FieldDef, value: Any) -> Any:
    if fdef.type in STRING_TYPES:
        return (str(value).casefold(), str(value))
    return value


def _like_regex(chars: list[tuple[str, bool]]) -> re.Pattern[str]:
    parts = []
    for ch, escaped in chars:
        if ch == "%" and not escaped:
            parts.append(".*")
        elif ch == "_" and not escaped:
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def execute(
    text: str,
    schema: Schema,
    source: DataSource,
    *,
    include_deleted: bool = False,
    now: datetime | None = None,
    url_prefix: str = "/services/data/v59.0",
) -> QueryResult:
    """Parse, check and run ``text``; raises :class:`QueryError` with the real error code and message."""
    if not text.strip():
        raise QueryError("MALFORMED_QUERY", "unexpected token: <EOF>")
    query = parse(text)
    compiler = Compiler(
        text, schema, source, include_deleted=include_deleted, now=now or datetime.now(UTC), url_prefix=url_prefix
    )
    return compiler.run(query)
