"""``cosell-sync setup salesforce``: the shipped metadata source (well-formed CustomField XML that
names every custom field the default mapping uses, typed as the sandbox org declares them) and
the deploy commands the command prints."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from cosell_sandbox.salesforce.schema import HELP_CODES, SYNC_STATUS, build_schema
from cosell_sync.cli import main
from cosell_sync.cli.setup import PERMISSION_SET, SALESFORCE_SOURCE, salesforce_fields
from cosell_sync.engine.mapping import load_mapping

NS = "{http://soap.sforce.com/2006/04/metadata}"
FIELDS = SALESFORCE_SOURCE / "force-app" / "main" / "default" / "objects" / "Opportunity" / "fields"
# Salesforce's describe() type of each metadata type (the sandbox declares fields as describe shows them)
DESCRIBE_TYPE = {
    "Checkbox": "boolean",
    "Text": "string",
    "Url": "url",
    "Picklist": "picklist",
    "LongTextArea": "textarea",
}


def _parse(path: Path) -> ET.ElementTree:
    """Our own shipped files (trusted), parsed by the standard library."""
    return ET.parse(path)  # noqa: S314


def _field(path: Path) -> ET.Element:
    root = _parse(path).getroot()  # raises on XML that is not well-formed
    assert root.tag == f"{NS}CustomField", path.name
    return root


def _text(root: ET.Element, tag: str) -> str | None:
    node = root.find(f"{NS}{tag}")
    return None if node is None else node.text


def _picklist_values(root: ET.Element) -> list[str]:
    return [_text(v, "fullName") for v in root.iterfind(f"{NS}valueSet/{NS}valueSetDefinition/{NS}value")]


def _custom_fields_of_mapping() -> set[str]:
    mapping = load_mapping("salesforce")
    paths = {fm.crm for fm in mapping.fields.values()} | set(mapping.records.values())
    return {p for p in paths if p.endswith("__c") and "." not in p}


def test_every_file_is_a_well_formed_custom_field_named_as_its_file():
    files = sorted(FIELDS.glob("*.field-meta.xml"))
    assert files
    for path in files:
        root = _field(path)
        assert _text(root, "fullName") == path.name.removesuffix(".field-meta.xml")
        assert _text(root, "label")
        assert _text(root, "type") in DESCRIBE_TYPE, path.name


def test_the_source_names_every_custom_field_the_default_mapping_uses():
    wanted = _custom_fields_of_mapping()
    assert "PC_Referral_Id__c" in wanted and "PC_Sync_Status__c" in wanted  # the mapping's records, too
    assert wanted <= set(salesforce_fields())
    assert set(salesforce_fields()) <= wanted  # nothing the sync does not use


def test_types_lengths_and_picklists_agree_with_the_sandbox_org():
    opportunity = build_schema().objects["Opportunity"]
    for name in salesforce_fields():
        root = _field(FIELDS / f"{name}.field-meta.xml")
        declared = opportunity.fields[name]
        assert DESCRIBE_TYPE[_text(root, "type")] == declared.type, name
        if _text(root, "type") in ("Text", "LongTextArea"):
            assert int(_text(root, "length")) == declared.length, name
        if declared.type == "picklist":
            assert _picklist_values(root) == list(declared.picklist), name
            assert _text(root.find(f"{NS}valueSet"), "restricted") == "true"
        if declared.type == "boolean":
            assert _text(root, "defaultValue") == str(declared.default).lower(), name
        assert (_text(root, "externalId") == "true") == bool(declared.external_id), name
        assert (_text(root, "unique") == "true") == bool(declared.unique), name


def test_the_spec_s_picklists_and_the_external_id():
    status = _field(FIELDS / "PC_Sync_Status__c.field-meta.xml")
    assert _picklist_values(status) == ["Synced", "Pending", "Error"] == SYNC_STATUS
    help_code = _field(FIELDS / "PC_How_Can_Microsoft_Help__c.field-meta.xml")
    mapping = load_mapping("salesforce")
    values = mapping.fields["help_code"].crm_values
    assert set(values.write.values()) <= set(_picklist_values(help_code)) == set(HELP_CODES)
    ref = _field(FIELDS / "PC_Referral_Id__c.field-meta.xml")
    assert (_text(ref, "type"), _text(ref, "length"), _text(ref, "externalId"), _text(ref, "unique")) == (
        "Text",
        "100",
        "true",
        "true",
    )
    audit = _field(FIELDS / "PC_Audit__c.field-meta.xml")
    assert int(_text(audit, "visibleLines")) > 0


def test_the_permission_set_grants_every_field_and_the_manifest_lists_them():
    perm = _parse(
        SALESFORCE_SOURCE / "force-app/main/default/permissionsets" / f"{PERMISSION_SET}.permissionset-meta.xml"
    )
    granted = {
        _text(fp, "field"): (_text(fp, "readable"), _text(fp, "editable"))
        for fp in perm.getroot().iterfind(f"{NS}fieldPermissions")
    }
    assert granted == {f"Opportunity.{n}": ("true", "true") for n in salesforce_fields()}
    package = _parse(SALESFORCE_SOURCE / "manifest" / "package.xml").getroot()
    members = {
        _text(t, "name"): sorted(m.text for m in t.iterfind(f"{NS}members")) for t in package.iterfind(f"{NS}types")
    }
    assert members == {
        "CustomField": sorted(f"Opportunity.{n}" for n in salesforce_fields()),
        "PermissionSet": [PERMISSION_SET],
    }
    project = json.loads((SALESFORCE_SOURCE / "sfdx-project.json").read_text())
    assert project["packageDirectories"] == [{"path": "force-app", "default": True}]


def test_the_command_prints_the_deploy_and_permission_set_commands():
    result = CliRunner().invoke(
        main, ["setup", "salesforce", "--target-org", "acme-prod", "--integration-user", "sync@acme.example"]
    )
    assert result.exit_code == 0, result.output
    assert f"cd {SALESFORCE_SOURCE}" in result.output
    assert "sf project deploy start --source-dir force-app --target-org acme-prod" in result.output
    assert (
        f"sf org assign permset --name {PERMISSION_SET} --target-org acme-prod --on-behalf-of sync@acme.example"
        in result.output
    )
    for name in salesforce_fields():
        assert name in result.output


def test_copy_to_copies_the_project_and_refuses_a_folder_in_use(tmp_path: Path):
    target = tmp_path / "sfdx"
    result = CliRunner().invoke(main, ["setup", "salesforce", "--copy-to", str(target)])
    assert result.exit_code == 0, result.output
    assert salesforce_fields(target) == salesforce_fields()
    assert f"cd {target.resolve()}" in result.output
    again = CliRunner().invoke(main, ["setup", "salesforce", "--copy-to", str(target)])
    assert again.exit_code != 0 and "not empty" in again.output


@pytest.mark.parametrize("args", [["setup", "--help"], ["setup", "salesforce", "--help"]])
def test_help(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "Usage:" in result.output
