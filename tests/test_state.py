"""State that survives a restart: ``[registrar] store = "sqlite:PATH"`` with real SQLite files.

Each test runs the proxy's pieces once, stops (closing the store, or abandoning it as a
``kill -9`` would, after its writes ran), opens the same file again as the next start does, and
checks what a user would: the phone is still reachable, the banned source still banned, and
nothing that had expired comes back.
"""

from __future__ import annotations

import queue
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from sipproxy.config import ConfigError, parse_config
from sipproxy.context import Target
from sipproxy.flood import FloodGuard
from sipproxy.interfaces import IStateStore, SavedBan, SavedToken
from sipproxy.location import Binding, LocationService
from sipproxy.message import Request, Source
from sipproxy.service import makeService
from sipproxy.sqlite_state import SqliteStateStore
from sipproxy.state import MemoryStateStore, restore_bindings
from sipproxy.testing import ProxyHarness, answer, sip_request
from tests.nat_site import (
    FIREWALL,
    OUTSIDE,
    PHONE,
    PHONE_CONTACT,
    PROVIDER,
    PROVIDER_IP,
    Net,
    provider_request,
    register,
)
from tests.proxy_harness import CONFIG as REGISTRAR

T = TypeVar("T")

PHONE_SOURCE = Source("UDP", "192.168.1.20", 5062, "192.168.1.1", 5060, "inside")


class FromThreads:
    """The reactor's ``callFromThread`` for these tests: what the store's writer thread hands
    back waits in a queue until :meth:`wait` runs it here, in the test's thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def wait(self, d: Deferred[T], limit: float = 10.0) -> T:
        """Run what the writer thread hands back until ``d`` fires (at most ``limit`` s)."""
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = time.monotonic() + limit
        while not results:
            f, args = self.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args)
        return results[0]


@pytest.fixture
def threads() -> FromThreads:
    return FromThreads()


def open_store(path: Path, threads: FromThreads, now: float = 0.0) -> SqliteStateStore:
    return SqliteStateStore(str(path), threads, now)


def rows(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def binding(contact: str, expires_at: float) -> Binding:
    return Binding("sip:alice@lan.example", contact, expires_at, q=0.5, call_id="c1", cseq=7,
                   source=PHONE_SOURCE, path=("<sip:edge.lan.example;lr>",),
                   instance="<urn:uuid:0001>", reg_id=1, user_agent="phone/1.0")


# ------------------------------------------------------------------------------------------------
# the store
# ------------------------------------------------------------------------------------------------
def test_the_stores_provide_the_interface(tmp_path: Path, threads: FromThreads) -> None:
    assert verifyObject(IStateStore, open_store(tmp_path / "state.db", threads))
    assert verifyObject(IStateStore, MemoryStateStore())
    assert not MemoryStateStore().durable


def test_what_was_saved_comes_back_and_what_expired_does_not(
    tmp_path: Path, threads: FromThreads
) -> None:
    path = tmp_path / "state.db"
    store = open_store(path, threads)
    assert store.saved_bindings(0) == [] and store.saved_tokens(0) == [] == store.saved_bans(0)
    kept, short = binding("sip:alice@192.168.1.20:5060", 3600.0), binding("sip:a@x", 100.0)
    token = SavedToken("nat-0123", "sip:alice@192.168.77.10", Target("UDP", "192.168.77.10",
                                                                      5062, "192.168.77.10"), 660)
    for write in (store.save_binding(kept), store.save_binding(short),
                  store.save_binding(binding("sip:gone@x", 3600.0)),
                  store.delete_binding("sip:alice@lan.example", "sip:gone@x"),
                  store.save_token(token), store.save_token(SavedToken(
                      "nat-old", "sip:b@x", token.target, 50.0)),
                  store.save_ban(SavedBan("198.51.100.7", "over the rate", 300.0)),
                  store.save_ban(SavedBan("198.51.100.8", "over the rate", 300.0)),
                  store.delete_ban("198.51.100.8")):
        assert isinstance(write, Deferred)
    threads.wait(store.close())
    assert store.save_ban(SavedBan("198.51.100.9", "after close", 300.0)).called  # ignored

    again = open_store(path, threads, now=200.0)
    [restored] = again.saved_bindings(200.0)
    assert {k: getattr(restored, k) for k in Binding.__slots__} == \
        {k: getattr(kept, k) for k in Binding.__slots__}
    assert again.saved_tokens(200.0) == [token]
    assert again.saved_bans(200.0) == [SavedBan("198.51.100.7", "over the rate", 300.0)]
    assert again.saved_bans(300.0) == []  # ends then: not brought back later
    # what had expired when the file was opened is gone from it too
    assert (rows(path, "bindings"), rows(path, "tokens"), rows(path, "bans")) == (1, 1, 1)


def test_writes_that_ran_survive_a_store_never_closed(tmp_path: Path, threads: FromThreads) -> None:
    """As after ``kill -9``: the store is abandoned, not closed; every write that ran (its
    Deferred fired) is in the file."""
    path = tmp_path / "state.db"
    store = open_store(path, threads)
    threads.wait(store.save_binding(binding("sip:alice@192.168.1.20:5060", 3600.0)))
    assert [b.contact for b in open_store(path, threads).saved_bindings(0)] == \
        ["sip:alice@192.168.1.20:5060"]
    threads.wait(store.close())


def test_writes_are_applied_in_order(tmp_path: Path, threads: FromThreads) -> None:
    path = tmp_path / "state.db"
    store = open_store(path, threads)
    for i in range(50):
        store.save_ban(SavedBan("198.51.100.7", f"ban {i}", 300.0 + i))
        if i % 2:
            store.delete_ban("198.51.100.7")
    store.save_ban(SavedBan("198.51.100.7", "the last", 999.0))
    threads.wait(store.close())
    assert open_store(path, threads).saved_bans(0) == [SavedBan("198.51.100.7", "the last", 999.0)]


@pytest.mark.parametrize("problem", ["missing directory", "not a database", "a directory"])
def test_a_file_that_cannot_be_used_is_one_config_line_naming_the_key(
    tmp_path: Path, problem: str
) -> None:
    if problem == "missing directory":
        path = tmp_path / "nowhere" / "state.db"
    elif problem == "not a database":
        path = tmp_path / "state.db"
        path.write_bytes(b"these are not the bytes of an SQLite file\n" * 100)
    else:
        path = tmp_path
    config = parse_config(f'[registrar]\nstore = "sqlite:{path}"\n', "sipproxy.toml")
    with pytest.raises(ConfigError) as info:
        makeService(config, Clock())
    message = str(info.value)
    assert message.startswith(f"sipproxy.toml: registrar.store: cannot use {path} as an SQLite"
                              " state file: ")
    assert "\n" not in message


@pytest.mark.parametrize("value", ["redis", "sqlite:", "sqlite: ", "SQLITE:/x", ""])
def test_a_store_that_is_not_known_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[registrar]\nstore = "{value}"\n', "sipproxy.toml")
    assert str(info.value).startswith("sipproxy.toml: registrar.store: ")


def test_the_default_is_memory() -> None:
    assert parse_config("").registrar.store == "memory"


# ------------------------------------------------------------------------------------------------
# bindings: the registrar's REGISTER, a restart, a call to the user
# ------------------------------------------------------------------------------------------------
def registrar_proxy(store: IStateStore, clock: Clock) -> ProxyHarness:
    harness = ProxyHarness.build(REGISTRAR, plugins=[], clock=clock)  # no acl: all inside
    restore_bindings(harness.location, store)
    return harness


def register_alice(harness: ProxyHarness, expires: int = 600, cseq: int = 1) -> None:
    harness.receive(sip_request(
        "REGISTER", "sip:lan.example",
        via=f"SIP/2.0/UDP 192.168.1.20:5062;branch=z9hG4bKr{cseq}",
        from_="<sip:alice@lan.example>;tag=a1", to="<sip:alice@lan.example>", call_id="r1",
        cseq=cseq, headers=("Contact: <sip:alice@192.168.1.20:5062>", f"Expires: {expires}")),
        PHONE_SOURCE)
    assert harness.wire.responses_to("192.168.1.20", "REGISTER")[-1].status == 200


def call_alice(harness: ProxyHarness) -> list[Request]:
    caller = Source("UDP", "192.168.1.30", 5060, "192.168.1.1", 5060, "inside")
    harness.receive(sip_request(
        "INVITE", "sip:alice@lan.example", via="SIP/2.0/UDP 192.168.1.30:5060;branch=z9hG4bKi1",
        from_="<sip:bob@lan.example>;tag=b1", to="<sip:alice@lan.example>", call_id="i1",
        headers=("Contact: <sip:bob@192.168.1.30:5060>",)), caller)
    return harness.wire.requests_to("192.168.1.20", "INVITE")


def test_a_binding_survives_a_restart_and_an_expired_one_does_not(
    tmp_path: Path, threads: FromThreads
) -> None:
    path = tmp_path / "state.db"
    clock = Clock()
    clock.advance(1_000)
    store = open_store(path, threads, clock.seconds())
    register_alice(registrar_proxy(store, clock))
    threads.wait(store.close())

    clock.advance(300)  # the proxy was down for five minutes
    restarted = registrar_proxy(open_store(path, threads, clock.seconds()), clock)
    [invite] = call_alice(restarted)
    assert str(invite.uri) == "sip:alice@192.168.1.20:5062"

    clock.advance(301)  # the binding's 600 s are over
    late = registrar_proxy(open_store(path, threads, clock.seconds()), clock)
    assert call_alice(late) == []
    assert late.wire.responses_to("192.168.1.30", "INVITE")[-1].status == 404


def test_an_unregistered_binding_does_not_come_back(tmp_path: Path, threads: FromThreads) -> None:
    path = tmp_path / "state.db"
    clock = Clock()
    store = open_store(path, threads)
    harness = registrar_proxy(store, clock)
    register_alice(harness)
    register_alice(harness, expires=0, cseq=2)
    threads.wait(store.close())
    assert open_store(path, threads).saved_bindings(clock.seconds()) == []


def test_the_memory_store_records_nothing() -> None:
    location = LocationService(Clock())
    assert restore_bindings(location, MemoryStateStore()) == 0
    assert location._listeners == []  # nothing added to REGISTER handling


# ------------------------------------------------------------------------------------------------
# the nat plugin's registration tokens: the provider calls the token it has on file
# ------------------------------------------------------------------------------------------------
def firewall(store: IStateStore | None, clock: Clock) -> Net:
    net: Net = Net.build(FIREWALL, clock=clock)
    if store is not None:
        net.proxy.state = store
    net.nat.startService()
    return net


def provider_calls(net: Net, token: str) -> list[Request]:
    net.send(provider_request(
        "INVITE", f"sip:{token}@{OUTSIDE}:5060", "z9hG4bKin1", call_id="in-1",
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5060>",),
    ), PROVIDER)
    return net.requests_to(PHONE.host, "INVITE", PHONE.port)


def test_a_registration_token_survives_a_restart(tmp_path: Path, threads: FromThreads) -> None:
    path = tmp_path / "state.db"
    clock = Clock()
    store = open_store(path, threads)
    before = firewall(store, clock)
    token = register(before)  # the provider's 200 grants 600 s
    before.nat.stopService()
    threads.wait(store.close())

    clock.advance(120)
    after = firewall(open_store(path, threads, clock.seconds()), clock)
    [invite] = provider_calls(after, token)
    assert str(invite.uri) == PHONE_CONTACT
    after.nat.stopService()

    forgetful = firewall(None, clock)  # the memory store: the provider's token is unknown
    assert provider_calls(forgetful, token) == []
    assert forgetful.responses_to(PROVIDER_IP, "INVITE")[-1].status == 404
    forgetful.nat.stopService()

    clock.advance(600)  # past the 600 s (+60) the provider granted
    expired = firewall(open_store(path, threads, clock.seconds()), clock)
    assert provider_calls(expired, token) == []
    expired.nat.stopService()


def test_an_unregistered_token_is_forgotten(tmp_path: Path, threads: FromThreads) -> None:
    path = tmp_path / "state.db"
    clock = Clock()
    store = open_store(path, threads)
    net = firewall(store, clock)
    token = register(net)
    net.send(sip_request(
        "REGISTER", "sip:provider.example", via="SIP/2.0/UDP 192.168.77.10:5060;rport;"
        "branch=z9hG4bKreg2", call_id="reg-1", cseq=2, from_="<sip:alice@provider.example>;tag=r1",
        to="<sip:alice@provider.example>", headers=(f"Contact: <{PHONE_CONTACT}>;expires=0",)),
        PHONE)
    out = net.requests_to(PROVIDER_IP, "REGISTER")[-1]
    assert [c.uri.user for c in out.contacts] == [token]
    net.send(answer(out, 200, "p1"), PROVIDER)  # no binding left to list
    net.nat.stopService()
    threads.wait(store.close())
    assert open_store(path, threads, clock.seconds() + 1).saved_tokens(clock.seconds() + 1) == []


# ------------------------------------------------------------------------------------------------
# the flood guard's bans
# ------------------------------------------------------------------------------------------------
def ban_then_stop(path: Path, threads: FromThreads, clock: Clock) -> None:
    """A proxy bans 198.51.100.7 for 300 s and stops (the ban stays saved)."""
    store = open_store(path, threads, clock.seconds())
    guard = FloodGuard(clock, ban_time=300.0)
    guard.keep_bans_in(store)
    guard.ban("198.51.100.7", "over the rate")
    guard.stop()
    threads.wait(store.close())


@pytest.mark.parametrize("down", [100.0, 301.0], ids=["down 100 s", "down past the ban"])
def test_a_ban_survives_a_restart_and_ends_when_it_was_going_to(
    tmp_path: Path, threads: FromThreads, down: float
) -> None:
    path = tmp_path / "state.db"
    clock = Clock()
    ban_then_stop(path, threads, clock)

    clock.advance(down)
    store = open_store(path, threads, clock.seconds())
    again = FloodGuard(clock, ban_time=300.0)
    if down > 300:  # it ended while the proxy was down: it does not come back
        assert again.keep_bans_in(store) == 0
        assert again.allow("198.51.100.7")
        return
    assert again.keep_bans_in(store) == 1
    assert not again.allow("198.51.100.7")
    clock.advance(299 - down)
    assert again.is_banned("198.51.100.7")
    clock.advance(1)  # 300 s after the ban, not after the restart
    assert not again.is_banned("198.51.100.7") and again.allow("198.51.100.7")
    threads.wait(store.close())
    assert open_store(path, threads, clock.seconds()).saved_bans(clock.seconds()) == []
