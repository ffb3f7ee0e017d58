"""The README's layout table matches the tree (issue 17): every module and folder a row names
exists under the row's folder, and every package and module of the provider and the sandbox is
named in some row."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(?P<paths>[^|]+?)` \| (?P<text>.*) \|$")
NAME = re.compile(r"`([A-Za-z_][\w/.-]*)`")


def layout_rows() -> dict[str, str]:
    """First column's folder -> the row's text, for the rows of the README's "Layout" table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m and m["paths"].endswith("/"):
            rows[m["paths"]] = m["text"]
    return rows


def named(text: str) -> set[str]:
    """The module and folder names a row's text puts in backticks (``x.py``, ``x/``, or a bare
    module name in a list such as ``(`query`, `writes`)``)."""
    names = set()
    for token in NAME.findall(text):
        if token.endswith((".py", "/")) or re.fullmatch(r"[a-z_][a-z0-9_]*", token):
            names.add(token)
    return names


def test_the_layout_table_covers_the_provider_and_the_sandbox():
    rows = layout_rows()
    for folder in ("plugins/cosell_sync/", "dags/", "sandbox/cosell_sandbox/", "tests/", "benchmarks/"):
        assert folder in rows, f"the README's Layout table has no row for {folder}"


def test_every_module_a_row_names_exists_under_its_folder():
    missing = []
    for folder, text in layout_rows().items():
        root = REPO / folder
        assert root.is_dir(), f"the Layout table names {folder}, which does not exist"
        files = {p.relative_to(root).as_posix() for p in root.rglob("*") if "__pycache__" not in p.parts}
        for name in named(text):
            if name.endswith("/"):
                found = any(f == name.rstrip("/") or f.endswith("/" + name.rstrip("/")) for f in files)
            elif name.endswith(".py"):
                found = any(f == name or f.endswith("/" + name) for f in files)
            else:  # a bare word: a module if one has that name, else prose (not checked)
                continue
            if not found:
                missing.append(f"{folder}: {name}")
    assert not missing, f"the README's Layout table names what is not in the tree: {missing}"


def test_every_package_and_module_is_named_in_a_row():
    rows = layout_rows()
    everything = " ".join(rows.values())
    words = named(everything)
    bare = {w.removesuffix(".py").rstrip("/").rsplit("/", 1)[-1] for w in words | set(rows)}
    unnamed = []
    for top in ("plugins/cosell_sync", "sandbox/cosell_sandbox"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO / top)
            if "__pycache__" in rel.parts or rel.name in ("__init__.py", "__main__.py"):
                continue
            if rel.parent.parts and rel.parent.name not in bare:
                unnamed.append(f"{top}/{rel.parent.as_posix()}/")
            # Modules at the top and in folders with a row of their own are named one by one.
            listed = rel.parent == Path(".") or f"{top}/{rel.parent.as_posix()}/" in rows
            if listed and rel.stem not in bare:
                unnamed.append(f"{top}/{rel.as_posix()}")
    assert not sorted(set(unnamed)), f"the README's Layout table does not name: {sorted(set(unnamed))}"
