"""``--dist loadgroup`` for pytest 9: keep every test of an ``xdist_group`` on one worker.

pytest-xdist (3.8) tags each test's node id with its group (``test_x@group``) by assigning
``item._nodeid``; since pytest 9 a node's id lives in ``item._id``, so the tag was silently
lost and the groups were spread over both workers: two real Airflow clusters, or the kill
test and a cluster, then ran at once and starved each other on this 2-core machine. This
plugin puts the tag where pytest 9 reads it (and leaves ids alone when xdist's own tag took).
"""

from __future__ import annotations

import pytest


def group_of(item: pytest.Item) -> str | None:
    names = sorted(
        {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    )
    return "_".join(names) or None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in items:
        group = group_of(item)
        if group is None or item.nodeid.endswith(f"@{group}"):
            continue
        if not hasattr(item, "_id"):  # pragma: no cover - pytest < 9: xdist's own tag works there
            continue
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{group}")
