"""What ``pip install .`` (a regular, not editable, install) puts on disk: every subpackage of
sipproxy (tests/test_admin_page.py checks the status page's files), so the README's first
command gives a working proxy."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _options() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["options"]


def test_every_package_is_listed_for_installation() -> None:
    listed = set(_options()["packages"].split())
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sipproxy").rglob("__init__.py")
    }
    assert on_disk - listed == set()

