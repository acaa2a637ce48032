"""The registrar: RFC 3261 section 10.3, driven by a fake clock, plus RFC 4475 REGISTERs."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from sipproxy.errors import ParseError
from sipproxy.headers import parse_header_lines
from sipproxy.location import LocationService
from sipproxy.message import Request, Response, Source, parse_message
from sipproxy.registrar import Registrar, aor_of, uri_equal
from sipproxy.testing import LocationRecorder
from sipproxy.uri import parse_uri

RFC4475 = Path(__file__).parent / "data" / "rfc4475"
AOR = "sip:alice@example.com"
START = 1_000_000.0
SOURCE = Source("UDP", "203.0.113.7", 40123, "198.51.100.1", 5060)


class Env:
    def __init__(self, **kw: int) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.location = LocationService(self.clock, purge_interval=10)
        self.recorder = LocationRecorder()
        self.location.add_listener(self.recorder)
        self.registrar = Registrar(self.location, self.clock, ["example.com", "EXAMPLE.net"], **kw)

    def register(self, request: Request) -> Response:
        return self.registrar.handle_register(request)

    def contacts(self, aor: str = AOR) -> list[str]:
        return [b.contact for b in self.location.lookup(aor)]


@pytest.fixture
def env() -> Env:
    return Env()


def make_register(
    contacts: list[str] | None = None,
    *,
    to: str = "<sip:alice@example.com>",
    call_id: str = "reg-1@192.0.2.10",
    cseq: int = 1,
    expires: str | None = None,
    extra: list[str] | None = None,
    source: Source | None = SOURCE,
) -> Request:
    lines = [
        "REGISTER sip:example.com SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-test-1",
        "Max-Forwards: 70",
        f"To: {to}",
        f"From: {to};tag=from-1",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
    ]
    lines += [f"Contact: {c}" for c in contacts or []]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines += extra or []
    lines.append("Content-Length: 0")
    msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(msg, Request)
    msg.source = source
    return msg


def unvalidated_register(contact: str) -> Request:
    """A REGISTER built without parse_message's validation, to reach the registrar's own checks."""
    headers = parse_header_lines(
        [
            "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-test-2",
            "To: <sip:alice@example.com>",
            "From: <sip:alice@example.com>;tag=f",
            "Call-ID: bad-contact@192.0.2.10",
            "CSeq: 1 REGISTER",
            f"Contact: {contact}",
        ],
        "\r\n",
    )
    return Request("REGISTER", "sip:example.com", headers)


def listed(response: Response) -> dict[str, str]:
    """Contact URI -> its header params as listed in a 200."""
    out = {}
    for value in response.headers.get_all("Contact"):
        assert value.startswith("<"), value
        uri, _, params = value[1:].partition(">")
        out[uri] = params
    return out


# -- helpers ----------------------------------------------------------------------------------


def test_aor_of_canonicalizes() -> None:
    assert aor_of("sip:alice@Example.COM") == "sip:alice@example.com"
    assert aor_of("sip:alice@example.com:5070;transport=tcp;user=phone") == AOR
    assert aor_of(parse_uri("sips:alice@example.com")) == AOR
    assert aor_of("sip:%61lice@example.com") == AOR  # escapes decoded
    assert aor_of("sip:Alice@example.com") != AOR  # the user part is case-sensitive
    assert aor_of("sip:alice@[2001:DB8::1]") == "sip:alice@[2001:db8::1]"
    with pytest.raises(ParseError):
        aor_of("not a uri")


def test_is_local(env: Env) -> None:
    r = env.registrar
    assert r.is_local(AOR)
    assert r.is_local("sip:bob@example.net")
    assert r.is_local(parse_uri("sips:bob@EXAMPLE.com:5061"))
    assert not r.is_local("sip:bob@example.org")
    assert not r.is_local("tel:+15551234")
    assert r.is_local_host("Example.Com")
    assert not r.is_local_host("evil.example.com")


def test_uri_equal_follows_rfc3261() -> None:
    def eq(a: str, b: str) -> bool:
        return uri_equal(parse_uri(a), parse_uri(b))

    assert eq("sip:alice@HOST.example.com", "sip:alice@host.example.com")
    assert eq("sip:%61lice@h", "sip:alice@h")
    assert eq("sip:a@h;foo=1", "sip:a@h")  # params only on one side are ignored...
    assert not eq("sip:a@h;transport=tcp", "sip:a@h")  # ...except these
    assert not eq("sip:a@h;foo=1", "sip:a@h;foo=2")
    assert not eq("sip:Alice@h", "sip:alice@h")
    assert not eq("sip:a@h", "sip:a@h:5060")
    assert not eq("sip:a@h", "sips:a@h")
    assert not eq("sip:a@h?Route=x", "sip:a@h")


def test_constructor_checks_expiry_bounds() -> None:
    clock = Clock()
    with pytest.raises(ValueError):
        Registrar(LocationService(clock), clock, ["example.com"], min_expires=600, max_expires=60)
    with pytest.raises(ValueError):
        Registrar(LocationService(clock), clock, ["example.com"], default_expires=30)


# -- basic registration -----------------------------------------------------------------------


def test_register_stores_binding_and_answers_200(env: Env) -> None:
    request = make_register(
        ["<sip:alice@192.168.1.20:5060;transport=udp>"],
        extra=["User-Agent: TestPhone/1.0"],
    )
    response = env.register(request)
    assert response.status == 200
    assert listed(response) == {"sip:alice@192.168.1.20:5060;transport=udp": ";expires=3600"}
    assert response.to.tag  # the registrar is the UAS: it tags To
    assert response.headers.get("Date") == "Mon, 12 Jan 1970 13:46:40 GMT"
    assert response.call_id == request.call_id
    assert response.cseq == request.cseq
    assert str(response.top_via) == str(request.top_via)

    [b] = env.location.lookup(AOR)
    assert b.contact == "sip:alice@192.168.1.20:5060;transport=udp"
    assert b.expires_at == START + 3600
    assert (b.call_id, b.cseq, b.q) == ("reg-1@192.0.2.10", 1, 1.0)
    assert b.source == SOURCE
    assert b.user_agent == "TestPhone/1.0"
    assert b.path == ()
    assert env.recorder.added == [(b, None)]

    # The response serializes with the new To tag.
    data = response.to_bytes()
    reparsed = parse_message(data)
    assert reparsed.to.tag == response.to.tag
    assert b"Date: " in data


def test_query_without_contact_lists_bindings(env: Env) -> None:
    env.register(make_register(["<sip:alice@192.0.2.1>", "<sip:alice@192.0.2.2>;q=0.5"]))
    env.clock.advance(100)
    response = env.register(make_register(call_id="query-1"))
    assert response.status == 200
    assert listed(response) == {
        "sip:alice@192.0.2.1": ";expires=3500",
        "sip:alice@192.0.2.2": ";expires=3500;q=0.5",
    }
    assert len(env.recorder.added) == 2  # the query changed nothing
    empty = env.register(make_register(to="<sip:nobody@example.com>"))
    assert empty.status == 200
    assert empty.headers.get_all("Contact") == []


def test_to_outside_our_domains_is_404(env: Env) -> None:
    response = env.register(
        make_register(["<sip:alice@192.0.2.1>"], to="<sip:alice@example.org>")
    )
    assert response.status == 404
    assert response.to.tag
    assert env.location.count() == 0


def test_non_sip_to_is_400(env: Env) -> None:
    response = env.register(make_register(["<sip:alice@192.0.2.1>"], to="<tel:+15551234>"))
    assert response.status == 400


def test_aor_is_canonical_across_spellings(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], to="<sips:alice@EXAMPLE.com:5061;user=ip>"))
    assert env.contacts(AOR) == ["sip:a@192.0.2.1"]


# -- expiry values ----------------------------------------------------------------------------


def test_expires_param_then_header_then_default(env: Env) -> None:
    env.register(
        make_register(
            ["<sip:a@192.0.2.1>;expires=120", "<sip:a@192.0.2.2>"],
            expires="300",
        )
    )
    env.register(make_register(["<sip:a@192.0.2.3>"], call_id="other"))
    got = {b.contact: b.expires_at - START for b in env.location.lookup(AOR)}
    assert got == {"sip:a@192.0.2.1": 120, "sip:a@192.0.2.2": 300, "sip:a@192.0.2.3": 3600}


def test_malformed_expires_falls_back(env: Env) -> None:
    env.register(
        make_register(
            ["<sip:a@192.0.2.1>;expires=soon", "<sip:a@192.0.2.2>"],
            expires="Thu, 01 Dec 2040 16:00:00 GMT",
        )
    )
    assert {b.expires_at - START for b in env.location.lookup(AOR)} == {3600}


def test_too_brief_is_423_with_min_expires_and_changes_nothing(env: Env) -> None:
    response = env.register(
        make_register(["<sip:a@192.0.2.1>", "<sip:a@192.0.2.2>;expires=30"], expires="600")
    )
    assert response.status == 423
    assert response.headers.get("Min-Expires") == "60"
    assert env.location.count() == 0  # the valid contact was not committed either
    assert env.recorder.added == []


def test_expires_is_capped_at_max(env: Env) -> None:
    response = env.register(make_register(["<sip:a@192.0.2.1>;expires=86400"]))
    assert listed(response) == {"sip:a@192.0.2.1": ";expires=3600"}
    huge = env.register(make_register(["<sip:a@192.0.2.2>"], expires="99999999999", cseq=2))
    assert listed(huge)["sip:a@192.0.2.2"] == ";expires=3600"


def test_custom_bounds() -> None:
    e = Env(min_expires=120, max_expires=600, default_expires=300)
    assert e.register(make_register(["<sip:a@192.0.2.1>;expires=119"])).status == 423
    ok = e.register(make_register(["<sip:a@192.0.2.1>"]))
    assert listed(ok) == {"sip:a@192.0.2.1": ";expires=300"}


def test_bindings_expire_when_the_clock_advances(env: Env) -> None:
    env.location.startService()
    try:
        env.register(make_register(["<sip:a@192.0.2.1>;expires=60", "<sip:a@192.0.2.2>"]))
        env.clock.advance(30)
        assert listed(env.register(make_register(call_id="q1"))) == {
            "sip:a@192.0.2.1": ";expires=30",
            "sip:a@192.0.2.2": ";expires=3570",
        }
        env.clock.advance(30)  # t+60: expired, hidden at once; purge reports it at t+60 too
        assert env.contacts() == ["sip:a@192.0.2.2"]
        assert env.recorder.removed_contacts() == [("sip:a@192.0.2.1", "expired")]
        env.clock.advance(3600)
        assert env.recorder.removed_contacts()[-1] == ("sip:a@192.0.2.2", "expired")
        assert env.location.count() == 0
        assert listed(env.register(make_register(call_id="q2"))) == {}
    finally:
        env.location.stopService()


def test_reregistration_before_expiry_keeps_the_binding(env: Env) -> None:
    env.location.startService()
    try:
        env.register(make_register(["<sip:a@192.0.2.1>;expires=60"]))
        env.clock.advance(50)
        env.register(make_register(["<sip:a@192.0.2.1>;expires=60"], cseq=2))
        env.clock.advance(50)
        assert env.contacts() == ["sip:a@192.0.2.1"]
        assert env.recorder.removed == []
        first, second = env.recorder.added
        assert second == (second[0], first[0])  # a refresh names what it refreshed
    finally:
        env.location.stopService()


# -- removal ----------------------------------------------------------------------------------


def test_expires_zero_removes_that_contact(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>", "<sip:a@192.0.2.2>"]))
    response = env.register(make_register(["<sip:a@192.0.2.1>;expires=0"], cseq=2))
    assert response.status == 200
    assert list(listed(response)) == ["sip:a@192.0.2.2"]
    assert env.recorder.removed_contacts() == [("sip:a@192.0.2.1", "unregistered")]
    # Removing a contact we never had is fine and changes nothing.
    assert env.register(make_register(["<sip:a@192.0.2.9>"], expires="0", cseq=3)).status == 200
    assert env.contacts() == ["sip:a@192.0.2.2"]


def test_star_with_expires_zero_removes_all(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>", "<sip:a@192.0.2.2>"]))
    env.register(make_register(["<sip:b@192.0.2.3>"], to="<sip:bob@example.com>"))
    response = env.register(make_register(["*"], expires="0", call_id="other-call"))
    assert response.status == 200
    assert response.headers.get_all("Contact") == []
    assert env.contacts() == []
    assert sorted(env.recorder.removed_contacts()) == [
        ("sip:a@192.0.2.1", "unregistered"),
        ("sip:a@192.0.2.2", "unregistered"),
    ]
    assert env.contacts("sip:bob@example.com") == ["sip:b@192.0.2.3"]


@pytest.mark.parametrize(
    ("contacts", "expires"),
    [
        (["*", "<sip:a@192.0.2.1>"], "0"),
        (["*"], None),
        (["*"], "60"),
        (["*;expires=0"], "0"),
    ],
)
def test_star_misuse_is_400(env: Env, contacts: list[str], expires: str | None) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], call_id="first"))
    try:
        request = make_register(contacts, expires=expires)
    except ParseError as e:
        # the message layer already refuses some misuses ("*" with other contacts or with
        # parameters); the proxy answers those 400 before the registrar sees them
        assert e.status == 400
    else:
        assert env.register(request).status == 400
    assert env.contacts() == ["sip:a@192.0.2.1"]


def test_star_out_of_order_is_refused(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=5))
    response = env.register(make_register(["*"], expires="0", cseq=5))
    assert response.status == 500
    assert env.contacts() == ["sip:a@192.0.2.1"]
    assert env.register(make_register(["*"], expires="0", cseq=6)).status == 200
    assert env.contacts() == []


# -- Call-ID / CSeq ordering ------------------------------------------------------------------


@pytest.mark.parametrize("cseq", [4, 5])
def test_same_call_id_not_higher_cseq_is_refused(env: Env, cseq: int) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=5, expires="600"))
    response = env.register(make_register(["<sip:a@192.0.2.1>"], cseq=cseq, expires="1200"))
    assert response.status == 500
    assert response.headers.get_all("Contact") == []
    [b] = env.location.lookup(AOR)
    assert (b.cseq, b.expires_at) == (5, START + 600)


def test_same_call_id_higher_cseq_updates(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=5, expires="600"))
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=6, expires="1200"))
    [b] = env.location.lookup(AOR)
    assert (b.cseq, b.expires_at) == (6, START + 1200)


def test_other_call_id_updates_regardless_of_cseq(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=5, expires="600"))
    response = env.register(make_register(["<sip:a@192.0.2.1>"], call_id="reboot", cseq=1))
    assert response.status == 200
    [b] = env.location.lookup(AOR)
    assert (b.call_id, b.cseq) == ("reboot", 1)


def test_out_of_order_request_commits_nothing(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=5))
    response = env.register(
        make_register(["<sip:a@192.0.2.2>", "<sip:a@192.0.2.1>;expires=0"], cseq=3)
    )
    assert response.status == 500
    assert env.contacts() == ["sip:a@192.0.2.1"]
    assert env.recorder.removed == []


def test_out_of_order_removal_is_refused(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], cseq=5))
    assert env.register(make_register(["<sip:a@192.0.2.1>"], expires="0", cseq=5)).status == 500
    assert env.contacts() == ["sip:a@192.0.2.1"]


# -- contacts ---------------------------------------------------------------------------------


def test_q_orders_bindings(env: Env) -> None:
    response = env.register(
        make_register(
            ["<sip:a@192.0.2.1>;q=0.1", "<sip:a@192.0.2.2>;q=0.9", "<sip:a@192.0.2.3>"],
        )
    )
    assert env.contacts() == ["sip:a@192.0.2.3", "sip:a@192.0.2.2", "sip:a@192.0.2.1"]
    assert listed(response)["sip:a@192.0.2.2"] == ";expires=3600;q=0.9"


@pytest.mark.parametrize("q", ["2", "0.1234", "-1", "abc", "1.5"])
def test_bad_q_is_400(env: Env, q: str) -> None:
    response = env.register(make_register([f"<sip:a@192.0.2.1>;q={q}"]))
    assert response.status == 400
    assert env.location.count() == 0


def test_equivalent_contact_refreshes_the_same_binding(env: Env) -> None:
    env.register(make_register(["<sip:a@HOST.example.net:5060;ob>"], expires="600"))
    env.register(make_register(["<sip:a@host.example.net:5060;ob>"], cseq=2))
    [b] = env.location.lookup(AOR)
    assert b.contact == "sip:a@host.example.net:5060;ob"  # the spelling sent last
    assert b.expires_at == START + 3600
    assert env.recorder.removed == []  # a refresh, not a removal
    first = env.recorder.added[0][0]
    assert env.recorder.added[1] == (b, first)


def test_duplicate_contact_in_one_request(env: Env) -> None:
    response = env.register(
        make_register(["<sip:a@192.0.2.1>;expires=600", "<sip:a@192.0.2.1>;expires=900"])
    )
    assert response.status == 200
    assert listed(response) == {"sip:a@192.0.2.1": ";expires=900"}
    assert env.location.count() == 1


def test_bad_contact_uri_is_400(env: Env) -> None:
    response = env.register(unvalidated_register("<sip:alice@bad host>"))
    assert response.status == 400
    assert response.to.tag
    assert env.location.count() == 0


def test_non_sip_contact_is_400(env: Env) -> None:
    assert env.register(make_register(["<tel:+15551234>"])).status == 400
    assert env.register(make_register(["<mailto:alice@example.com>"])).status == 400
    assert env.location.count() == 0


def test_unsupported_require_is_420(env: Env) -> None:
    response = env.register(
        make_register(["<sip:a@192.0.2.1>"], extra=["Require: path, foo.bar"])
    )
    assert response.status == 420
    assert response.headers.get("Unsupported") == "foo.bar"
    assert env.location.count() == 0
    ok = env.register(make_register(["<sip:a@192.0.2.1>"], extra=["Require: path"]))
    assert ok.status == 200


def test_path_is_stored_and_echoed_when_supported(env: Env) -> None:
    path = ["<sip:p1.example.net;lr>", "<sip:p2.example.net;lr>"]
    response = env.register(
        make_register(
            ["<sip:a@192.0.2.1>"],
            extra=[f"Path: {path[0]}", f"Path: {path[1]}", "Supported: path"],
        )
    )
    [b] = env.location.lookup(AOR)
    assert b.path == tuple(path)
    assert response.headers.get_all("Path") == path
    silent = env.register(
        make_register(["<sip:a@192.0.2.1>"], cseq=2, extra=[f"Path: {path[0]}"])
    )
    assert silent.headers.get_all("Path") == []


def test_instance_and_reg_id_replace_the_old_flow(env: Env) -> None:
    inst = '"<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"'
    env.register(make_register([f"<sip:a@192.0.2.1;ob>;+sip.instance={inst};reg-id=1"]))
    env.register(make_register([f"<sip:a@192.0.2.1;ob>;+sip.instance={inst};reg-id=2"], cseq=2))
    response = env.register(
        make_register(
            [f"<sip:a@198.51.100.5:1234;ob>;+sip.instance={inst};reg-id=1"], call_id="new"
        )
    )
    assert response.status == 200
    assert env.recorder.removed_contacts() == []  # reg-id 2 was the same contact: a refresh
    env.register(
        make_register([f"<sip:a@198.51.100.9;ob>;+sip.instance={inst};reg-id=2"], call_id="n2")
    )
    assert env.recorder.removed_contacts() == [("sip:a@192.0.2.1;ob", "replaced")]
    bindings = {b.contact: b for b in env.location.lookup(AOR)}
    assert set(bindings) == {"sip:a@198.51.100.5:1234;ob", "sip:a@198.51.100.9;ob"}
    b = bindings["sip:a@198.51.100.9;ob"]
    assert (b.instance, b.reg_id) == ("<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>", 2)
    params = listed(response)["sip:a@198.51.100.5:1234;ob"]
    assert params == f";expires=3600;+sip.instance={inst};reg-id=1"


def test_bad_reg_id_is_400(env: Env) -> None:
    response = env.register(
        make_register(['<sip:a@192.0.2.1>;+sip.instance="<urn:uuid:1>";reg-id=x'])
    )
    assert response.status == 400


def test_missing_source_is_allowed(env: Env) -> None:
    env.register(make_register(["<sip:a@192.0.2.1>"], source=None))
    assert env.location.lookup(AOR)[0].source is None


# -- RFC 4475 REGISTER messages ---------------------------------------------------------------


def load(name: str) -> Request:
    msg = parse_message((RFC4475 / name).read_bytes())
    assert isinstance(msg, Request)
    assert msg.method == "REGISTER"
    msg.source = SOURCE
    return msg


def test_rfc4475_escnull_registers_two_distinct_contacts(env: Env) -> None:
    response = env.register(load("escnull.dat"))
    assert response.status == 200
    aor = "sip:null-\x00-null@example.com"  # decoded, and not cut at the NUL
    assert aor_of(parse_uri("sip:null-%00-null@example.com")) == aor
    assert sorted(env.contacts(aor)) == [
        "sip:%00%00@host5.example.com",
        "sip:%00@host5.example.com",
    ]
    assert env.contacts("sip:null-@example.com") == []
    assert set(listed(response)) == {"sip:%00@host5.example.com", "sip:%00%00@host5.example.com"}


def test_rfc4475_cparam01_param_belongs_to_the_header(env: Env) -> None:
    response = env.register(load("cparam01.dat"))
    assert response.status == 200
    assert env.contacts("sip:watson@example.com") == ["sip:+19725552222@gw1.example.net"]


def test_rfc4475_cparam02_param_belongs_to_the_uri(env: Env) -> None:
    response = env.register(load("cparam02.dat"))
    assert response.status == 200
    assert env.contacts("sip:watson@example.com") == [
        "sip:+19725552222@gw1.example.net;unknownparam"
    ]


def test_rfc4475_cparam01_then_02_refresh_one_binding(env: Env) -> None:
    """RFC 3261 19.1.4: a parameter only one URI has is ignored, so the two URIs are equal."""
    env.register(load("cparam01.dat"))
    assert env.register(load("cparam02.dat")).status == 200
    [b] = env.location.lookup("sip:watson@example.com")
    assert b.contact == "sip:+19725552222@gw1.example.net;unknownparam"
    assert (b.call_id, b.cseq) == ("cparam02.70710@saturn.example.com", 3)


def test_rfc4475_regescrt_keeps_the_escaped_header(env: Env) -> None:
    response = env.register(load("regescrt.dat"))
    assert response.status == 200
    contact = "sip:user@example.com?Route=%3Csip:sip.example.com%3E"
    assert env.contacts("sip:user@example.com") == [contact]
    assert list(listed(response)) == [contact]


def test_rfc4475_regbadct_never_reaches_the_registrar() -> None:
    with pytest.raises(ParseError) as info:
        parse_message((RFC4475 / "regbadct.dat").read_bytes())
    assert info.value.status == 400


def test_rfc4475_regaut01_query_is_answered(env: Env) -> None:
    response = env.register(load("regaut01.dat"))
    assert response.status == 200  # no Contact: a query; the unknown Authorization is ignored
    assert response.headers.get_all("Contact") == []


def test_every_host_address_is_one_domain_when_no_domains_are_named() -> None:
    """No [proxy] domains (the no-config default): a REGISTER to any address of the host is
    accepted for any user, and every such address is the same domain: the user part is the
    key. Other hosts stay foreign."""
    clock = Clock()
    location = LocationService(clock)
    host_addresses = {"127.0.0.1", "192.0.2.2", "2001:db8::2"}
    registrar = Registrar(location, clock, [], own_host=host_addresses.__contains__)
    for to, contact in [("<sip:alice@127.0.0.1>", "<sip:alice@10.0.0.5:5062>"),
                        ("<sip:bob@[2001:DB8::2]:5060>", "<sip:bob@10.0.0.6>")]:
        response = registrar.handle_register(make_register([contact], to=to))
        assert response.status == 200, to
    alice = parse_uri("sip:alice@192.0.2.2")
    assert registrar.aor(alice) == registrar.aor(parse_uri("sips:alice@127.0.0.1:5061"))
    assert [b.contact for b in location.lookup(registrar.aor(alice))] == [
        "sip:alice@10.0.0.5:5062"]
    bob = registrar.aor(parse_uri("sip:bob@127.0.0.1"))
    assert [b.contact for b in location.lookup(bob)] == ["sip:bob@10.0.0.6"]
    refused = registrar.handle_register(make_register(["<sip:eve@10.0.0.7>"],
                                                      to="<sip:eve@198.51.100.9>"))
    assert refused.status == 404
    assert registrar.aor(parse_uri("sip:eve@198.51.100.9")) == "sip:eve@198.51.100.9"


def test_named_domains_keep_their_meaning(env: Env) -> None:
    """With domains named (and no own_host) the host's addresses are not a domain."""
    response = env.register(make_register(["<sip:alice@192.0.2.1>"], to="<sip:alice@127.0.0.1>"))
    assert response.status == 404
    assert env.registrar.aor(parse_uri("sip:alice@127.0.0.1")) == "sip:alice@127.0.0.1"
# -- max_contacts and the Contact index ---------------------------------------------------------
def grouped(contacts: list[str], size: int = 40) -> list[str]:
    """Contacts as comma-separated header values (a REGISTER has a limit on header lines)."""
    return [", ".join(contacts[i:i + size]) for i in range(0, len(contacts), size)]


def test_more_contacts_than_max_contacts_are_refused_whole() -> None:
    env = Env(max_contacts=3)
    contacts = [f"<sip:alice@192.0.2.{n}>" for n in range(1, 4)]
    assert env.register(make_register(contacts)).status == 200
    r = env.register(make_register(["<sip:alice@192.0.2.4>"], call_id="reg-2"))
    assert (r.status, r.reason) == (403, "Too Many Registered Contacts")
    assert len(env.contacts()) == 3
    # refreshing, or replacing one by another in one request, passes
    assert env.register(make_register(contacts, cseq=2)).status == 200
    swap = ["<sip:alice@192.0.2.1>;expires=0", "<sip:alice@192.0.2.4>"]
    assert env.register(make_register(swap, cseq=3)).status == 200
    assert sorted(env.contacts()) == [f"sip:alice@192.0.2.{n}" for n in (2, 3, 4)]
    # one REGISTER with many at once: all or nothing
    many = [f"<sip:alice@198.51.100.{n}>" for n in range(1, 401)]
    r = env.register(make_register(grouped(many), call_id="reg-3"))
    assert r.status == 403 and len(env.contacts()) == 3
    # other AORs have their own count
    assert env.register(make_register(contacts, to="<sip:bob@example.com>")).status == 200
    # expired bindings do not count
    env.clock.advance(3601)
    assert env.register(make_register(grouped(many[:3]), call_id="reg-4")).status == 200


def test_contact_matching_is_an_index_not_a_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 Contacts against 400 bindings: uri_equal is asked about each pair that shares the
    always-compared parts, not about every pair (that was 160,000 calls)."""
    import sipproxy.registrar as registrar_module

    env = Env(max_contacts=1000)
    many = [f"<sip:alice@198.51.100.{n % 250}:{5060 + n}>" for n in range(400)]
    assert env.register(make_register(grouped(many))).status == 200
    calls = []
    real = registrar_module.uri_equal
    monkeypatch.setattr(registrar_module, "uri_equal",
                        lambda a, b: calls.append(1) or real(a, b))
    assert env.register(make_register(grouped(many), cseq=2)).status == 200
    assert len(env.contacts()) == 400
    assert len(calls) <= 400


def test_index_keeps_rfc3261_equivalence(env: Env) -> None:
    """Equal under 19.1.4 although spelled apart: a parameter only one side has (other than
    user, ttl, method, maddr, transport) does not matter; one of those does."""
    env.register(make_register(["<sip:alice@192.0.2.1;foo=1>"]))
    env.register(make_register(["<sip:ALICE@192.0.2.1>"], cseq=2))  # user is case-sensitive
    env.register(make_register(["<sip:alice@192.0.2.1;transport=tcp>"], cseq=3))
    env.register(make_register(["<sip:alice@192.0.2.1;bar=2>"], cseq=4))  # refreshes ;foo=1
    assert sorted(env.contacts()) == ["sip:ALICE@192.0.2.1", "sip:alice@192.0.2.1;bar=2",
                                      "sip:alice@192.0.2.1;transport=tcp"]
