"""SOQL building: escaping and name checks (no network)."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from cosell_sync.hooks.soql import Condition, like_pattern, literal, name, select, string_literal


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("O'Brien", r"'O\'Brien'"),
        ("back\\slash", r"'back\\slash'"),
        ("100% sure", "'100% sure'"),  # % is only special inside LIKE
        ("line\nbreak", r"'line\nbreak'"),
        ("x' OR Name != '", r"'x\' OR Name != \''"),
        (None, "NULL"),
        (True, "TRUE"),
        (12.5, "12.5"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), "2026-01-02T03:04:05.123Z"),
        (date(2026, 1, 2), "2026-01-02"),
    ],
)
def test_literals(value, expected):
    assert literal(value) == expected


def test_like_escapes_wildcards():
    assert string_literal("100%_done", like=True) == r"'100\%\_done'"
    assert Condition("Name", "LIKE", "50% O'Brien").render() == r"Name LIKE '50\% O\'Brien'"
    assert like_pattern("Name", starts_with="Acme_") == r"Name LIKE 'Acme\_%'"
    assert like_pattern("Name", contains="a%b") == r"Name LIKE '%a\%b%'"
    assert like_pattern("Name", ends_with="Ltd") == "Name LIKE '%Ltd'"


def test_select_builds_and_checks_names():
    soql = select(
        "Opportunity",
        ["Id", "Name", "Account.Name"],
        [
            Condition("SystemModstamp", ">", datetime(2026, 1, 1, tzinfo=UTC)),
            Condition("StageName", "IN", ["Closed Won", "Closed Lost"]),
        ],
        order_by=["SystemModstamp", "Id ASC"],
        limit=10,
    )
    assert soql == (
        "SELECT Id, Name, Account.Name FROM Opportunity WHERE SystemModstamp > 2026-01-01T00:00:00Z "
        "AND StageName IN ('Closed Won', 'Closed Lost') ORDER BY SystemModstamp, Id ASC LIMIT 10"
    )
    for bad in ("Name FROM User--", "Id,Name", "1Name", "Name__c)"):
        with pytest.raises(ValueError):
            name(bad)
    with pytest.raises(ValueError):
        Condition("Name", "; DROP", 1).render()
    with pytest.raises(TypeError):
        Condition("Id", "IN", "abc").render()
    with pytest.raises(ValueError, match="aware"):
        literal(datetime(2026, 1, 1))
