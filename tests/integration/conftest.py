"""
Fixtures for the integration tests: real proxy processes and sipp on loopback, and (C{nat_net})
network namespaces with a real NAT (tests/integration/support/netns.py).

Without sipp (Debian package sip-tester; scripts/test installs it) every test in this directory
is skipped with that reason. On a failure the report gets the tails of the proxies' logs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support.harness import ProxyProcess, Sipp, sipp_available
from tests.integration.support.netns import NatNet, delete_leftovers, netns_unavailable

_HERE = Path(__file__).resolve().parent
_NO_SIPP = "sipp is not installed (Debian package sip-tester; scripts/test installs it)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have_sipp = sipp_available()
    for item in items:
        if _HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.integration)
        if not have_sipp:
            item.add_marker(pytest.mark.skip(reason=_NO_SIPP))


class ProxyFactory:
    """Starts proxies for one test (each in its own directory) and stops them all afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proxies: list[ProxyProcess] = []

    def __call__(self, config: Mapping[str, Any], **kwargs: Any) -> ProxyProcess:
        name = kwargs.pop("name", f"proxy{len(self.proxies) + 1}")
        proxy = ProxyProcess(config, self.workdir / name, name=name, **kwargs)
        self.proxies.append(proxy)
        return proxy.start()

    def stop_all(self) -> None:
        for proxy in self.proxies:
            proxy.stop()

    def report(self) -> str:
        return "\n".join(proxy.log_tail() for proxy in self.proxies)


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def sipp(tmp_path: Path) -> Iterator[Sipp]:
    runner = Sipp(tmp_path / "sipp")
    try:
        yield runner
    finally:
        runner.cleanup()


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip unless namespaces can be made here (root, ip, nft, sipp); clear crashed runs' ones."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    delete_leftovers()


@pytest.fixture
def nat_net(netns_ready: None) -> Iterator[NatNet]:
    """The phone / fw / provider namespaces of netns.NatNet, deleted after the test."""
    with NatNet.build() as net:
        yield net


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        factory = funcargs.get("proxy_factory")
        if isinstance(factory, ProxyFactory) and factory.proxies:
            report.sections.append(("proxy logs", factory.report()))
    return report
