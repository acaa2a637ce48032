"""The auth plugin inside a real Proxy (in-memory transports, a task.Clock): REGISTER and
calls of local users challenged and accepted, wrong credentials, replays, stale nonces,
SHA-256 and MD5, user mismatch, other realms' credentials kept, in-dialog requests, config,
the users file and the hash helper."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from sipproxy.config import ConfigError, parse_config
from sipproxy.context import Branch, RequestContext
from sipproxy.credentials import (
    CredentialsFileError,
    FileCredentialStore,
    parse_credentials_file,
)
from sipproxy.digest import authorization, ha1, parse_credentials
from sipproxy.interfaces import AUTHENTICATED_USER, ICredentialStore
from sipproxy.message import Request, Response, Source
from sipproxy.pipeline import Plugin
from sipproxy.plugins import auth as auth_module
from sipproxy.plugins.auth import AuthPlugin
from sipproxy.testing import ProxyHarness, answer
from tests.auth_net import (
    DOMAIN,
    INSIDE,
    OUTSIDE,
    PASSWORDS,
    PHONE,
    PHONE2,
    PROVIDER,
    PROVIDER_IP,
    Net,
    challenges,
    config_text,
    credentials,
    make_net,
    users_file,
)


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return make_net(tmp_path)


def bindings(net: Net, user: str) -> list[str]:
    return [b.contact for b in net.location.lookup(f"sip:{user}@{DOMAIN}")]


# -- REGISTER ------------------------------------------------------------------------------------
def test_register_challenged_sha256_first_then_md5(net: Net) -> None:
    r = net.register()
    assert r.status == 401
    assert r.to.tag
    chals = challenges(r)
    assert [c.algorithm for c in chals] == ["SHA-256", "MD5"]
    assert all(c.params["realm"] == DOMAIN and c.params["qop"] == "auth" for c in chals)
    assert "stale" not in chals[0].params
    assert bindings(net, "alice") == []
    assert net.auth.counters["auth.challenged"] == 1
    assert net.logged == []  # a challenge is no refusal


@pytest.mark.parametrize(("user", "algorithm"),
                         [("alice", "SHA-256"), ("alice", "MD5"), ("carol", "MD5")])
def test_register_accepted(net: Net, user: str, algorithm: str) -> None:
    password = {"carol": "c4rol", **PASSWORDS}[user]
    r = net.register(user)
    value = credentials(r, user, password, "REGISTER", f"sip:{DOMAIN}", algorithm)
    ok = net.register(user, (f"Authorization: {value}",), cseq=2)
    assert ok.status == 200, ok
    assert bindings(net, user) == [f"sip:{user}@{PHONE.host}:5060"]
    assert net.auth.counters["auth.ok"] == 1


def test_htdigest_user_has_no_sha256(net: Net) -> None:
    r = net.register("carol")
    value = credentials(r, "carol", "c4rol", "REGISTER", f"sip:{DOMAIN}", "SHA-256")
    again = net.register("carol", (f"Authorization: {value}",), cseq=2)
    assert again.status == 401
    assert bindings(net, "carol") == []


def test_wrong_password_rechallenged_and_logged(net: Net) -> None:
    r = net.register()
    value = credentials(r, "alice", "guess", "REGISTER", f"sip:{DOMAIN}")
    again = net.register("alice", (f"Authorization: {value}",), cseq=2)
    assert again.status == 401
    new_nonce = challenges(again)[0].params["nonce"]
    assert new_nonce != challenges(r)[0].params["nonce"]
    assert "stale" not in challenges(again)[0].params
    assert bindings(net, "alice") == []
    assert net.auth.counters["auth.wrong_credentials"] == 1
    assert len(net.logged) == 1
    # unknown user: the same answer (no user enumeration)
    value = credentials(r, "mallory", "x", "REGISTER", f"sip:{DOMAIN}")
    unknown = net.register("mallory", (f"Authorization: {value}",), cseq=3)
    assert unknown.status == 401
    assert net.auth.counters["auth.wrong_credentials"] == 2


def test_replayed_nonce_count_refused(net: Net) -> None:
    r = net.register()
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}", nc=1)
    assert net.register("alice", (f"Authorization: {value}",), cseq=2).status == 200
    # the same Authorization in a new transaction: a replay
    replay = net.register("alice", (f"Authorization: {value}",), cseq=3)
    assert replay.status == 401
    assert challenges(replay)[0].params["stale"] == "true"
    assert net.auth.counters["auth.replay"] == 1
    # a lower count too
    value3 = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}", nc=3)
    assert net.register("alice", (f"Authorization: {value3}",), cseq=4).status == 200
    value2 = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}", nc=2)
    assert net.register("alice", (f"Authorization: {value2}",), cseq=5).status == 401
    assert net.auth.counters["auth.replay"] == 2


def test_expired_nonce_is_stale(net: Net) -> None:
    r = net.register()
    net.clock.advance(301)
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    stale = net.register("alice", (f"Authorization: {value}",), cseq=2)
    assert stale.status == 401
    assert all(c.params.get("stale") == "true" for c in challenges(stale))
    value = credentials(stale, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    assert net.register("alice", (f"Authorization: {value}",), cseq=3).status == 200
    assert net.logged == []  # stale is normal, not logged


def test_expired_nonce_with_wrong_password_is_not_stale(net: Net) -> None:
    r = net.register()
    net.clock.advance(301)
    value = credentials(r, "alice", "bad", "REGISTER", f"sip:{DOMAIN}")
    again = net.register("alice", (f"Authorization: {value}",), cseq=2)
    assert again.status == 401 and "stale" not in challenges(again)[0].params


def test_nonce_of_another_process_is_stale_if_the_digest_is_right(net: Net) -> None:
    chal = ('Digest realm="lan.example", nonce="from-before-the-restart", algorithm=MD5,'
            ' qop="auth"')
    value = authorization(chal, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    r = net.register("alice", (f"Authorization: {value}",))
    assert r.status == 401 and challenges(r)[0].params["stale"] == "true"
    value = authorization(chal, "alice", "nope", "REGISTER", f"sip:{DOMAIN}")
    r = net.register("alice", (f"Authorization: {value}",), cseq=2)
    assert r.status == 401 and "stale" not in challenges(r)[0].params


def test_a_nonce_is_good_only_from_the_address_it_was_sent_to(net: Net) -> None:
    """A nonce the attacker got at its own address does not let it register from a UDP
    source forged to be the victim's (the nat plugin would then reach the binding at the
    victim): the forged request gets a stale challenge, sent to the victim, and no binding;
    a phone whose address changed just answers that challenge."""
    r = net.register()
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    victim = Source("UDP", "203.0.113.99", 5060, OUTSIDE, 5060, "outside")
    forged = net.register("alice", (f"Authorization: {value}",), cseq=2, source=victim)
    assert forged.status == 401 and challenges(forged)[0].params["stale"] == "true"
    assert bindings(net, "alice") == []
    value = credentials(forged, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    moved = net.register("alice", (f"Authorization: {value}",), cseq=3, source=victim)
    assert moved.status == 200 and len(bindings(net, "alice")) == 1


def test_qop_less_rfc2069_refused(net: Net) -> None:
    r = net.register()
    nonce = challenges(r)[0].params["nonce"]
    h = ha1("MD5", "alice", DOMAIN, "wonderland")
    from sipproxy.digest import hash_hex
    digest = hash_hex("MD5", f"{h}:{nonce}:{hash_hex('MD5', f'REGISTER:sip:{DOMAIN}')}")
    value = (f'Digest username="alice", realm="{DOMAIN}", nonce="{nonce}", '
             f'uri="sip:{DOMAIN}", response="{digest}", algorithm=MD5')
    again = net.register("alice", (f"Authorization: {value}",), cseq=2)
    assert again.status == 401
    assert net.auth.counters["auth.bad_credentials"] == 1


def test_digest_uri_is_not_compared_with_the_request_uri(net: Net) -> None:
    """sipp hashes sip:<proxy>:<port>; the response is checked over the uri it names."""
    r = net.register()
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{INSIDE}:5060")
    assert net.register("alice", (f"Authorization: {value}",), cseq=2).status == 200


def test_algorithm_not_offered_refused(tmp_path: Path) -> None:
    net = make_net(tmp_path, 'algorithms = ["SHA-256"]')
    r = net.register()
    assert [c.algorithm for c in challenges(r)] == ["SHA-256"]
    chal = challenges(r)[0].params["nonce"]
    value = authorization(f'Digest realm="{DOMAIN}", nonce="{chal}", algorithm=MD5',
                          "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    assert net.register("alice", (f"Authorization: {value}",), cseq=2).status == 401


def test_register_for_someone_else_forbidden(net: Net) -> None:
    r = net.register("alice", to_user="bob")
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    refused = net.register("alice", (f"Authorization: {value}",), cseq=2, to_user="bob")
    assert refused.status == 403
    assert bindings(net, "bob") == []
    assert net.auth.counters["auth.user_mismatch"] == 1


def test_register_for_another_domain_not_challenged(net: Net) -> None:
    sent = net.request("REGISTER", "sip:provider.example", to="<sip:alice@provider.example>",
                       from_domain="provider.example", call_id="r2")
    # no binding here: it went upstream (the provider is the registrar)
    [out] = sent
    assert isinstance(out, Request) and out.method == "REGISTER"


# -- requests of local users ---------------------------------------------------------------------
def invite(net: Net, *headers: str, from_user: str = "alice", uri: str = "sip:+15551234@x.example",
           source: Source = PHONE, call_id: str = "call1", cseq: int = 1) -> list[Any]:
    return net.request("INVITE", uri, source, from_user=from_user, call_id=call_id,
                       cseq=cseq, headers=headers)


def test_invite_challenged_407_then_forwarded_without_our_credentials(net: Net) -> None:
    [r] = invite(net)
    assert isinstance(r, Response) and r.status == 407
    assert [c.algorithm for c in challenges(r, "Proxy-Authenticate")] == ["SHA-256", "MD5"]
    assert r.headers.get("WWW-Authenticate") is None
    # the ACK for the 407 is absorbed by the transaction layer
    value = credentials(r, "alice", "wonderland", "INVITE", "sip:+15551234@x.example",
                        header="Proxy-Authenticate")
    provider = ('Digest username="a1", realm="provider.example", nonce="p", uri="sip:x",'
                ' response="0"')
    sent = invite(net, f"Proxy-Authorization: {value}", f"Proxy-Authorization: {provider}",
                  cseq=2)
    [out] = [m for m in sent if isinstance(m, Request)]
    assert out.method == "INVITE"
    kept = out.headers.get_all("proxy-authorization")
    assert len(kept) == 1 and parse_credentials(kept[0]).params["realm"] == "provider.example"
    invites = [to for data, to in net.wire.datagrams if data.startswith(b"INVITE ")]
    assert invites == [(PROVIDER_IP, 5060)]


def test_invite_context_carries_the_user(net: Net) -> None:
    [r] = invite(net)
    value = credentials(r, "bob", "builder", "INVITE", "sip:+15551234@x.example", "MD5",
                        header="Proxy-Authenticate")
    seen: list[Any] = []

    class Spy(Plugin):
        """After the auth plugin: what the request_forwarding hooks are given."""

        def request_forwarding(self, ctx: RequestContext, branch: Branch) -> None:
            seen.append(ctx.data.get(AUTHENTICATED_USER))

    net.proxy.set_plugins([*net.proxy.pipeline.plugins, Spy()])
    invite(net, f"Proxy-Authorization: {value}", from_user="bob", cseq=2)
    assert seen == ["bob"]


def test_invite_as_someone_else_forbidden(net: Net) -> None:
    [r] = invite(net, from_user="bob")
    value = credentials(r, "alice", "wonderland", "INVITE", "sip:+15551234@x.example",
                        header="Proxy-Authenticate")
    [refused] = invite(net, f"Proxy-Authorization: {value}", from_user="bob", cseq=2)
    assert refused.status == 403


def test_wrong_credentials_in_authorization_header_for_invite(net: Net) -> None:
    """A proxy reads Proxy-Authorization: the same credentials in Authorization don't count."""
    [r] = invite(net)
    value = credentials(r, "alice", "wonderland", "INVITE", "sip:+15551234@x.example",
                        header="Proxy-Authenticate")
    [again] = invite(net, f"Authorization: {value}", cseq=2)
    assert again.status == 407


def test_calls_from_others_are_not_challenged(net: Net) -> None:
    # the provider calls alice (not registered): the core's 404, no challenge
    sent = net.request("INVITE", f"sip:alice@{DOMAIN}", PROVIDER, from_user="+4930123",
                       from_domain="provider.example", call_id="in1")
    assert [m.status for m in sent] == [404]


def test_in_dialog_requests_and_ack_pass(net: Net) -> None:
    [r] = invite(net)
    value = credentials(r, "alice", "wonderland", "INVITE", "sip:+15551234@x.example",
                        header="Proxy-Authenticate")
    [out] = [m for m in invite(net, f"Proxy-Authorization: {value}", cseq=2)
             if isinstance(m, Request)]
    net.send(answer(out, 200, "callee1", ("Contact: <sip:callee@203.0.113.50>",),
                    record_route=True), PROVIDER)
    net.new()
    assert len(net.proxy.dialogs) == 1
    ack = net.request("ACK", "sip:callee@203.0.113.50", cseq=2, call_id="call1",
                      to="<sip:+15551234@x.example>", to_tag="callee1",
                      headers=(f"Route: <sip:{INSIDE}:5060;lr>",))
    assert [m.method for m in ack] == ["ACK"]
    bye = net.request("BYE", "sip:callee@203.0.113.50", cseq=3, call_id="call1",
                      to="<sip:+15551234@x.example>", to_tag="callee1",
                      headers=(f"Route: <sip:{INSIDE}:5060;lr>",))
    assert [m.method for m in bye] == ["BYE"]


def test_forged_in_dialog_request_is_challenged(net: Net) -> None:
    """A To tag alone does not make a request in-dialog: the proxy must know the dialog."""
    sent = net.request("INVITE", "sip:+1900555@x.example", call_id="forged", to_tag="madeup")
    assert [m.status for m in sent] == [407]


def test_exempt_networks(tmp_path: Path) -> None:
    net = make_net(tmp_path, 'exempt_networks = ["192.168.77.11/32"]')
    sent = invite(net, source=PHONE2)
    assert [m.method for m in sent if isinstance(m, Request)] == ["INVITE"]
    assert [m.status for m in invite(net, call_id="c2")] == [407]


def test_async_store(tmp_path: Path) -> None:
    net = make_net(tmp_path)
    pending: list[Deferred[str | None]] = []
    store = net.auth.store

    class SlowStore:
        def ha1(self, username: str, realm: str, algorithm: str) -> Deferred[str | None]:
            d: Deferred[str | None] = Deferred()
            pending.append(d)
            d.addCallback(lambda _: store.ha1(username, realm, algorithm))
            return d

    net.auth.store = SlowStore()  # type: ignore[assignment]
    r = net.register()
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    net.send(net_register_bytes(net, value), PHONE)
    assert [m for m in net.new() if isinstance(m, Response) and m.status >= 200] == []
    pending.pop().callback(None)
    [ok] = [m for m in net.new() if isinstance(m, Response)]
    assert ok.status == 200


def net_register_bytes(net: Net, value: str) -> bytes:
    lines = ["REGISTER sip:lan.example SIP/2.0",
             f"Via: SIP/2.0/UDP {PHONE.host}:5060;branch={net.branch()}", "Max-Forwards: 70",
             f"From: <sip:alice@{DOMAIN}>;tag=x", f"To: <sip:alice@{DOMAIN}>",
             "Call-ID: slow", "CSeq: 2 REGISTER", f"Contact: <sip:alice@{PHONE.host}>",
             f"Authorization: {value}", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_refusals_logged_once_per_source_per_interval(net: Net) -> None:
    r = net.register()
    for i in range(20):
        value = credentials(r, "alice", f"guess{i}", "REGISTER", f"sip:{DOMAIN}")
        net.register("alice", (f"Authorization: {value}",), cseq=2 + i)
    assert net.auth.counters["auth.wrong_credentials"] == 20
    assert len(net.logged) == 1
    # another source is logged on its own
    value = credentials(r, "bob", "guess", "REGISTER", f"sip:{DOMAIN}")
    net.register("bob", (f"Authorization: {value}",), source=PHONE2)
    assert len(net.logged) == 2
    net.clock.advance(61)
    value = credentials(r, "alice", "again", "REGISTER", f"sip:{DOMAIN}")
    net.register("alice", (f"Authorization: {value}",), cseq=99)
    assert len(net.logged) == 3
    from twisted.logger import formatEvent
    assert "19 more from this source not logged" in formatEvent(net.logged[-1])


# -- failures spend a ban budget (fail2ban-like) -------------------------------------------------
def guess(net: Net, n: int, source: Source = PHONE, user: str = "alice") -> list[int]:
    """``n`` REGISTERs with wrong passwords from ``source``; their statuses."""
    r = net.register(user, source=source)
    statuses = []
    for i in range(n):
        value = credentials(r, user, f"guess{i}", "REGISTER", f"sip:{DOMAIN}")
        statuses.append(net.register(user, (f"Authorization: {value}",), cseq=2 + i,
                                     source=source).status)
    return statuses


def test_wrong_passwords_ban_the_source_through_the_flood_guard(tmp_path: Path) -> None:
    net = make_net(tmp_path, "max_failures = 5\nwindow = 60", flood=True)
    flood = net.proxy.flood
    assert guess(net, 4) == [401] * 4
    assert PHONE.host not in flood.banned
    assert guess(net, 1) == [401]  # the 5th within the window: banned from now on
    assert PHONE.host in flood.banned
    assert "5 failed digest authentication attempts within 60 s" in flood.banned[PHONE.host].reason
    assert net.auth.counters["auth.banned"] == 1
    assert flood.counters["banned"] == 1
    # the ban list is the flood guard's: the transports drop the source unparsed
    assert not flood.allow(PHONE.host)
    assert flood.allow(PHONE2.host)
    net.clock.advance(flood.ban_time + 1)
    assert PHONE.host not in flood.banned


def test_plain_challenges_and_one_typo_are_no_ban(tmp_path: Path) -> None:
    net = make_net(tmp_path, "max_failures = 3\nwindow = 60", flood=True)
    for i in range(20):  # challenges: requests without credentials
        assert net.register(cseq=100 + i).status == 401
    r = net.register()
    typo = credentials(r, "alice", "wonderlnd", "REGISTER", f"sip:{DOMAIN}")
    assert net.register("alice", (f"Authorization: {typo}",), cseq=200).status == 401
    right = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}")
    assert net.register("alice", (f"Authorization: {right}",), cseq=201).status == 200
    assert net.proxy.flood.banned == {}
    # failures spread wider than the window do not add up
    net.clock.advance(61)
    assert guess(net, 2) == [401, 401]
    net.clock.advance(61)
    assert guess(net, 2) == [401, 401]
    assert net.proxy.flood.banned == {}


def test_replays_count_as_failures(tmp_path: Path) -> None:
    net = make_net(tmp_path, "max_failures = 3\nwindow = 60", flood=True)
    r = net.register()
    value = credentials(r, "alice", "wonderland", "REGISTER", f"sip:{DOMAIN}", nc=1)
    assert net.register("alice", (f"Authorization: {value}",), cseq=2).status == 200
    for cseq in (3, 4):
        assert net.register("alice", (f"Authorization: {value}",), cseq=cseq).status == 401
    assert net.proxy.flood.banned == {}
    net.register("alice", (f"Authorization: {value}",), cseq=5)
    assert PHONE.host in net.proxy.flood.banned


def test_no_ban_for_exempt_sources_or_without_a_budget(tmp_path: Path) -> None:
    net = make_net(tmp_path, "max_failures = 2", flood=True)
    loopback = Source("UDP", "127.0.0.1", 5060, INSIDE, 5060, "inside")
    guess(net, 10, source=loopback)  # the flood guard exempts loopback by default
    assert net.proxy.flood.banned == {}
    assert net.auth.counters["auth.wrong_credentials"] == 10
    net = make_net(tmp_path, "max_failures = 0", flood=True)
    guess(net, 30)
    assert net.proxy.flood.banned == {}
    net = make_net(tmp_path, "max_failures = 2")  # [limits] off: no flood guard, no ban
    assert net.proxy.flood is None
    assert guess(net, 5) == [401] * 5


# -- config, users file, helper ------------------------------------------------------------------
def test_users_file_formats() -> None:
    md5 = "0" * 32
    sha = "a" * 64
    entries = parse_credentials_file(
        f"# c\n\nalice:r:{md5}\nbob:r:sha-256={sha}:md5={md5.upper()}\ncarol:r:sha-256={sha}\n")
    assert entries[("alice", "r")] == {"MD5": md5}
    assert entries[("bob", "r")] == {"MD5": md5, "SHA-256": sha}
    assert entries[("carol", "r")] == {"SHA-256": sha}
    store = FileCredentialStore(entries)
    assert store.ha1("carol", "r", "MD5") is None
    assert store.ha1("nobody", "r", "MD5") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("alice", "expected user:realm:HA1"),
        (":r:" + "0" * 32, "empty user name"),
        ("a::" + "0" * 32, "empty realm"),
        ("a:r:123", "32 hex digits"),
        ("a:r:md5=" + "0" * 31, "md5: must be 32 hex digits"),
        ("a:r:sha-256=" + "0" * 32, "sha-256: must be 64 hex digits"),
        ("a:r:sha1=" + "0" * 40, "expected md5=HA1 or sha-256=HA1"),
        ("a:r:md5=" + "0" * 32 + ":md5=" + "1" * 32, "given twice"),
        (f"a:r:{'0' * 32}\na:r:{'1' * 32}", "a:r appears twice"),
    ],
)
def test_users_file_errors_name_the_line(text: str, problem: str) -> None:
    with pytest.raises(CredentialsFileError) as e:
        parse_credentials_file("# first\n" + text, "users.txt")
    line = 3 if "appears twice" in problem else 2
    assert str(e.value).startswith(f"users.txt:{line}: ")
    assert problem in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ('algorithms = ["SHA-512"]', 'auth.algorithms[0]: must be "SHA-256" or "MD5"'),
        ('algorithms = []', "auth.algorithms: must not be empty"),
        ('algorithms = ["MD5", "md5"]', 'auth.algorithms[1]: "md5" repeats auth.algorithms[0]'),
        ("nonce_ttl = 0", "auth.nonce_ttl: must be a number from 1.0 to 86400.0"),
        ('exempt_networks = ["x"]', "auth.exempt_networks[0]: must be a network"),
        ("colour = 1", "auth.colour: unknown key"),
        ("max_failures = -1", "auth.max_failures: must be an integer from 0 to 100000, got -1"),
        ("window = 0", "auth.window: must be a number from 1.0 to 86400.0, got 0"),
    ],
)
def test_config_errors(tmp_path: Path, auth: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_net(tmp_path, auth)
    assert message in str(e.value)


def test_config_users_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("ok:r:" + "0" * 32 + "\nbroken\n")
    text = config_text(tmp_path / "users.txt").replace(str(tmp_path / "users.txt"), "bad.txt")
    config = parse_config(text, str(tmp_path / "sipproxy.toml"))
    with pytest.raises(ConfigError) as e:
        from sipproxy.plugins.auth import factory
        factory.build(_FakeCore(config), config.section("auth"))  # type: ignore[arg-type]
    assert str(e.value) == (f"{tmp_path / 'sipproxy.toml'}: auth.users_file: "
                            f"{tmp_path / 'bad.txt'}:2: expected user:realm:HA1 or "
                            "user:realm:md5=HA1:sha-256=HA1")
    missing = parse_config(text.replace("bad.txt", "none.txt"), "c.toml")
    with pytest.raises(ConfigError, match=r"c.toml: auth.users_file: none.txt: cannot read"):
        factory.build(_FakeCore(missing), missing.section("auth"))  # type: ignore[arg-type]
    no_file = parse_config(text.replace('users_file = "bad.txt"', ""), "c.toml")
    with pytest.raises(ConfigError, match=r"auth\.users_file: is required"):
        factory.build(_FakeCore(no_file), no_file.section("auth"))  # type: ignore[arg-type]


def test_realm_defaults_to_first_domain_and_is_required_without_one(tmp_path: Path) -> None:
    from sipproxy.plugins.auth import factory
    users = users_file(tmp_path)
    config = parse_config(config_text(users, domains='["lan.example", "b.example"]'))
    assert factory.build(_FakeCore(config), config.section("auth")).realm == DOMAIN  # type: ignore[arg-type]
    config = parse_config(config_text(users, domains="[]"))
    with pytest.raises(ConfigError, match=r"auth\.realm: is required when"):
        factory.build(_FakeCore(config), config.section("auth"))  # type: ignore[arg-type]
    config = parse_config(config_text(users, 'realm = "corp"', domains="[]"))
    assert factory.build(_FakeCore(config), config.section("auth")).realm == "corp"  # type: ignore[arg-type]


class _FakeCore:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.clock = Clock()
        self.listeners: list[Any] = []

    def is_local_domain(self, host: str) -> bool:
        return host in self.config.proxy.domains

    def is_local_uri(self, uri: Any) -> bool:
        return bool(uri.is_sip and self.is_local_domain(uri.host))


def test_hash_helper(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert auth_module.main(["hash", "dave", DOMAIN]) == 0
    line = capsys.readouterr().out.strip()
    entries = parse_credentials_file(line)
    assert entries[("dave", DOMAIN)] == {a: ha1(a, "dave", DOMAIN, "s3cret")
                                         for a in ("MD5", "SHA-256")}
    assert auth_module.main(["hash", "dave"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert auth_module.main(["hash", "dave", DOMAIN]) == 1


def test_example_public_config(tmp_path: Path) -> None:
    """examples/public.toml with examples/users.txt: acl, auth and nat build; the sample users
    log in with the passwords the file names."""
    from sipproxy.config import load_config
    from sipproxy.plugins.acl import AclPlugin

    root = Path(__file__).resolve().parents[1]
    config = load_config(str(root / "examples" / "public.toml"))
    plugins = ProxyHarness.build(config).plugins
    assert [type(p) for p in plugins][:2] == [AclPlugin, AuthPlugin]
    auth = plugins[1]
    assert auth.realm == "sip.example.com"
    for user in ("alice", "bob"):
        for algorithm in ("MD5", "SHA-256"):
            assert auth.store.ha1(user, "sip.example.com", algorithm) == ha1(
                algorithm, user, "sip.example.com", f"change-me-{user}")
    for p in plugins:
        if hasattr(p, "stopService") and getattr(p, "running", False):
            p.stopService()


# a custom credential store, loaded by [auth] store = "tests.test_auth:make_store"
@implementer(ICredentialStore)
class DictStore:
    def __init__(self, users: dict[str, str], realm: str) -> None:
        self.users = users
        self.realm = realm

    def ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        password = self.users.get(username)
        return None if password is None else ha1(algorithm, username, realm, password)


def make_store(core: Any, section: Any) -> DictStore:
    return DictStore({"erin": section.get_str("erin_password")}, DOMAIN)


def make_nothing(core: Any, section: Any) -> object:
    return object()


def test_custom_store(tmp_path: Path) -> None:
    from sipproxy.plugins.auth import factory
    config = parse_config(config_text(tmp_path / "unused.txt").replace(
        f'users_file = "{tmp_path / "unused.txt"}"',
        'store = "tests.test_auth:make_store"\nstore_config = { erin_password = "pw" }'))
    plugin = factory.build(_FakeCore(config), config.section("auth"))  # type: ignore[arg-type]
    assert type(plugin.store).__name__ == "DictStore"  # (this module, imported by name)
    assert plugin.store.ha1("erin", DOMAIN, "MD5") == ha1("MD5", "erin", DOMAIN, "pw")
    for store, message in (("tests.test_auth:make_nothing", "returned no ICredentialStore"),
                           ("tests.test_auth:missing", "cannot load"),
                           ("no_colon", 'must be "package.module:callable"')):
        bad = parse_config(config_text(tmp_path / "unused.txt").replace(
            f'users_file = "{tmp_path / "unused.txt"}"', f'store = "{store}"'), "c.toml")
        with pytest.raises(ConfigError) as e:
            factory.build(_FakeCore(bad), bad.section("auth"))  # type: ignore[arg-type]
        assert str(e.value).startswith("c.toml: auth.store: ") and message in str(e.value)
    both = parse_config(config_text(tmp_path / "x.txt").replace(
        "[acl]", 'store = "tests.test_auth:make_store"\n[acl]'), "c.toml")
    with pytest.raises(ConfigError, match=r"auth\.users_file: cannot be combined with store"):
        factory.build(_FakeCore(both), both.section("auth"))  # type: ignore[arg-type]


def test_interfaces(net: Net) -> None:
    from zope.interface.verify import verifyObject

    from sipproxy.interfaces import IPluginFactory, IProxyCore, IProxyPlugin
    from sipproxy.plugins import acl as acl_module

    assert verifyObject(ICredentialStore, net.auth.store)
    assert verifyObject(IProxyPlugin, net.auth)
    assert verifyObject(IPluginFactory, auth_module.factory)
    assert verifyObject(IPluginFactory, acl_module.factory)
    assert verifyObject(IProxyCore, net.proxy)  # is_local_uri / is_own_uri included
