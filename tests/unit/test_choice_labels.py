"""Issue 13: choice values named by label in the mapping, translated with the org's options (pure;
the metadata reads are tested against the sandbox in tests/integration/test_choice_labels.py)."""

from __future__ import annotations

import pytest
import yaml

from cosell_sync.engine.mapping import DEFAULTS, MappingError, choice_columns, parse_mapping, resolve_choices
from cosell_sync.engine.normalize import crm_frame, side_value

HELP = {
    "General or other": 858880000,
    "Customer technical architecture": 858880001,
    "Proof of concept or demo": 858880002,
    "Quotes or licensing": 858880003,
    "Post-sales customer success": 858880004,
    "Workload-specific value proposition": 858880005,
}


STATES = {"Open": 0, "Won": 1, "Lost": 2}
STAGES = {"Qualify": 0, "Develop": 1, "Propose": 2, "Close": 3}


def dynamics_mapping(edit=None):
    doc = yaml.safe_load((DEFAULTS / "dynamics365.yaml").read_text())
    if edit:
        edit(doc)
    return parse_mapping(doc, "dynamics365.yaml")


def help_by_label(doc):
    values = doc["fields"]["help_code"]["values"]["crm"]
    codes = list(values["write"])
    labels = list(HELP)
    values["read"] = {labels[i]: code for i, code in enumerate(codes)}
    values["write"] = {code: labels[i] for i, code in enumerate(codes)}


def test_labels_are_translated_to_the_orgs_values_and_back():
    mapping = dynamics_mapping(help_by_label)
    assert "cosell_howcanmicrosofthelp" in choice_columns(mapping, labelled_only=True)
    resolved = resolve_choices(mapping, {"cosell_howcanmicrosofthelp": HELP, "statecode": STATES, "salesstage": STAGES})
    fm = resolved.fields["help_code"]
    assert fm.crm_values.read["858880003"] == "QuotesOrLicensing"
    assert side_value(fm, "crm", "ProofOfConceptOrDemo") == "858880002"
    # Left as text: the enum on a text column (no options in the metadata).
    assert set(choice_columns(resolved, labelled_only=True)) == {"cosell_microsoftstatus"}
    # A record holding the org's value reads as the canonical code.
    opp = {"opportunityid": "o1", "name": "n", "statecode": 0, "cosell_howcanmicrosofthelp": 858880003}
    frame = crm_frame([opp], resolved, "opportunityid").frame
    assert frame.loc[0, "help_code"] == "QuotesOrLicensing"


def test_labels_match_whatever_their_case_and_pinned_integers_still_work():
    def lower(doc):
        help_by_label(doc)
        values = doc["fields"]["help_code"]["values"]["crm"]
        values["write"] = {k: v.upper() for k, v in values["write"].items()}

    resolved = resolve_choices(dynamics_mapping(lower), {"cosell_howcanmicrosofthelp": HELP})
    assert side_value(resolved.fields["help_code"], "crm", "GeneralOrOther") == "858880000"
    # The shipped stage map pins integers (0, 1, 2): checked against the options, kept as they are.
    pinned = dynamics_mapping(
        lambda d: d["fields"]["stage"]["values"]["crm"].update(
            read={"0": "*", "1": "won", "2": "lost"}, write={"new": "0", "active": "0", "won": "1", "lost": "2"}
        )
    )
    assert resolve_choices(pinned, {"statecode": STATES}).fields["stage"].crm_values.write["won"] == "1"


def test_a_label_the_org_lacks_is_an_error_naming_file_field_label_and_the_labels_it_has():
    def misspelt(doc):
        help_by_label(doc)
        doc["fields"]["help_code"]["values"]["crm"]["write"]["QuotesOrLicensing"] = "Quotes and licensing"

    with pytest.raises(MappingError) as err:
        resolve_choices(dynamics_mapping(misspelt), {"cosell_howcanmicrosofthelp": HELP}, where="this Dataverse org")
    message = str(err.value)
    assert message.startswith("mapping dynamics365.yaml: fields.help_code.values.crm.write.QuotesOrLicensing:")
    assert "the label 'Quotes and licensing' is not an option of cosell_howcanmicrosofthelp in this Dataverse org" in (
        message
    )
    assert "'General or other' (858880000)" in message and "'Quotes or licensing' (858880003)" in message


def test_a_pinned_integer_the_org_lacks_is_an_error_too():
    def pin(doc):  # the help codes pinned as the default publisher's 100000000 ...
        values = doc["fields"]["help_code"]["values"]["crm"]
        codes = list(values["write"])
        values["read"] = {str(100000000 + i): code for i, code in enumerate(codes)}
        values["write"] = {code: str(100000000 + i) for i, code in enumerate(codes)}

    pinned = dynamics_mapping(pin)
    assert "cosell_howcanmicrosofthelp" not in choice_columns(pinned, labelled_only=True)
    with pytest.raises(
        MappingError, match=r"fields\.help_code\.values\.crm\.read\.100000000: 100000000 is not a value"
    ):
        resolve_choices(pinned, {"cosell_howcanmicrosofthelp": HELP})


def test_the_shipped_dynamics_mapping_names_its_choices_by_label():
    assert set(choice_columns(dynamics_mapping(), labelled_only=True)) == {
        "statecode",
        "salesstage",
        "cosell_howcanmicrosofthelp",
        "cosell_microsoftstatus",  # a text column: the metadata lists no options, its values are text
    }
