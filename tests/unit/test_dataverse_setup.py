"""The setup plan for Dataverse: the columns the mapping needs, and what an org lacks (pure logic)."""

from __future__ import annotations

from cosell_sync.engine.dataverse_setup import ExistingColumn, plan_setup, required_columns
from cosell_sync.engine.mapping import load_mapping

STATUSES = ("Synced", "Pending", "Error")


def specs():
    return {s.name: s for s in required_columns(load_mapping("dynamics365"), STATUSES)}


def test_the_default_mapping_needs_the_documented_columns():
    columns = specs()
    assert {
        "cosell_syncwithpartnercenter",
        "cosell_referralid",
        "cosell_referrallink",
        "cosell_howcanmicrosofthelp",
        "cosell_solutions",
        "cosell_audit",
        "cosell_syncstatus",
    } <= set(columns)
    assert all(name.startswith("cosell_") for name in columns)
    assert columns["cosell_referralid"].kind == "String" and columns["cosell_referralid"].max_length == 100
    assert columns["cosell_syncwithpartnercenter"].kind == "Boolean"
    assert columns["cosell_audit"].kind == "Memo"
    assert columns["cosell_syncstatus"].labels == STATUSES
    help_labels = columns["cosell_howcanmicrosofthelp"].labels
    assert columns["cosell_howcanmicrosofthelp"].kind == "Picklist"
    assert "Proof of concept or demo" in help_labels and len(help_labels) == 6


def test_an_empty_org_gets_everything():
    plan = plan_setup(list(specs().values()), {}, [], "cosell_referralid")
    assert {c.name for c in plan.create} == set(specs()) and plan.create_key and not plan.errors
    assert plan.changes and any("create alternate key on cosell_referralid" in line for line in plan.lines())


def test_a_finished_org_needs_nothing():
    existing = {
        s.name: ExistingColumn(s.metadata_type, tuple(label.upper() for label in s.labels)) for s in specs().values()
    }
    plan = plan_setup(list(specs().values()), existing, [(["cosell_referralid"], "Active")], "cosell_referralid")
    assert not plan.changes and not plan.errors and plan.key_status == "Active"
    assert set(plan.present) == set(specs())


def test_missing_options_are_added_and_a_wrong_type_is_an_error_naming_the_column():
    existing = {s.name: ExistingColumn(s.metadata_type, s.labels) for s in specs().values()}
    existing["cosell_syncstatus"] = ExistingColumn("PicklistAttributeMetadata", ("Synced",))
    existing["cosell_audit"] = ExistingColumn("StringAttributeMetadata")
    plan = plan_setup(list(specs().values()), existing, [(["other"], "Active")], "cosell_referralid")
    assert plan.add_options == {"cosell_syncstatus": ["Pending", "Error"]}
    assert len(plan.errors) == 1 and "cosell_audit" in plan.errors[0] and "MemoAttributeMetadata" in plan.errors[0]
    assert plan.create_key  # a key on another column is not the one the sync needs
