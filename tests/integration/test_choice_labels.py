"""Issue 13: the mapping's choice values checked against the org at the start of a run: Salesforce
picklists through describe(), Dataverse option sets through the table metadata."""

from __future__ import annotations

import pytest
import yaml

from cosell_sync.dag_factory import check_mapping
from cosell_sync.engine.mapping import DEFAULTS, load_mapping, parse_mapping
from cosell_sync.errors import ConfigurationError
from cosell_sync.hooks.dynamics365 import DynamicsHook
from cosell_sync.hooks.partner_center import PartnerCenterHook
from cosell_sync.pipeline import commit, extract_crm, extract_partner_center, load_crm, load_partner_center, plan_run
from cosell_sync.sides.dynamics365 import DynamicsSide
from cosell_sync.sides.partner_center import PartnerCenterSide
from tests.integration.sync_jobs import no_sleep, scheduled_job


def edited(crm: str, edit) -> object:
    doc = yaml.safe_load((DEFAULTS / f"{crm}.yaml").read_text())
    edit(doc)
    return parse_mapping(doc, f"{crm}.yaml")


def test_salesforce_picklist_values_are_checked_against_describe(pc, sf_conn):
    assert check_mapping("salesforce", load_mapping("salesforce")) == {}
    describes = [e for e in pc.salesforce.log if e.path.endswith("/sobjects/Opportunity/describe")]
    assert len(describes) == 1

    def renamed(doc):
        doc["fields"]["stage"]["values"]["crm"]["write"]["won"] = "Won It"
        doc["fields"]["stage"]["values"]["crm"]["read"]["Won It"] = "won"

    with pytest.raises(ConfigurationError) as err:
        check_mapping("salesforce", edited("salesforce", renamed))
    message = str(err.value)
    assert message.startswith("mapping salesforce.yaml: fields.stage.values.crm.read.Won It: 'Won It' is not a value")
    assert "fields.stage.values.crm.write.won: 'Won It' is not a value of the StageName picklist" in message
    assert "'Closed Won'" in message and "'Prospecting'" in message  # the values the org has


def test_dynamics_labels_resolve_to_the_orgs_publisher_values_and_sync(pc, conns, store, tmp_path):
    """The emulator's org has its own publisher prefix (858,880,000); the shipped mapping, which
    names the choices by label, syncs unchanged: the options are read once, at the start of the run,
    and travel to the other tasks."""
    base = pc.dynamics365.configure()["choice_value_base"]
    assert base == 858_880_000
    pc.partner_center.seed(6, seed=5)
    for doc in pc.partner_center.referrals.values():
        doc.update(status="New", substatus="Pending", externalReferenceId=None)
        doc["inviteContext"]["assistanceRequestCode"] = "QuotesOrLicensing"
    pc.dynamics365.seed(opportunities=4, accounts=2, flagged=4, seed=5)
    mapping = load_mapping("dynamics365")
    before = len([e for e in pc.dynamics365.log if "EntityDefinitions" in e.path])
    choices = check_mapping("dynamics365", mapping)
    assert choices["cosell_howcanmicrosofthelp"]["Quotes or licensing"] == base + 3
    assert choices["cosell_syncstatus"]["Synced"] == base
    metadata_reads = len([e for e in pc.dynamics365.log if "EntityDefinitions" in e.path])
    assert metadata_reads - before == 2  # the picklists, and statecode's state options

    job = scheduled_job("dynamics365", store, tmp_path / "staging")
    pc_side = PartnerCenterSide(PartnerCenterHook(sleep=no_sleep), mapping)
    crm_side = DynamicsSide(DynamicsHook(sleep=no_sleep), mapping, choices)
    extract_partner_center(job, pc_side, store)
    extract_crm(job, crm_side, store)
    plan_run(job, store, pc_side, crm_side)
    assert load_crm(job, crm_side)["failed"] == 0
    assert load_partner_center(job, pc_side, crm_side)["failed"] == 0
    report = commit(job, store)
    assert report["pc_to_crm"]["created"] == 6 and report["crm_to_pc"]["created"] == 4, report
    assert len([e for e in pc.dynamics365.log if "EntityDefinitions" in e.path]) == metadata_reads  # not again

    labels = {v: k for k, v in choices["cosell_howcanmicrosofthelp"].items()}
    rows = pc.dynamics365.rows("opportunities")
    created = [r for r in rows if r.get("cosell_referralid") and r["cosell_referralid"] in pc.partner_center.referrals]
    imported = [
        r for r in created if pc.partner_center.referrals[r["cosell_referralid"]].get("direction") != "Outgoing"
    ]
    assert imported and all(r["cosell_howcanmicrosofthelp"] == base + 3 for r in imported)
    assert all(r["cosell_syncstatus"] == base for r in created)
    # Each flagged opportunity's help value reached its referral as the code of that option's label.
    codes = {
        "General or other": "GeneralOrOther",
        "Customer technical architecture": "CustomerTechnicalArchitecture",
        "Proof of concept or demo": "ProofOfConceptOrDemo",
        "Quotes or licensing": "QuotesOrLicensing",
        "Post-sales customer success": "PostSalesCustomerSuccess",
        "Workload-specific value proposition": "WorkloadSpecificValueProposition",
    }
    flagged = [r for r in rows if r.get("cosell_syncwithpartnercenter") and r not in imported]
    assert len(flagged) == 4
    for row in flagged:
        doc = pc.partner_center.referrals[row["cosell_referralid"]]
        assert doc["inviteContext"]["assistanceRequestCode"] == codes[labels[row["cosell_howcanmicrosofthelp"]]]


def test_a_dynamics_label_the_org_lacks_fails_the_run_at_its_start_naming_it(pc, conns):
    def misspelt(doc):
        doc["fields"]["help_code"]["values"]["crm"]["write"]["QuotesOrLicensing"] = "Quotes and licensing"

    with pytest.raises(ConfigurationError) as err:
        check_mapping("dynamics365", edited("dynamics365", misspelt))
    message = str(err.value)
    print(f"\n[missing label] {message}")
    assert message.startswith(
        "mapping dynamics365.yaml: fields.help_code.values.crm.write.QuotesOrLicensing: the label "
        "'Quotes and licensing' is not an option of cosell_howcanmicrosofthelp in this Dataverse org; its options: "
        "'General or other' (858880000), 'Customer technical architecture' (858880001)"
    ), message
    # The org of another publisher: the same mapping resolves to its values.
    pc.dynamics365.configure(choice_value_base=100_000_000)
    choices = check_mapping("dynamics365", load_mapping("dynamics365"))
    assert choices["cosell_howcanmicrosofthelp"]["General or other"] == 100_000_000
