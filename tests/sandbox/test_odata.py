"""Tests of the sandbox OData $filter / $orderby evaluator."""

from __future__ import annotations

import random
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest

from cosell_sandbox.dynamics365.odata import (
    FilterOptions,
    ODataError,
    compile_filter,
    parse_orderby,
    resolve_path,
    sort_records,
)

REFERRALS: list[dict[str, Any]] = [
    {
        "id": "r1",
        "name": "Contoso migration",
        "status": "New",
        "value": 100,
        "isActive": True,
        "updatedDateTime": "2018-02-17T00:05:39.5485487+00:00",
        "customerProfile": {"name": "Contoso", "address": {"country": "US"}},
        "_parentaccountid_value": "00000000-0000-0000-0000-0000000000AB",
    },
    {
        "id": "r2",
        "name": "Fabrikam renewal",
        "status": "Active",
        "value": 12.5,
        "isActive": False,
        "updatedDateTime": "2024-05-01T10:00:00Z",
        "customerProfile": {"name": "Fabrikam", "address": {"country": "DE"}},
        "_parentaccountid_value": None,
    },
    {
        "id": "r3",
        "name": "O'Brien (pilot)",
        "status": "Closed",
        "value": -3,
        "updatedDateTime": "2024-05-01T00:00:00.123+02:00",
        "customerProfile": {"name": "O'Brien", "address": {}},
    },
]


def ids(expr: str, options: FilterOptions | None = None) -> list[str]:
    predicate = compile_filter(expr, options or FilterOptions())
    return [record["id"] for record in REFERRALS if predicate(record)]


def error_of(expr: str, options: FilterOptions | None = None) -> str:
    with pytest.raises(ODataError) as info:
        compile_filter(expr, options or FilterOptions())
    return str(info.value)


# ---------------------------------------------------------------------------
# resolve_path


def test_resolve_path_nested_and_case_insensitive() -> None:
    record = REFERRALS[0]
    assert resolve_path(record, "customerProfile/address/country") == "US"
    assert resolve_path(record, "CUSTOMERPROFILE/Address/COUNTRY") == "US"
    assert resolve_path(record, "customerProfile/missing/country") is None
    assert resolve_path(record, "name/first") is None  # walking into a string
    assert resolve_path(record, "nope") is None


def test_resolve_path_prefers_exact_key() -> None:
    record = {"Name": "upper", "name": "lower"}
    assert resolve_path(record, "name") == "lower"
    assert resolve_path(record, "Name") == "upper"
    assert resolve_path({"Name": "upper"}, "NAME") == "upper"


# ---------------------------------------------------------------------------
# comparison operators and logic


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("status eq 'New'", ["r1"]),
        ("status ne 'New'", ["r2", "r3"]),
        ("value gt 12.5", ["r1"]),
        ("value ge 12.5", ["r1", "r2"]),
        ("value lt 12.50", ["r3"]),
        ("value le 12.5", ["r2", "r3"]),
        ("value eq -3", ["r3"]),
        ("value eq 100", ["r1"]),
        ("status EQ 'New'", ["r1"]),
        ("'New' eq status", ["r1"]),
        ("100 gt value", ["r2", "r3"]),
    ],
)
def test_comparison_operators(expr: str, expected: list[str]) -> None:
    assert ids(expr) == expected


def test_and_or_not_and_parentheses() -> None:
    assert ids("status eq 'New' or status eq 'Closed'") == ["r1", "r3"]
    assert ids("status eq 'New' and value eq 100") == ["r1"]
    assert ids("status eq 'New' and value eq 5") == []
    assert ids("not status eq 'New'") == ["r2", "r3"]
    assert ids("not (status eq 'New' or status eq 'Closed')") == ["r2"]
    assert ids("NOT NOT status eq 'New'") == ["r1"]
    assert ids("((status eq 'New'))") == ["r1"]
    assert ids("status eq 'New' AND value eq 100 Or status eq 'Active'") == ["r1", "r2"]


def test_precedence_and_binds_tighter_than_or() -> None:
    # r3 satisfies the left side of 'or' only; with and > or it must match.
    expr = "status eq 'Closed' or status eq 'New' and value eq 5"
    assert ids(expr) == ["r3"]
    assert ids("(status eq 'Closed' or status eq 'New') and value eq 5") == []


def test_not_binds_tighter_than_and() -> None:
    assert ids("not status eq 'New' and value gt 0") == ["r2"]


# ---------------------------------------------------------------------------
# literals


def test_boolean_literals() -> None:
    assert ids("isActive eq true") == ["r1"]
    assert ids("isActive eq false") == ["r2"]
    assert ids("isActive ne true") == ["r2", "r3"]
    assert ids("isActive eq TRUE") == ["r1"]


def test_booleans_do_not_match_numbers() -> None:
    predicate = compile_filter("flag eq 1")
    assert predicate({"flag": True}) is False
    assert predicate({"flag": 1}) is True


def test_null_literal() -> None:
    assert ids("_parentaccountid_value eq null") == ["r2", "r3"]
    assert ids("_parentaccountid_value ne null") == ["r1"]
    assert ids("null eq isActive") == ["r3"]
    assert ids("customerProfile/address/country eq null") == ["r3"]
    # Ordering against null is never true.
    assert ids("isActive gt null") == []
    assert ids("_parentaccountid_value le null") == []


def test_decimal_and_float_values() -> None:
    predicate = compile_filter("amount eq 0.1")
    assert predicate({"amount": 0.1}) is True
    assert predicate({"amount": Decimal("0.10")}) is True
    assert predicate({"amount": 0.2}) is False
    assert compile_filter("amount lt 1.5E2")({"amount": 149}) is True


def test_number_literal_does_not_match_numeric_string() -> None:
    predicate = compile_filter("value eq 100")
    assert predicate({"value": "100"}) is False
    assert compile_filter("value ne 100")({"value": "100"}) is False


def test_string_vs_number_mismatch_never_raises() -> None:
    assert ids("status gt 5") == []
    assert ids("value eq 'New'") == []
    assert ids("customerProfile eq 'x'") == []


def test_quote_escaping() -> None:
    assert ids("customerProfile/name eq 'O''Brien'") == ["r3"]
    assert ids("name eq 'O''Brien (pilot)'") == ["r3"]


def test_quoted_string_cannot_inject() -> None:
    predicate = compile_filter("name eq 'x'' or ''1'' eq ''1'")
    assert predicate({"name": "x' or '1' eq '1"}) is True
    assert predicate({"name": "x"}) is False
    assert predicate({"name": "1"}) is False
    assert [r["id"] for r in REFERRALS if predicate(r)] == []


def test_string_literal_with_keywords_and_parens() -> None:
    predicate = compile_filter("note eq 'a) or (b eq ''c'' and not'")
    assert predicate({"note": "a) or (b eq 'c' and not"}) is True
    assert predicate({"note": "a"}) is False


def test_strings_case_sensitive_by_default() -> None:
    assert ids("status eq 'new'") == []
    assert ids("status eq 'new'", FilterOptions(case_insensitive_strings=True)) == ["r1"]


def test_string_ordering_is_lexicographic() -> None:
    assert ids("status gt 'Active'") == ["r1", "r3"]
    assert ids("status lt 'B'") == ["r2"]


def test_guid_literal_is_case_insensitive() -> None:
    assert ids("_parentaccountid_value eq 00000000-0000-0000-0000-0000000000ab") == ["r1"]
    assert ids("_parentaccountid_value eq 00000000-0000-0000-0000-0000000000AB") == ["r1"]
    assert ids("_parentaccountid_value eq 00000000-0000-0000-0000-000000000001") == []
    # A GUID starting with a letter is still a GUID, not a property path.
    predicate = compile_filter("id eq abcdef00-0000-0000-0000-000000000001")
    assert predicate({"id": "ABCDEF00-0000-0000-0000-000000000001"}) is True


# ---------------------------------------------------------------------------
# datetimes


def test_datetime_literal_with_seven_fraction_digits_in_record() -> None:
    assert ids("updatedDateTime lt 2018-02-17T00:05:40Z") == ["r1"]
    assert ids("updatedDateTime gt 2018-02-17T00:05:39.548Z") == ["r1", "r2", "r3"]
    assert ids("updatedDateTime eq 2018-02-17T00:05:39.548548Z") == ["r1"]


def test_datetime_literal_with_offset() -> None:
    # r3 is 2024-04-30T22:00:00.123Z; r2 is 2024-05-01T10:00:00Z.
    assert ids("updatedDateTime ge 2024-05-01T00:00:00+02:00") == ["r2", "r3"]
    assert ids("updatedDateTime gt 2024-05-01T00:00:00.123+02:00") == ["r2"]
    assert ids("updatedDateTime eq 2024-04-30T22:00:00.123Z") == ["r3"]


def test_date_literal() -> None:
    assert ids("updatedDateTime ge 2024-05-01") == ["r2"]
    assert ids("updatedDateTime lt 2024-05-01") == ["r1", "r3"]
    assert compile_filter("day eq 2024-05-01")({"day": "2024-05-01"}) is True


def test_quoted_datetime_compares_as_datetime() -> None:
    assert ids("updatedDateTime gt '2024-01-01T00:00:00Z'") == ["r2", "r3"]
    # Equal instants written differently are equal as datetimes.
    assert ids("updatedDateTime eq '2024-05-01T12:00:00+02:00'") == ["r2"]


def test_datetime_vs_non_datetime_does_not_match() -> None:
    assert ids("status gt 2024-01-01T00:00:00Z") == []
    assert ids("value lt 2024-01-01") == []


def test_invalid_datetime_literal_is_an_error() -> None:
    assert "2024-13-01" in error_of("updatedDateTime gt 2024-13-01")


# ---------------------------------------------------------------------------
# functions


def test_functions_allowed() -> None:
    options = FilterOptions(functions=frozenset({"contains", "startswith", "endswith"}))
    assert ids("contains(name, 'renew')", options) == ["r2"]
    assert ids("startswith(customerProfile/name,'Con')", options) == ["r1"]
    assert ids("endswith(name,'(pilot)')", options) == ["r3"]
    assert ids("not contains(name,'o') and value gt 0", options) == ["r2"]
    assert ids("contains(name,'RENEW')", options) == []
    assert ids("contains(value,'1')", options) == []  # not a string: no match


def test_functions_case_insensitive_option() -> None:
    options = FilterOptions(functions=frozenset({"contains"}), case_insensitive_strings=True)
    assert ids("contains(name,'RENEW')", options) == ["r2"]


def test_function_not_allowed() -> None:
    message = error_of("contains(name,'x')", FilterOptions(functions=frozenset({"startswith"})))
    assert "contains" in message and "not supported" in message
    assert "contains" in error_of("contains(name,'x')")


def test_unknown_function() -> None:
    message = error_of("substringof('x',name)", FilterOptions(functions=frozenset({"contains"})))
    assert "unknown function 'substringof'" in message


def test_function_syntax_errors() -> None:
    options = FilterOptions(functions=frozenset({"contains"}))
    assert "expected ','" in error_of("contains(name)", options)
    assert "expected ')'" in error_of("contains(name,'a','b')", options)


def test_filter_options_reject_unknown_function_names() -> None:
    with pytest.raises(ValueError, match="tolower"):
        FilterOptions(functions=frozenset({"tolower"}))


# ---------------------------------------------------------------------------
# allowed paths


def test_allowed_paths() -> None:
    options = FilterOptions(allowed_paths=frozenset({"status", "customerProfile/address/country"}))
    assert ids("STATUS eq 'New' or customerprofile/address/Country eq 'DE'", options) == ["r1", "r2"]
    message = error_of("status eq 'New' and secret eq 1", options)
    assert message.startswith("Could not find a property named 'secret'")


def test_allowed_paths_checked_in_functions() -> None:
    options = FilterOptions(allowed_paths=frozenset({"name"}), functions=frozenset({"contains"}))
    assert ids("contains(name,'Fab')", options) == ["r2"]
    assert "Could not find a property named 'status'" in error_of("contains(status,'x')", options)


# ---------------------------------------------------------------------------
# syntax errors


@pytest.mark.parametrize(
    ("expr", "fragments"),
    [
        ("status eq", ["position 9", "expected a literal or property after 'eq'"]),
        ("status eq 'New' and", ["expected a literal or property after 'and'"]),
        ("eq 'New'", ["position 0", "expected a literal or property", "'eq'"]),
        ("status 'New'", ["expected a comparison operator after 'status'", "'New'"]),
        ("status", ["expected a comparison operator after 'status'", "end of the expression"]),
        ("status equals 'New'", ["unknown operator 'equals'"]),
        ("status = 'New'", ["unknown token '='", "position 7"]),
        ("status eq 'New", ["unterminated string literal", "'New"]),
        ("(status eq 'New'", ["unbalanced parentheses", "expected ')'"]),
        ("status eq 'New')", ["unbalanced parentheses", "unexpected ')'"]),
        ("status eq 'New' status eq 'x'", ["expected 'and', 'or'", "found 'status'"]),
        ("status eq 'a' or", ["after 'or'"]),
        ("()", ["expected a literal or property after '('", "found ')'"]),
        ("status eq 12abc", ["unknown token '12abc'"]),
        ("status eq 1.", ["unknown token '1.'"]),
        ("a.b eq 1", ["unknown token 'a.b'"]),
        ("name eq tolower(x)", ["'tolower' cannot be used as a comparison operand"]),
        ("", ["empty"]),
        ("   ", ["empty"]),
    ],
)
def test_syntax_errors(expr: str, fragments: list[str]) -> None:
    message = error_of(expr)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_error_is_a_value_error() -> None:
    assert issubclass(ODataError, ValueError)


def test_nesting_limit() -> None:
    assert ids("(" * 50 + "status eq 'New'" + ")" * 50) == ["r1"]
    assert "nested too deeply" in error_of("(" * 51 + "status eq 'New'" + ")" * 51)
    assert "nested too deeply" in error_of("not " * 60 + "status eq 'New'")
    assert "nested too deeply" in error_of("(" * 1500)


def test_length_limit() -> None:
    long_value = "x" * 3985
    assert compile_filter(f"a eq '{long_value}'")({"a": long_value}) is True
    assert "too long" in error_of(f"a eq '{long_value}xxxxxxxxxx'")


def test_long_flat_chains_are_fine() -> None:
    expr = " or ".join(f"value eq {n}" for n in range(200))
    assert len(expr) < 4000
    assert ids(expr) == ["r1"]


def test_random_garbage_only_raises_odata_error() -> None:
    rng = random.Random(20240501)
    alphabet = [
        *"abcXYZ019_/-.:'() ,=<>!\"$@\t",
        " eq ",
        " and ",
        " or ",
        "not ",
        " gt ",
        "null",
        "true",
        "'x'",
        "''",
        "2024-05-01T00:00:00Z",
        "00000000-0000-0000-0000-000000000001",
        "contains(",
        "name",
        "(",
        ")",
        "é",
    ]
    options = FilterOptions(functions=frozenset({"contains"}), case_insensitive_strings=True)
    compiled = 0
    for _ in range(500):
        expr = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            predicate = compile_filter(expr, options)
        except ODataError:
            continue
        compiled += 1
        for record in REFERRALS:
            assert isinstance(predicate(record), bool)
    assert compiled < 500  # garbage is (mostly) rejected


# ---------------------------------------------------------------------------
# $orderby


def test_parse_orderby() -> None:
    assert parse_orderby("") == []
    assert parse_orderby("  ") == []
    assert parse_orderby("name") == [("name", False)]
    assert parse_orderby("status desc, customerProfile/name ASC,value") == [
        ("status", True),
        ("customerProfile/name", False),
        ("value", False),
    ]


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("name sideways", "invalid sort direction 'sideways'"),
        ("name asc desc", "unexpected 'desc'"),
        ("name,", "expected a property path"),
        (",name", "expected a property path"),
        ("na-me", "'na-me' is not a valid property path"),
    ],
)
def test_parse_orderby_errors(expr: str, fragment: str) -> None:
    with pytest.raises(ODataError) as info:
        parse_orderby(expr)
    assert fragment in str(info.value)


def test_parse_orderby_allowed_paths() -> None:
    allowed = frozenset({"name", "updatedDateTime"})
    assert parse_orderby("UpdatedDateTime desc", allowed) == [("UpdatedDateTime", True)]
    with pytest.raises(ODataError, match="Could not find a property named 'status'"):
        parse_orderby("name, status desc", allowed)


def _ids(records: list[Mapping[str, Any]]) -> list[Any]:
    return [record["id"] for record in records]


def test_sort_records_multi_key_desc_and_none() -> None:
    records: list[Mapping[str, Any]] = [
        {"id": 1, "group": "b", "score": 5},
        {"id": 2, "group": "a", "score": None},
        {"id": 3, "group": "b", "score": 7},
        {"id": 4, "group": "a", "score": 2},
        {"id": 5, "group": None, "score": 1},
        {"id": 6, "group": "a"},
    ]
    assert _ids(sort_records(records, [("group", False), ("score", True)])) == [5, 4, 2, 6, 3, 1]
    assert _ids(sort_records(records, [("group", True), ("score", False)])) == [1, 3, 2, 6, 4, 5]
    assert _ids(sort_records(records, [("score", False)])) == [2, 6, 5, 4, 1, 3]
    assert _ids(sort_records(records, [("score", True)])) == [3, 1, 4, 5, 2, 6]


def test_sort_records_is_stable_and_does_not_mutate() -> None:
    records: list[Mapping[str, Any]] = [{"id": n, "k": n % 2} for n in range(6)]
    assert _ids(sort_records(records, [("k", False)])) == [0, 2, 4, 1, 3, 5]
    assert _ids(sort_records(records, [("k", True)])) == [1, 3, 5, 0, 2, 4]
    assert _ids(records) == [0, 1, 2, 3, 4, 5]
    assert _ids(sort_records(records, [])) == [0, 1, 2, 3, 4, 5]


def test_sort_records_parses_datetimes_and_nested_paths() -> None:
    records: list[Mapping[str, Any]] = list(REFERRALS)
    # As plain strings r3 ("2024-05-01T00...") would sort before r2 ("2024-05-01T10...") anyway,
    # but its instant (2024-04-30T22:00Z) is earlier still; r1 has 7 fractional digits.
    assert _ids(sort_records(records, [("updatedDateTime", True)])) == ["r2", "r3", "r1"]
    mixed: list[Mapping[str, Any]] = [
        {"id": "late", "t": "2024-05-01T09:00:00+00:00"},
        {"id": "early", "t": "2024-05-01T10:00:00+05:00"},
    ]
    assert _ids(sort_records(mixed, [("t", False)])) == ["early", "late"]
    assert _ids(sort_records(records, [("CustomerProfile/Address/Country", False)])) == ["r3", "r2", "r1"]


def test_sort_records_mixed_types_do_not_raise() -> None:
    records: list[Mapping[str, Any]] = [
        {"id": "s", "v": "text"},
        {"id": "n", "v": 3},
        {"id": "b", "v": True},
        {"id": "d", "v": {"x": 1}},
        {"id": "f", "v": 1.5},
        {"id": "z"},
    ]
    assert _ids(sort_records(records, [("v", False)])) == ["z", "b", "f", "n", "s", "d"]


def test_an_or_of_equals_on_one_property_matches_as_its_terms_do() -> None:
    """``id eq 'a' or id eq 'b' ...`` (or one ``id eq 'a'``) is one set lookup: the same records
    as each term evaluated alone, for text, GUIDs, case, dates, nulls, numbers and nesting."""
    rng = random.Random(7)
    values: list[Any] = [
        "abc", "ABC", "Abc", "", "00000000-0000-0000-0000-0000000000ab", "00000000-0000-0000-0000-0000000000AB",
        "2024-05-01T10:00:00Z", "2024-05-01T10:00:00z", "2024-05-01", None, 7, 7.0, True, {"x": 1}, ["abc"],
    ]  # fmt: skip
    literals = [
        "'abc'", "'ABC'", "''", "'x''y'", "00000000-0000-0000-0000-0000000000AB",
        "'00000000-0000-0000-0000-0000000000ab'", "'2024-05-01T10:00:00Z'", "'7'",
    ]  # fmt: skip
    records = [{"id": str(i), "k": v, "n": {"k": v}} for i, v in enumerate(values)] + [{"id": "none"}]
    for options in (FilterOptions(), FilterOptions(case_insensitive_strings=True)):
        for _ in range(300):
            path = rng.choice(["k", "n/k", "K"])
            chosen = rng.sample(literals, rng.randint(1, 5))
            expr = " or ".join(f"{path} eq {literal}" for literal in chosen)
            fast = compile_filter(expr, options)
            terms = [compile_filter(f"{path} eq {literal}", options) for literal in chosen]
            assert [r["id"] for r in records if fast(r)] == [r["id"] for r in records if any(t(r) for t in terms)], expr
