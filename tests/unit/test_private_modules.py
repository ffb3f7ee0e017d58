"""No ``_private`` module of one package is imported from another (issue 17): helpers shared
across packages are public modules (``hooks/soql.py``, ``hooks/odata.py``, ``masking.py`` ...)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"


def _package(path: Path) -> str:
    return ".".join(path.relative_to(PLUGINS).parent.parts)


def test_no_private_module_is_imported_from_another_package():
    crossings = []
    for path in (PLUGINS / "cosell_sync").rglob("*.py"):
        importer = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                private = [i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")]
                if parts[0] == "cosell_sync" and private and ".".join(parts[: private[0]]) != importer:
                    crossings.append(f"{path.relative_to(ROOT)}: {module}")
    assert crossings == []
