"""
State that survives a restart, end to end: ``[registrar] store = "sqlite:PATH"``.

The firewall set-up of examples/firewall.toml in the standard topology (netns.NatNet): the
phone (sipp in ``phone``) registers through the proxy on ``fw`` (the nat plugin gives the
provider a ``nat-TOKEN`` Contact) with a real provider, Debian's Kamailio in ``provider``,
answering its challenge. Then the proxy is stopped (SIGTERM, and in another run SIGKILL: no
chance to write anything at the end) and started again, and a caller at the provider (sipp)
calls the phone's address-of-record: Kamailio looks up the token it has on file and sends the
INVITE to the proxy, which must still know where that token's phone is. The phone does not
register again in between. With the default store (memory) the same call is refused: the
proxy forgot the token (the test would fail without a working store).

The proxy as the registrar (on loopback): a user registers with it, it is killed (SIGKILL) and
started again, and a call to the user reaches the contact it registered.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support.harness import (
    LOOPBACK,
    HarnessError,
    ProxyProcess,
    Sipp,
    SippProcess,
    SippResult,
    free_port,
)
from tests.integration.support.kamailio import Kamailio, kamailio_unavailable
from tests.integration.support.netns import (
    FW_INSIDE,
    PHONE_IP,
    PROVIDER_IP,
    NatNet,
    NsProxyProcess,
    NsSipp,
)
from tests.integration.support.sites import SIP, SIPP_TIMEOUT, firewall_config, pair

DOMAIN = "provider.example"
#: one user per run: Kamailio keeps every run's binding, each run calls only its own
USERS = {"sigterm": "alice", "sigkill": "bob", "memory": "carol"}
PASSWORD = "secret"
#: seconds the stopped proxy gets to end (SIGTERM) or to be gone (SIGKILL)
STOP_LIMIT = 10.0


@dataclass
class Provider:
    net: NatNet
    kamailio: Kamailio

    def registers_seen(self, user: str) -> int:
        """The REGISTERs for ``user`` that reached the provider (its log has each whole)."""
        return len(re.findall(rf"^REGISTER sip:\S+ SIP/2\.0\r?\n(?:.+\r?\n)*?To: <sip:{user}@",
                              self.kamailio.log_text(), re.M))


@pytest.fixture(scope="module")
def provider(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    reason = kamailio_unavailable()
    if reason:
        pytest.skip(reason)
    net = NatNet.build()
    try:
        kamailio = Kamailio(
            net.provider, tmp_path_factory.mktemp("provider"), PROVIDER_IP, domain=DOMAIN,
            users={user: PASSWORD for user in USERS.values()}, trusted=(PROVIDER_IP,))
        kamailio.start()
        try:
            yield Provider(net, kamailio)
        finally:
            kamailio.stop()
    finally:
        net.close()


def proxy_config(store: str) -> dict[str, Any]:
    config = firewall_config()
    config["registrar"] = {"store": store}
    return config


def register(phone: NsSipp, user: str) -> SippResult:
    """The phone registers with the provider through the firewall, answering its challenge."""
    contact = f"sip:{user}@{PHONE_IP}:{SIP}"
    return phone.start_uac(
        "register_auth.xml", (FW_INSIDE, SIP), local_port=SIP, count=1, timeout=SIPP_TIMEOUT,
        keys={"user": user, "domain": DOMAIN, "contact": contact, "expires": "3600"},
        variables={"contact": contact}, extra_args=["-au", user, "-ap", PASSWORD],
    ).wait()


def call_from_provider(caller: NsSipp, user: str) -> SippProcess:
    """A caller at the provider calls the user's address-of-record through Kamailio."""
    return caller.start_uac("uac_rr.xml", (PROVIDER_IP, SIP), count=1, timeout=SIPP_TIMEOUT,
                            keys={"ruri": f"sip:{user}@{DOMAIN}"})


def saved(path: Path, table: str, limit: float = 5.0) -> None:
    """Wait (at most ``limit`` s) until the proxy has written a row of ``table`` to its state
    file: a ``kill -9`` loses the writes still in flight, so the test kills it after that."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists():
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                if db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                    return
            except sqlite3.OperationalError:
                pass  # no table yet
            finally:
                db.close()
        time.sleep(0.02)
    raise AssertionError(f"no row in {table} of {path} after {limit} s")


def log_of(proxy: ProxyProcess) -> str:
    return proxy.log_path.read_text(errors="replace")


def stop(proxy: ProxyProcess, how: signal.Signals) -> None:
    """Stop the proxy with ``how``: SIGTERM ends it cleanly, SIGKILL leaves it no last word."""
    process = proxy.process
    assert process is not None
    process.send_signal(how)
    process.wait(STOP_LIMIT)
    assert process.returncode == -how, process.returncode  # twist ends by the signal it got
    if how == signal.SIGTERM:  # it stopped its services (and closed the store) first
        log = log_of(proxy)
        assert "Main loop terminated." in log and "Traceback" not in log, proxy.log_tail(40)


@pytest.mark.netns
@pytest.mark.parametrize("run", ["sigterm", "sigkill", "memory"])
def test_a_registered_phone_is_called_after_a_restart(
    provider: Provider, tmp_path: Path, run: str
) -> None:
    user = USERS[run]
    net = provider.net
    store = "memory" if run == "memory" else f"sqlite:{tmp_path / 'state.db'}"
    phone = NsSipp(net.phone, tmp_path / "phone")
    caller = NsSipp(net.provider, tmp_path / "caller")
    first = NsProxyProcess(net.fw, proxy_config(store), tmp_path / "first", name="proxy")
    second = NsProxyProcess(net.fw, proxy_config(store), tmp_path / "second", name="proxy")

    def logs() -> str:
        return f"{first.log_tail(40)}\n{second.log_tail(40)}\n{provider.kamailio.log_tail(40)}"

    try:
        first.start()
        registered = register(phone, user)
        assert registered.ok(1), f"{registered.describe()}\n{logs()}"
        registers = provider.registers_seen(user)
        assert registers == 2, logs()  # the one challenged, the one with the digest
        if run != "memory":
            saved(tmp_path / "state.db", "tokens")
        stop(first, signal.SIGKILL if run == "sigkill" else signal.SIGTERM)
        second.start()

        if run == "memory":
            # the proxy forgot the token the provider calls: refused, the phone never rings
            result = call_from_provider(caller, user).wait()
            assert result.failed == 1 and result.successful == 0, f"{result.describe()}\n{logs()}"
            assert re.search(r"refused INVITE from .* to sip:nat-\S+: 404", second.log_text()), \
                logs()
            return
        uas = phone.start_uas("uas_rr.xml", SIP, count=1, timeout=SIPP_TIMEOUT)
        answered, called = pair(uas, call_from_provider(caller, user))
        assert called.ok(1), f"{called.describe()}\n{logs()}"
        assert answered.ok(1), f"{answered.describe()}\n{logs()}"
        assert provider.registers_seen(user) == registers, "the phone registered again"
        assert "registration tokens restored" in second.log_text(), logs()
    except HarnessError as e:
        raise AssertionError(f"{e}\n{logs()}") from e
    finally:
        phone.cleanup()
        caller.cleanup()
        first.stop()
        second.stop()


def test_a_user_registered_with_the_proxy_is_called_after_kill_9(
    proxy_factory: Any, sipp: Sipp, tmp_path: Path
) -> None:
    phone_port = free_port()
    config = {
        "proxy": {"domains": ["lan.example"]},
        "listen": [{"side": "inside", "transport": "udp", "address": LOOPBACK,
                    "port": free_port()}],
        "registrar": {"store": f"sqlite:{tmp_path / 'state.db'}"},
        "plugins": {"enabled": []},
    }
    first = proxy_factory(config, name="first")
    registered = sipp.run_uac(
        "register.xml", first.address(), count=1, timeout=SIPP_TIMEOUT,
        keys={"user": "alice", "domain": "lan.example",
              "contact": f"sip:alice@{LOOPBACK}:{phone_port}", "expires": "3600"})
    assert registered.ok(1), f"{registered.describe()}\n{first.log_tail()}"
    saved(tmp_path / "state.db", "bindings")
    stop(first, signal.SIGKILL)

    second = proxy_factory(config, name="second")
    assert "1 bindings restored" in log_of(second), second.log_tail()
    phone = sipp.start_uas("uas_rr.xml", phone_port, count=1, timeout=SIPP_TIMEOUT)
    called = sipp.run_uac("uac_rr.xml", second.address(), count=1, timeout=SIPP_TIMEOUT,
                          keys={"ruri": "sip:alice@lan.example"})
    answered = phone.wait(10)
    assert called.ok(1), f"{called.describe()}\n{second.log_tail()}"
    assert answered.ok(1), f"{answered.describe()}\n{second.log_tail()}"
