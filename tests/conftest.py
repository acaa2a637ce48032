"""Fixtures shared by the unit tests, and which build of the message layer a run tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from sipproxy import compiled


def pytest_report_header() -> str:
    """Said at the top of every run: compiled (mypyc) or pure Python (sipproxy.compiled)."""
    build = compiled.select()
    kind = "compiled (mypyc)" if build.compiled else "pure Python"
    return f"sipproxy message layer: {kind}" + (f" ({build.reason})" if build.reason else "")


@pytest.fixture
def failures() -> Iterator[list[LogEvent]]:
    """Failures logged while the test runs (events with a ``log_failure``): a proxy that
    "never crashes" logs none either."""
    found: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None:
            found.append(event)

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield found
    globalLogPublisher.removeObserver(observer)
