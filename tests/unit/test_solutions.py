"""Solutions keep their Partner Center details (issue 13): the catalog and the merge."""

from __future__ import annotations

import json
import sys
import types

import pytest

from cosell_sync.errors import ConfigurationError
from cosell_sync.sides import solutions as mod
from cosell_sync.sides.solutions import (
    SolutionCatalog,
    configured_catalog,
    merge_solutions,
    new_referral_solutions,
    with_solution_details,
)

A = {
    "id": "SOL-6115380-IPC",
    "name": "Contoso Cloud Migration Factory",
    "type": "Name",
    "publisherName": "Contoso Ltd",
    "solutionType": "Service",
    "price": 12000.0,
    "quantity": 3,
    "currency": "EUR",
}
B = {"id": "SOL-7204417-ABC", "name": "Fabrikam Secure Workplace", "type": "Name", "publisherName": "Fabrikam"}
C_CONF = {"id": "SOL-5519027-XYZ", "name": "Data Estate Modernization on Azure", "publisherName": "Northwind"}


@pytest.fixture(autouse=True)
def no_configuration(monkeypatch):
    """No solutions file and no Variable unless a test sets them; a fresh process cache."""
    monkeypatch.delenv(mod.ENV_VAR, raising=False)
    monkeypatch.setattr(mod, "_cached", None)
    monkeypatch.setattr(mod, "_variable", lambda key: None)


def catalog(*items) -> SolutionCatalog:
    return SolutionCatalog.parse(list(items), "test")


# -- merge ---------------------------------------------------------------------------------------
def test_a_solution_that_stays_keeps_every_detail_and_a_new_one_gets_the_catalogs():
    merged = merge_solutions([A, B], [A["id"], C_CONF["id"]], catalog(C_CONF, {**A, "name": "catalog's name"}))
    assert merged == [A, {**C_CONF, "type": "Name"}]  # A as Partner Center holds it, not as configured


def test_order_current_first_then_new_ones_sorted_and_id_alone_without_configuration():
    current = [{"id": "S-9", "name": "nine"}, B, {"id": "S-1", "name": "one"}]
    merged = merge_solutions(current, ["S-5", "S-1", "S-3", "S-9", "S-5", " "], catalog())
    assert merged == [{"id": "S-9", "name": "nine"}, {"id": "S-1", "name": "one"}, {"id": "S-3"}, {"id": "S-5"}]


def test_merge_is_pure_and_handles_empty_lists():
    current = [dict(A)]
    merged = merge_solutions(current, [A["id"]], catalog())
    merged[0]["name"] = "changed"
    assert current == [A]
    assert merge_solutions(None, [], catalog()) == []
    assert merge_solutions([A, B], [], catalog()) == []
    assert merge_solutions([{"name": "no id"}, "junk", A], [A["id"]], catalog()) == [A]


def test_with_solution_details_only_touches_the_solutions_path():
    path = ["details", "requirements", "solutions"]
    referral = {"details": {"requirements": {"solutions": [A, B]}}}
    bare = [{"id": B["id"]}, {"id": "S-NEW"}]
    assert with_solution_details(path, bare, referral, catalog()) == [B, {"id": "S-NEW"}]
    assert with_solution_details(["details", "notes"], "x", referral, catalog()) == "x"
    # A create (no current document): the catalog's details, or id alone.
    new = [{"id": A["id"]}, {"id": "SOL-9"}]
    assert with_solution_details(path, new, None, catalog(A)) == [A, {"id": "SOL-9"}]  # sorted by id
    assert with_solution_details(path, [], referral, catalog()) == []
    assert new_referral_solutions(["SOL-9", A["id"]], catalog(A)) == [A, {"id": "SOL-9"}]


# -- catalog: the file ---------------------------------------------------------------------------
def test_a_json_list_file(tmp_path, monkeypatch):
    path = tmp_path / "solutions.json"
    path.write_text(json.dumps([A, C_CONF]), encoding="utf-8")
    monkeypatch.setenv(mod.ENV_VAR, str(path))
    loaded = SolutionCatalog.load()
    assert len(loaded) == 2 and str(path) in loaded.source
    assert loaded.get(A["id"]) == A
    assert loaded.get(C_CONF["id"]) == {**C_CONF, "type": "Name"}  # type defaults to Name
    assert loaded.get("SOL-OTHER") is None


def test_a_yaml_file_keyed_by_id(tmp_path, monkeypatch):
    path = tmp_path / "solutions.yaml"
    path.write_text(
        "SOL-6115380-IPC:\n  name: Contoso Cloud Migration Factory\n  publisherName: Contoso Ltd\n"
        "  type: Category\n  price: 10\nSOL-7204417-ABC: Fabrikam Secure Workplace\n",
        encoding="utf-8",
    )
    monkeypatch.setenv(mod.ENV_VAR, str(path))
    loaded = SolutionCatalog.load()
    assert loaded.get("SOL-6115380-IPC") == {
        "id": "SOL-6115380-IPC",
        "name": "Contoso Cloud Migration Factory",
        "publisherName": "Contoso Ltd",
        "type": "Category",
        "price": 10,
    }
    assert loaded.get("SOL-7204417-ABC") == {
        "id": "SOL-7204417-ABC",
        "name": "Fabrikam Secure Workplace",
        "type": "Name",
    }


def test_the_file_wins_over_the_variable(tmp_path, monkeypatch):
    path = tmp_path / "solutions.json"
    path.write_text(json.dumps([A]), encoding="utf-8")
    monkeypatch.setattr(mod, "_variable", lambda key: json.dumps([B]))
    monkeypatch.setenv(mod.ENV_VAR, str(path))
    assert list(SolutionCatalog.load().solutions) == [A["id"]]
    monkeypatch.setenv(mod.ENV_VAR, "")
    assert list(SolutionCatalog.load().solutions) == [B["id"]]


@pytest.mark.parametrize(
    ("content", "suffix", "names"),
    [
        ("[{", ".json", ["does not parse"]),
        ("a: [b", ".yaml", ["does not parse"]),
        ('"just text"', ".json", ["expected a list"]),
        (json.dumps([A, {"name": "no id"}]), ".json", ["entry 1", "needs an 'id'"]),
        (json.dumps([A, {"id": "S-2", "publisher": "typo"}]), ".json", ["entry 1", "publisher"]),
        (json.dumps([{"id": "S-1", "type": "Product"}]), ".json", ["entry 0", "'Product'"]),
        (json.dumps([{"id": "S-1", "price": "12"}]), ".json", ["entry 0", "'price'"]),
        (json.dumps([{"id": "S-1", "currency": "euro"}]), ".json", ["entry 0", "currency"]),
        (json.dumps([{"id": "S-1"}, {"id": "S-1"}]), ".json", ["entry 1", "appears twice"]),
        (json.dumps({"S-1": {"id": "S-2"}}), ".json", ["entry 'S-1'", "differs"]),
        (json.dumps({"S-1": 5}), ".json", ["entry 'S-1'", "must be an object"]),
        (json.dumps([{"id": "A;B"}]), ".json", ["entry 0", "';'"]),
    ],
)
def test_a_bad_file_is_a_configuration_error_naming_the_file_and_the_entry(
    tmp_path, monkeypatch, content, suffix, names
):
    path = tmp_path / f"solutions{suffix}"
    path.write_text(content, encoding="utf-8")
    monkeypatch.setenv(mod.ENV_VAR, str(path))
    with pytest.raises(ConfigurationError) as err:
        SolutionCatalog.load()
    assert str(path) in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_a_missing_file_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv(mod.ENV_VAR, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigurationError, match=r"nope\.yaml"):
        configured_catalog()


def test_the_process_catalog_is_reread_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "solutions.json"
    path.write_text(json.dumps([A]), encoding="utf-8")
    monkeypatch.setenv(mod.ENV_VAR, str(path))
    first = configured_catalog()
    assert configured_catalog() is first  # reused while the file is unchanged
    path.write_text(json.dumps([A, B, C_CONF]), encoding="utf-8")
    assert len(configured_catalog()) == 3


# -- catalog: the Airflow Variable -----------------------------------------------------------------
def test_the_airflow_variable_through_the_task_sdk(monkeypatch):
    """``airflow.sdk.Variable.get`` is what is called (patched here), lazily, with a default."""
    monkeypatch.undo()  # the real _variable
    monkeypatch.delenv(mod.ENV_VAR, raising=False)
    monkeypatch.setattr(mod, "_cached", None)
    calls = []

    def get(key, default=None, deserialize_json=False):
        calls.append((key, default))
        return json.dumps({A["id"]: A, C_CONF["id"]: C_CONF})

    from airflow.sdk import Variable

    monkeypatch.setattr(Variable, "get", staticmethod(get))
    loaded = configured_catalog()
    assert calls == [("cosell_solutions", None)]
    assert loaded.get(A["id"]) == A and "Airflow Variable 'cosell_solutions'" in loaded.source
    configured_catalog()
    assert len(calls) == 1  # reused within the TTL


def test_no_variable_or_no_airflow_is_an_empty_catalog(monkeypatch):
    monkeypatch.undo()
    monkeypatch.delenv(mod.ENV_VAR, raising=False)
    from airflow.sdk import Variable

    monkeypatch.setattr(Variable, "get", staticmethod(lambda key, default=None, deserialize_json=False: default))
    assert len(SolutionCatalog.load()) == 0
    # No Task SDK at all (a script outside Airflow): still an empty catalog.
    monkeypatch.setitem(sys.modules, "airflow.sdk", types.ModuleType("airflow.sdk"))
    assert len(SolutionCatalog.load()) == 0


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ("not json", ["Airflow Variable 'cosell_solutions'", "not JSON"]),
        (json.dumps([{"id": "S-1", "type": "Nope"}]), ["Airflow Variable 'cosell_solutions'", "entry 0", "'Nope'"]),
    ],
)
def test_a_bad_variable_is_a_configuration_error(monkeypatch, raw, names):
    monkeypatch.setattr(mod, "_variable", lambda key: raw)
    with pytest.raises(ConfigurationError) as err:
        SolutionCatalog.load()
    for name in names:
        assert name in str(err.value)
