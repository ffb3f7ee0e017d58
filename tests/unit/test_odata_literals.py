"""Values never reach an OData filter unescaped."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from cosell_sync.hooks.odata import datetime_literal, eq, literal, quote


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("O'Brien", "'O''Brien'"),
        ("a') or ('1' eq '1", "'a'') or (''1'' eq ''1'"),
        ("", "''"),
        ("Zürich ✓", "'Zürich ✓'"),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (Decimal("12.50"), "12.50"),
        (uuid.UUID("00000000-0000-0000-0000-000000000001"), "00000000-0000-0000-0000-000000000001"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        (date(2026, 1, 2), "2026-01-02"),
    ],
)
def test_literal(value, expected):
    assert literal(value) == expected


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        literal(float("nan"))
    with pytest.raises(TypeError):
        literal(["list"])
    with pytest.raises(TypeError):
        quote(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aware"):
        datetime_literal(datetime(2026, 1, 1))


def test_eq_checks_the_column_name():
    assert eq("address1_postalcode", "98052") == "address1_postalcode eq '98052'"
    assert eq("customerProfile/address/country", "US") == "customerProfile/address/country eq 'US'"
    with pytest.raises(ValueError, match="column"):
        eq("name eq 'x' or name", "y")
