"""The provider is registered through the apache_airflow_provider entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

from cosell_sync.get_provider_info import get_provider_info


def test_entry_point_lists_both_connection_types():
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("cosell_sync.")]
    info = ep.load()()
    types = {c["connection-type"]: c for c in info["connection-types"]}
    assert set(types) == {"partner_center", "dynamics365"}
    assert types["partner_center"]["hook-class-name"] == "cosell_sync.hooks.partner_center.PartnerCenterHook"
    # secrets are password fields in the form
    fields = types["partner_center"]["conn-fields"]
    assert fields["refresh_token"]["schema"]["format"] == "password"
    assert fields["user_password"]["schema"]["format"] == "password"


def test_airflow_providers_manager_shows_the_connection_forms():
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert "cosell-sync" in pm.providers
    widgets = pm.connection_form_widgets
    for name in ("tenant_id", "authority", "referrals_url", "webhooks_url", "refresh_token", "ca_bundle"):
        assert f"extra__partner_center__{name}" in widgets
    assert widgets["extra__partner_center__refresh_token"].is_sensitive
    assert "extra__dynamics365__tenant_id" in widgets
    behaviours = pm.field_behaviours
    assert behaviours["partner_center"]["relabeling"]["login"] == "Client ID"
    assert behaviours["dynamics365"]["relabeling"]["host"] == "Environment URL"


def test_provider_info_validates_against_airflow_schema():
    import json
    from pathlib import Path

    import airflow
    import jsonschema

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_hook_class_matches_its_declared_connection_type():
    from cosell_sync.hooks.partner_center import PartnerCenterHook

    assert PartnerCenterHook.conn_type == "partner_center"
    assert PartnerCenterHook.default_conn_name == "partner_center_default"


def test_every_declared_hook_class_imports_and_matches_its_type():
    import importlib

    for conn in get_provider_info()["connection-types"]:
        module, _, name = conn["hook-class-name"].rpartition(".")
        hook_class = getattr(importlib.import_module(module), name)
        assert hook_class.conn_type == conn["connection-type"]
