"""Mapping, normalization and the planner: pure functions, no Airflow, no network."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cosell_sync.engine.mapping import DEFAULTS, MappingError, load_mapping, load_mapping_file, parse_mapping
from cosell_sync.engine.normalize import crm_frame, referrals_frame, side_value
from cosell_sync.engine.plan import plan
from tests.helpers import dynamics_org_mapping, with_paths

SF = load_mapping("salesforce")
DV = dynamics_org_mapping()
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def referral(rid: str, **over):
    doc = {
        "id": rid,
        "name": f"Deal {rid}",
        "status": "New",
        "substatus": "Pending",
        "direction": "Incoming",
        "updatedDateTime": (T0 + timedelta(minutes=5)).isoformat(),
        "eTag": '"e1"',
        "customerProfile": {
            "name": "Contoso Ltd",
            "address": {"country": "US", "postalCode": "98052", "city": "Redmond", "addressLine1": "1 Way"},
            "team": [{"firstName": "Ada", "lastName": "Lovelace", "email": "Ada@Contoso.example"}],
        },
        "details": {
            "dealValue": 1000,
            "currency": "usd",
            "closingDateTime": "2027-01-31T00:00:00Z",
            "notes": "hello",
            "requirements": {"solutions": [{"id": "SOL-2"}, {"id": "SOL-1"}]},
        },
        "inviteContext": {"assistanceRequestCode": "QuotesOrLicensing"},
    }
    return with_paths(doc, over)


def sf_opp(oid: str, **over):
    rec = {
        "Id": oid,
        "Name": f"Opp {oid}",
        "Amount": 1000,
        "CurrencyIsoCode": "USD",
        "CloseDate": "2027-01-31",
        "Description": "hello",
        "StageName": "Prospecting",
        "PC_How_Can_Microsoft_Help__c": "QuotesOrLicensing",
        "PC_Solutions__c": "SOL-1;SOL-2",
        "PC_Referral_Id__c": None,
        "PC_Sync_With_Partner_Center__c": False,
        "IsClosed": False,
        "SystemModstamp": (T0 + timedelta(minutes=5)).isoformat(),
        "Account": {"Name": "Contoso Ltd", "BillingCountry": "US", "BillingPostalCode": "98052"},
        "Contact": {"FirstName": "Ada", "LastName": "Lovelace", "Email": "ada@contoso.example"},
    }
    rec.update(over)
    return rec


def dv_opp(**over):
    """A Dataverse opportunity linked to referral r1, holding the same values as ``referral("r1")``."""
    return {
        "opportunityid": "o1",
        "name": "Deal r1",
        "estimatedvalue": 1000,
        "statecode": 0,
        "salesstage": 1,
        "estimatedclosedate": "2027-01-31",
        "description": "hello",
        "cosell_referralid": "r1",
        "cosell_howcanmicrosofthelp": 100000003,
        "cosell_solutions": "SOL-1;SOL-2",
        "transactioncurrency": {"isocurrencycode": "USD"},
        "modifiedon": T0.isoformat(),
        **over,
    }


def linked_opp(oid: str, rid: str, **over):
    """The CRM side of a linked pair, holding the same values as ``referral(rid)``."""
    return sf_opp(oid, Name=f"Deal {rid}", PC_Referral_Id__c=rid, **over)


def frames(refs, opps, mapping=SF):
    p = referrals_frame(refs, mapping)
    c = crm_frame(opps, mapping, "Id" if mapping is SF else "opportunityid")
    assert p.errors.empty and c.errors.empty, (p.errors, c.errors)
    return p.frame, c.frame


def link(pc_row: pd.Series, crm_id: str, synced_at=T0, **base_over) -> dict:
    base = {f: pc_row[f] for f in SF.fields if f in pc_row}
    base.update(base_over)
    return {"referral_id": pc_row["referral_id"], "crm_id": crm_id, "base": base, "synced_at": synced_at}


def links_frame(rows):
    return pd.DataFrame(rows, columns=["referral_id", "crm_id", "base", "synced_at"])


# -- mapping --------------------------------------------------------------------------------------------


def test_default_mappings_load_and_define_the_synced_fields():
    assert {f.name for f in SF.synced_fields()} == {
        "name",
        "deal_value",
        "currency",
        "close_date",
        "notes",
        "stage",
        "help_code",
        "solutions",
        "share_with_microsoft",
        "microsoft_status",
    }
    assert "sales_stage" in DV.fields and DV.fields["stage"].crm_values.read["0"] == "*"
    assert SF.fields["customer_name"].sync == "create"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["fields"]["name"].update(direction="sideways"), r"fields\.name\.direction: 'sideways'"),
        (
            lambda d: d["fields"]["stage"]["values"]["crm"]["write"].pop("won"),
            r"fields\.stage\.values\.crm\.write: no value to write for canonical 'won'",
        ),
        (lambda d: d["fields"]["notes"].update(colour="blue"), r"fields\.notes\.colour: unknown key"),
        (lambda d: d["records"].pop("link_field"), r"records\.link_field: is required"),
        (lambda d: d.update(crm="hubspot"), r"crm: must be one of"),
        (lambda d: d["fields"]["deal_value"].update(type="money"), r"fields\.deal_value\.type: 'money'"),
        (lambda d: d["fields"].pop("stage"), r"fields\.stage: is required"),
        (
            lambda d: d["fields"]["name"].update(values={"referral": {}, "crm": {}}),
            r"fields\.name\.values: value maps are only for type enum",
        ),
    ],
)
def test_invalid_mapping_names_the_key(edit, message):
    doc = yaml.safe_load((DEFAULTS / "salesforce.yaml").read_text())
    edit(doc)
    with pytest.raises(MappingError, match=message):
        parse_mapping(doc, "custom.yaml")


def test_mapping_file_errors(tmp_path: Path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nfields: [unclosed\n")
    with pytest.raises(MappingError, match=r"broken\.yaml: not valid YAML at line"):
        load_mapping_file(broken)
    with pytest.raises(MappingError, match="cannot be read"):
        load_mapping("salesforce", tmp_path / "missing.yaml")
    custom = tmp_path / "mine.yaml"
    custom.write_text((DEFAULTS / "dynamics365.yaml").read_text())
    monkeypatch.setenv("COSELL_MAPPING_SALESFORCE", str(custom))
    with pytest.raises(MappingError, match="expected 'salesforce'"):
        load_mapping("salesforce")


# -- normalize ------------------------------------------------------------------------------------------


def test_referrals_normalize_to_canonical_values():
    frame = referrals_frame([referral("r1")], SF).frame.iloc[0]
    assert frame["currency"] == "USD" and frame["deal_value"] == 1000.0 and frame["close_date"] == "2027-01-31"
    assert (
        frame["stage"] == "new"
        and frame["solutions"] == "SOL-1;SOL-2"
        and frame["contact_email"] == "ada@contoso.example"
    )
    assert frame["help_code"] == "QuotesOrLicensing"


def test_bad_values_are_reported_per_record_and_field_and_good_records_kept():
    docs = [
        referral("good1"),
        referral("badcur", details__currency="dollars"),
        referral("nocountry", customerProfile__address={"postalCode": "1"}),
        referral("badstage", status="Open", substatus="Whatever"),
        referral("badvalue", details__dealValue="lots"),
        referral("good2"),
    ]
    result = referrals_frame(docs, SF)
    assert list(result.frame["referral_id"]) == ["good1", "nocountry", "good2"]  # a missing country is not bad input
    errors = result.errors.set_index("key")
    assert errors.loc["badcur", "field"] == "details.currency" and "ISO 4217" in errors.loc["badcur", "message"]
    assert errors.loc["badstage", "field"] == "status/substatus" and "no mapping" in errors.loc["badstage", "message"]
    assert errors.loc["badvalue", "field"] == "details.dealValue" and "'lots'" in errors.loc["badvalue", "value"]


def test_crm_records_normalize_and_enum_write_back():
    frame = crm_frame([sf_opp("o1", StageName="Closed Won", IsClosed=True)], SF, "Id").frame.iloc[0]
    assert frame["stage"] == "won" and bool(frame["closed"]) and frame["customer_country"] == "US"
    assert side_value(SF.fields["stage"], "crm", "active") == "Qualification"
    assert side_value(SF.fields["stage"], "referral", "won") == "Closed/Won"
    assert side_value(DV.fields["help_code"], "crm", "QuotesOrLicensing") == "100000003"


# -- planner ----------------------------------------------------------------------------------------------


def test_first_sync_creates_both_ways_and_skips_with_reasons():
    pc, crm = frames(
        [
            referral("new"),
            referral("active", status="Active", substatus="Accepted"),
            referral("closed", status="Closed", substatus="Won"),
            referral("elsewhere", externalReferenceId="006XX"),
        ],
        [
            sf_opp("flagged", PC_Sync_With_Partner_Center__c=True),
            sf_opp("plain"),
            sf_opp("flaggedclosed", PC_Sync_With_Partner_Center__c=True, StageName="Closed Won", IsClosed=True),
            sf_opp("hasref", PC_Sync_With_Partner_Center__c=True, PC_Referral_Id__c="zzz"),
        ],
    )
    result = plan(pc, crm, links_frame([]), SF)
    assert sorted(result.crm_creates["referral_id"]) == ["active", "new"]
    assert list(result.pc_creates["crm_id"]) == ["flagged"]
    reasons = {(r.side, r.referral_id or r.crm_id): r.reason for r in result.skips.itertuples()}
    assert reasons == {
        ("partner_center", "closed"): "closed_unlinked",
        ("partner_center", "elsewhere"): "linked_elsewhere",
        ("crm", "plain"): "not_flagged",
        ("crm", "flaggedclosed"): "closed_unlinked",
        ("crm", "hasref"): "linked_elsewhere",
    }


def test_one_side_change_is_copied_and_only_that_field():
    pc, crm = frames([referral("r1", details__dealValue=2500)], [linked_opp("o1", "r1")])
    base_pc, _ = frames([referral("r1")], [])
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1")]), SF)
    assert result.changes[["target", "field", "old", "new", "reason"]].values.tolist() == [
        ["crm", "deal_value", 1000.0, 2500.0, "partner_center"]
    ]
    assert result.updates("crm").iloc[0]["fields"] == {"deal_value": 2500.0}
    assert result.new_base.iloc[0]["base"]["deal_value"] == 2500.0
    assert result.conflicts.empty


def test_crm_change_flows_to_partner_center():
    pc, crm = frames([referral("r1")], [sf_opp("o1", Name="Renamed", PC_Referral_Id__c="r1")])
    base_pc, _ = frames([referral("r1")], [])
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1")]), SF)
    assert result.updates("partner_center").iloc[0]["fields"] == {"name": "Renamed"}
    assert result.updates("crm").empty


def test_conflict_is_resolved_by_authority_and_reported():
    pc, crm = frames(
        [
            referral(
                "r1", name="PC name", details__notes="pc notes", updatedDateTime=(T0 + timedelta(hours=2)).isoformat()
            )
        ],
        [sf_opp("o1", Name="CRM name", Description="crm notes", SystemModstamp=(T0 + timedelta(hours=1)).isoformat())],
    )
    base_pc, _ = frames([referral("r1")], [])
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1")]), SF)
    conflicts = result.conflicts.set_index("field")
    assert conflicts.loc["name", "winner"] == "crm" and conflicts.loc["name", "chosen"] == "CRM name"  # authority: crm
    assert conflicts.loc["notes", "winner"] == "partner_center"  # authority: newest, and PC was edited later
    assert result.updates("partner_center").iloc[0]["fields"] == {"name": "CRM name"}
    assert result.updates("crm").iloc[0]["fields"] == {"notes": "pc notes"}
    assert set(result.changes["reason"]) == {"conflict"}


def test_same_change_on_both_sides_agrees_without_writes():
    pc, crm = frames([referral("r1", details__dealValue=7)], [linked_opp("o1", "r1", Amount=7)])
    base_pc, _ = frames([referral("r1")], [])
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1")]), SF)
    assert result.changes.empty and result.conflicts.empty
    assert result.new_base.iloc[0]["base"]["deal_value"] == 7.0


def test_echo_of_our_own_write_is_not_a_change():
    pc, crm = frames(
        [referral("r1", updatedDateTime=T0.isoformat())], [linked_opp("o1", "r1", SystemModstamp=T0.isoformat())]
    )
    base_pc, _ = frames([referral("r1")], [])
    synced = T0 + timedelta(seconds=1)
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1", synced_at=synced)]), SF)
    assert result.changes.empty
    assert result.skips[["side", "reason"]].values.tolist() == [["pair", "echo"]]
    late = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1", synced_at=T0 - timedelta(hours=1))]), SF)
    assert late.skips["reason"].tolist() == ["no_change"]


def test_closed_referral_is_terminal_but_its_outcome_reaches_the_crm():
    pc, crm = frames(
        [referral("r1", status="Closed", substatus="Won")],
        [sf_opp("o1", Name="CRM edit after close")],
    )
    base_pc, _ = frames([referral("r1", status="Active", substatus="Accepted")], [])
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1")]), SF)
    assert result.updates("crm").iloc[0]["fields"] == {"stage": "won"}
    assert result.updates("partner_center").empty
    skip = result.skips[result.skips["reason"] == "terminal_referral"]
    assert skip[["field", "crm_id"]].values.tolist() == [["name", "o1"]]


def test_invalid_status_transition_is_not_planned():
    pc, crm = frames(
        [referral("r1", status="Active", substatus="Accepted")], [linked_opp("o1", "r1", StageName="Prospecting")]
    )
    base = link(frames([referral("r1", status="Active", substatus="Accepted")], [])[0].iloc[0], "o1")
    result = plan(pc, crm, links_frame([base]), SF)
    assert result.updates("partner_center").empty
    assert result.skips[result.skips["reason"] == "invalid_transition"]["detail"].tolist() == ["stage active -> new"]


def test_directions_limit_what_is_planned():
    pc, crm = frames(
        [referral("r1", details__dealValue=5), referral("n1")],
        [sf_opp("o1", Name="x"), sf_opp("f1", PC_Sync_With_Partner_Center__c=True)],
    )
    base_pc, _ = frames([referral("r1")], [])
    result = plan(pc, crm, links_frame([link(base_pc.iloc[0], "o1")]), SF, directions=["pc_to_crm"])
    assert result.pc_creates.empty and result.updates("partner_center").empty
    assert list(result.crm_creates["referral_id"]) == ["n1"] and not result.updates("crm").empty
    with pytest.raises(ValueError, match="direction"):
        plan(pc, crm, links_frame([]), SF, directions=["sideways"])


def test_links_are_recovered_from_the_records_instead_of_duplicating():
    pc, crm = frames([referral("r1", externalReferenceId="o1")], [sf_opp("o1", PC_Referral_Id__c="r1", Name="Deal r1")])
    result = plan(pc, crm, links_frame([]), SF)
    assert result.crm_creates.empty and result.pc_creates.empty
    assert result.recovered_links.values.tolist() == [["r1", "o1"]]
    assert set(result.new_base["referral_id"]) == {"r1"}


def test_keep_means_no_opinion_for_dynamics_open_opportunities():
    pc = referrals_frame([referral("r1", status="Active", substatus="Accepted", salesStage="Develop")], DV).frame
    opp = dv_opp()
    crm = crm_frame([opp], DV, "opportunityid").frame
    assert crm.iloc[0]["stage"] == "*"
    base = {f: pc.iloc[0][f] for f in DV.fields}
    result = plan(pc, crm, links_frame([{"referral_id": "r1", "crm_id": "o1", "base": base, "synced_at": T0}]), DV)
    assert result.changes.empty  # statecode 0 says nothing against "active"
    won = copy.deepcopy(opp) | {"statecode": 1}
    result = plan(
        pc,
        crm_frame([won], DV, "opportunityid").frame,
        links_frame([{"referral_id": "r1", "crm_id": "o1", "base": base, "synced_at": T0}]),
        DV,
    )
    assert result.updates("partner_center").iloc[0]["fields"] == {"stage": "won"}


def test_missing_side_is_taken_as_unchanged():
    pc, _ = frames([referral("r1", details__dealValue=99)], [])
    base_pc, _ = frames([referral("r1")], [])
    result = plan(pc, crm_frame([], SF, "Id").frame, links_frame([link(base_pc.iloc[0], "o1")]), SF)
    assert result.updates("crm").iloc[0]["fields"] == {"deal_value": 99.0}


def test_a_referral_not_read_this_run_is_terminal_if_its_last_synced_stage_closed_it():
    closed = link(frames([referral("r1", status="Closed", substatus="Lost")], [])[0].iloc[0], "o1")
    _, crm = frames([], [linked_opp("o1", "r1", Description="late CRM edit", StageName="Closed Lost", IsClosed=True)])
    empty_pc = referrals_frame([], SF).frame
    result = plan(empty_pc, crm, links_frame([closed]), SF)
    assert result.updates("partner_center").empty
    terminal = result.skips[result.skips["reason"] == "terminal_referral"]
    assert terminal["field"].tolist() == ["notes"] and terminal["crm_id"].tolist() == ["o1"]


def test_a_no_opinion_marker_in_a_stored_base_counts_as_nothing():
    pc = referrals_frame([referral("r1", salesStage="Develop")], DV).frame
    base = {f: pc.iloc[0][f] for f in DV.fields} | {"stage": "*"}
    opp = dv_opp()
    links = links_frame([{"referral_id": "r1", "crm_id": "o1", "base": base, "synced_at": T0}])
    result = plan(pc, crm_frame([opp], DV, "opportunityid").frame, links, DV)
    assert result.new_base.iloc[0]["base"]["stage"] == "new"  # settled to the real value, never "*"
