"""docs/architecture.md's "Where things live" table is true: what it lists exists, and it
lists every package and module of the code.

The rule, for the packages `pyproject.toml` installs: `meterline` and the component
packages it links to (`receivers/`, `processors/`, `exporters/`, `gateway/`, ...: the
top-level directories that install as `meterline.receivers` and so on):

- A row's first column holds one or more paths in backticks, relative to the repository
  root (`meterline/queue/`: a directory; `tests/a.py`, `tests/b.py`: several). Every path
  listed exists, and no path has two rows.
- The core (`meterline/`): every module has a row of its own, and every subpackage has a
  row of its own, which covers the modules inside it.
- The component packages (every other one): every module and subpackage is covered,
  either by a row of its own, or by being named, relative to it, in the row of a
  directory that holds it (the `exporters/kafka/` row names `messages.py`; the
  `receivers/` row names `webhook` and `decoders/otoroshi.py`), in backticks, with or
  without `.py`, a subpackage with or without its trailing `/`.
- `__init__.py` and `__main__.py` are their package's, not modules of their own.
"""

from __future__ import annotations

import re

from tests.helpers import ROOT

DOC = ROOT / "docs" / "architecture.md"
CORE = "meterline"


def _table() -> list[tuple[list[str], str]]:
    """The rows of the table: (paths of the first column, the row's whole text)."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("## Where things live")
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start:end if end > 0 else None].splitlines():
        cells = line.split("|")
        if not line.startswith("|") or len(cells) < 3 or set(cells[1].strip()) <= {"-"}:
            continue
        if cells[1].strip() == "path":
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[1]), line))
    return rows


def _packages() -> list[str]:
    """The core and the top-level directories its links install as its subpackages."""
    linked = [link.resolve().relative_to(ROOT).as_posix()
              for link in (ROOT / CORE).iterdir() if link.is_symlink()]
    return sorted([CORE, *linked])


def _code(package: str) -> list[str]:
    """The modules (`a/b.py`) and subpackages (`a/b/`) of a package, recursively."""
    found = []
    for path in sorted((ROOT / package).rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        if "__pycache__" in path.parts or path.is_symlink():
            continue  # a link is the package it points to, listed under its own name
        if path.is_dir() and (path / "__init__.py").exists():
            found.append(relative + "/")
        elif path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            found.append(relative)
    return found


def _named(row: str, relative: str) -> bool:
    forms = {relative, relative.removesuffix(".py"), relative.rstrip("/")}
    return any(f"`{form}`" in row or f"`{form} " in row or f"`{form}(" in row
               for form in forms)


def test_every_path_the_table_lists_exists_and_has_one_row():
    rows = _table()
    assert rows, "the table was not found under '## Where things live'"
    listed = [path for paths, _ in rows for path in paths]
    missing = [p for p in listed if not (ROOT / p).exists()
               or (p.endswith("/") and not (ROOT / p).is_dir())]
    assert not missing, f"docs/architecture.md lists paths that do not exist: {missing}"
    twice = sorted({p for p in listed if listed.count(p) > 1})
    assert not twice, f"docs/architecture.md lists these paths in more than one row: {twice}"


def test_every_package_and_module_is_in_the_table():
    rows = _table()
    own = {path for paths, _ in rows for path in paths}
    by_path = {path: row for paths, row in rows for path in paths}
    uncovered = []
    for package in _packages():
        for item in _code(package):
            if item in own:
                continue
            parent = item.rstrip("/").rpartition("/")[0] + "/"
            if package == CORE:
                if item.endswith(".py") and parent != f"{CORE}/" and parent in own:
                    continue  # a module of a core subpackage that has a row
                uncovered.append(item)
                continue
            holders = [d for d in by_path if d.endswith("/") and item.startswith(d)]
            if not any(_named(by_path[d], item[len(d):]) for d in holders):
                uncovered.append(item)
    assert not uncovered, (
        "docs/architecture.md's 'Where things live' does not list these (give each a row, "
        f"or name it in the row of a directory that holds it): {uncovered}")
