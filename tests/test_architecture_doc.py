"""docs/architecture.md stays true: its module table names every module file of the package
(and of ``twisted/plugins``), and every module it names exists.

A module added or removed without the table following fails here, with the file to add to or
remove from the table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
#: the trees whose every ``.py`` file the table must name
TREES = ("sipproxy", "twisted/plugins")
#: a table row whose first cell is one backticked path ending in .py
ROW = re.compile(r"^\|\s*`(?P<path>[^`]+\.py)`\s*\|")


def table_modules(text: str) -> list[str]:
    """The paths in the first column of the table under the ``## Modules`` heading."""
    section = re.search(r"^## Modules\n(?P<body>.*?)(?=^## )", text, re.M | re.S)
    assert section is not None, "docs/architecture.md has no '## Modules' section"
    return [m["path"] for line in section["body"].splitlines() if (m := ROW.match(line))]


def module_files() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for tree in TREES
        for path in (ROOT / tree).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def test_the_table_is_read() -> None:
    """The parser finds rows in a table like the doc's, and only in the Modules section."""
    text = (
        "## Layers\n| `sipproxy/elsewhere.py` | not the table |\n"
        "## Modules\n| module | job |\n|---|---|\n"
        "| `sipproxy/a.py` | one |\n| `sipproxy/b/c.py` | two |\n"
        "## Next\n| `sipproxy/after.py` | not the table |\n"
    )
    assert table_modules(text) == ["sipproxy/a.py", "sipproxy/b/c.py"]


def test_every_module_is_in_the_table() -> None:
    named = set(table_modules(DOC.read_text(encoding="utf-8")))
    missing = sorted(module_files() - named)
    assert not missing, f"docs/architecture.md's module table does not name: {missing}"


def test_every_module_in_the_table_exists() -> None:
    named = table_modules(DOC.read_text(encoding="utf-8"))
    gone = sorted(path for path in named if not (ROOT / path).is_file())
    assert not gone, f"docs/architecture.md's module table names missing files: {gone}"
    twice = sorted({path for path in named if named.count(path) > 1})
    assert not twice, f"docs/architecture.md's module table names these twice: {twice}"
