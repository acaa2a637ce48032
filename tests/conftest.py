"""Says at the top of every run which build of the message layer it tests (sipproxy.compiled)."""

from __future__ import annotations

from sipproxy import compiled


def pytest_report_header() -> str:
    build = compiled.select()
    kind = "compiled (mypyc)" if build.compiled else "pure Python"
    return f"sipproxy message layer: {kind}" + (f" ({build.reason})" if build.reason else "")
