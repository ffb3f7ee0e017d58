"""The CRM registry agrees with the hooks, sides, DAG files and mappings it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosell_sync import crms
from cosell_sync.engine.mapping import DEFAULTS, load_mapping

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", crms.NAMES)
def test_each_crm_entry_matches_its_hook_side_dag_and_mapping(name):
    crm = crms.get(name)
    hook = crm.hook_class()
    assert hook.default_conn_name == crm.conn_id
    assert crm.side_class().crm == name
    assert (ROOT / "dags" / f"cosell_sync_{name}.py").is_file()
    assert (DEFAULTS / f"{name}.yaml").is_file() and load_mapping(name).crm == name
    assert crm.conn_ids[0] == crm.conn_id


def test_the_dynamics365_connection_keeps_its_deprecated_id():
    from cosell_sync.hooks.dynamics365 import DEPRECATED_CONN_ID

    assert crms.get("dynamics365").deprecated_conn_ids == (DEPRECATED_CONN_ID,)


def test_an_unknown_crm_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown CRM 'hubspot' \\(known: dynamics365, salesforce\\)"):
        crms.get("hubspot")
    assert crms.label("salesforce") == "Salesforce" and crms.label(None, "CRM") == "CRM"
