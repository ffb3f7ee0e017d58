"""The emulators' copy of JSON documents (issue 16: copy.deepcopy was most of their CPU)."""

from __future__ import annotations

import copy

from cosell_sandbox.server import json_copy


def test_equal_to_deepcopy_and_sharing_nothing_mutable():
    doc = {"id": "1", "team": [{"email": "a@b.c", "tags": ["x"]}], "details": {"dealValue": 1.5, "x": None}, "n": 3}
    before = copy.deepcopy(doc)
    copied = json_copy(doc)
    assert copied == copy.deepcopy(doc)
    copied["team"][0]["tags"].append("y")
    copied["details"]["dealValue"] = 2
    copied["team"].append({})
    assert doc == before


def test_scalars_and_empty_containers():
    for value in (None, True, 0, 1.25, "s", [], {}):
        assert json_copy(value) == value
    empty: list = []
    assert json_copy(empty) is not empty
