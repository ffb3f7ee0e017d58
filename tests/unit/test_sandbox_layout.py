"""Layout contracts (issue 17): in the sandbox, one package per emulator, named like its hook;
in the sandbox and the provider, small modules and no import cycle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "sandbox" / "cosell_sandbox"
PACKAGES = [SANDBOX, ROOT / "plugins" / "cosell_sync"]
QUERY_PARSERS = {"salesforce/soql.py", "dynamics365/odata.py"}  # the only modules allowed past 600 lines
EMULATORS = {
    "partner_center": "PartnerCenterEmulator",
    "dynamics365": "Dynamics365Emulator",
    "salesforce": "SalesforceEmulator",
    "entra": "EntraEmulator",
}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (at any level, TYPE_CHECKING blocks included), with the
    packages that importing it runs first (except the packages ``name`` itself sits in)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            chain = target.split(".") if target else []
            for i in range(1, len(chain) + 1):
                dep = ".".join(chain[:i])
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    found.add(dep)
    return found


def test_one_package_per_emulator_named_like_its_hook():
    for package, cls in EMULATORS.items():
        assert (SANDBOX / package / "app.py").is_file(), package
        module = importlib.import_module(f"cosell_sandbox.{package}")
        assert getattr(module, cls).__module__ == f"cosell_sandbox.{package}.app"
    flat = {p.stem for p in SANDBOX.glob("*.py")}
    assert not flat & {"dataverse", "dataverse_batch", "dataverse_metadata", "salesforce_bulk", "soql", "odata"}


@pytest.mark.parametrize("root", PACKAGES, ids=lambda p: p.name)
def test_no_module_over_600_lines_but_the_query_parsers(root: Path):
    long = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if len(p.read_text().splitlines()) > 600 and (root != SANDBOX or str(p.relative_to(root)) not in QUERY_PARSERS)
    }
    assert not long


@pytest.mark.parametrize("root", PACKAGES, ids=lambda p: p.name)
def test_no_import_cycle(root: Path):
    modules = _modules(root)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
