"""URIs (sip, sips, tel, others), name-addr / addr-spec values, parameters and list splitting."""

from __future__ import annotations

import tracemalloc

import pytest

from sipproxy.errors import ParseError
from sipproxy.uri import (
    URI,
    NameAddr,
    Params,
    check_name_addr,
    format_host,
    parse_name_addr,
    parse_params,
    parse_uri,
    split_header_values,
    unescape,
)


# -- SIP / SIPS URIs ---------------------------------------------------------------------------
def test_sip_uri_parts() -> None:
    uri = parse_uri(
        "sip:alice:secret@Example.COM:5070;transport=tcp;lr;maddr=10.0.0.1?Subject=hi&X=y")
    assert uri.scheme == "sip"
    assert uri.is_sip and not uri.secure
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "Example.COM"
    assert uri.port == 5070
    assert uri.transport == "TCP"
    assert uri.loose_route
    assert uri.get_param("maddr") == "10.0.0.1"
    assert list(uri.params) == [("transport", "tcp"), ("lr", None), ("maddr", "10.0.0.1")]
    assert uri.headers == "Subject=hi&X=y"
    assert uri.hostport() == "Example.COM:5070"
    assert uri.aor() == "sip:alice@example.com"


def test_sip_uri_minimal() -> None:
    uri = parse_uri("sip:example.com")
    assert (uri.user, uri.password, uri.host, uri.port, uri.headers) == (
        None, None, "example.com", None, None)
    assert len(uri.params) == 0
    assert uri.transport is None
    assert not uri.loose_route


def test_sips_uri() -> None:
    uri = parse_uri("SIPS:bob@secure.example.com")
    assert uri.secure and uri.is_sip
    assert str(uri) == "SIPS:bob@secure.example.com"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:[2001:db8::10]", "2001:db8::10", None),
        ("sip:user@[2001:db8::10]:5070", "2001:db8::10", 5070),
        ("sip:[::1]:1;transport=udp", "::1", 1),
        ("sip:[::ffff:192.0.2.1]", "::ffff:192.0.2.1", None),
        ("sip:192.0.2.1:65535", "192.0.2.1", 65535),
        ("sip:host.example.com.", "host.example.com.", None),
    ],
)
def test_uri_hosts(text: str, host: str, port: int | None) -> None:
    uri = parse_uri(text)
    assert uri.host == host
    assert uri.port == port
    assert str(uri) == text


def test_ipv6_host_rendered_with_brackets() -> None:
    uri = parse_uri("sip:user@[2001:db8::1]:5060;lr")
    uri.port = 5061
    assert str(uri) == "sip:user@[2001:db8::1]:5061;lr"
    uri.host = "[2001:db8::2]"
    assert uri.host == "2001:db8::2"
    assert str(uri) == "sip:user@[2001:db8::2]:5061;lr"
    assert format_host("2001:db8::2") == "[2001:db8::2]"
    assert format_host("[2001:db8::2]") == "[2001:db8::2]"
    assert format_host("example.com") == "example.com"


def test_escapes_kept_as_written_and_unescaped_once() -> None:
    uri = parse_uri("sip:%61lice%2541@example.com;n%61me=v%61lue")
    assert uri.user == "%61lice%2541"
    assert unescape(uri.user or "") == "alice%41"
    assert uri.get_param("n%61me") == "v%61lue"
    assert str(uri) == "sip:%61lice%2541@example.com;n%61me=v%61lue"
    assert uri.aor() == "sip:alice%41@example.com"
    assert unescape("no-escapes") == "no-escapes"
    assert unescape("%e2%82%ac") == "\u20ac"


def test_user_with_semicolon_and_escaped_at() -> None:
    uri = parse_uri("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"


def test_params_case_insensitive_names_kept_case() -> None:
    uri = parse_uri("sip:a@b;Transport=TLS;LR")
    assert uri.transport == "TLS"
    assert uri.loose_route
    assert uri.has_param("lr")
    assert list(uri.params) == [("Transport", "TLS"), ("LR", None)]


def test_uri_change_renders_anew() -> None:
    text = "sip:alice@example.com;transport=udp"
    uri = parse_uri(text)
    assert str(uri) == text
    uri.set_param("transport", "tcp")
    assert str(uri) == "sip:alice@example.com;transport=tcp"
    uri.remove_param("transport")
    uri.set_param("lr", None)
    assert str(uri) == "sip:alice@example.com;lr"
    uri.user = None
    assert str(uri) == "sip:example.com;lr"
    uri.headers = "a=b"
    assert str(uri) == "sip:example.com;lr?a=b"


def test_params_in_place_change_needs_touch() -> None:
    uri = parse_uri("sip:a@b;x=1")
    uri.params.set("x", "2")
    uri.touch()
    assert str(uri) == "sip:a@b;x=2"


def test_uri_copy_independent() -> None:
    uri = parse_uri("sip:a@b;x=1")
    other = uri.copy()
    other.set_param("x", "2")
    other.port = 9
    assert str(uri) == "sip:a@b;x=1"
    assert str(other) == "sip:a@b:9;x=2"


def test_uri_equality_and_hash() -> None:
    assert parse_uri("sip:a@b") == parse_uri("sip:a@b")
    assert parse_uri("sip:a@b") != parse_uri("sip:a@c")
    assert len({parse_uri("sip:a@b"), parse_uri("sip:a@b")}) == 1
    assert parse_uri("sip:a@b") != "sip:a@b"


def test_built_uri() -> None:
    uri = URI("sips", "bob", "2001:db8::1", 5061, Params([("transport", "tcp")]), "h=v", "pw")
    assert str(uri) == "sips:bob:pw@[2001:db8::1]:5061;transport=tcp?h=v"
    assert parse_uri(str(uri)).host == "2001:db8::1"


# -- TEL and other schemes ---------------------------------------------------------------------
def test_tel_uri() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert uri.scheme == "tel"
    assert not uri.is_sip and not uri.secure
    assert uri.opaque == "+1-201-555-0123;phone-context=example.com"
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com"
    assert uri.aor() == "tel:+1-201-555-0123;phone-context=example.com"


@pytest.mark.parametrize("text", ["http://www.example.com", "name:John_Smith", "soap.beep://x",
                                  "urn:service:sos"])
def test_other_schemes_opaque(text: str) -> None:
    uri = parse_uri(text)
    assert not uri.is_sip
    assert str(uri) == text


# -- malformed URIs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:user@",
        "sip:2001:db8::10",  # IPv6 without brackets
        "sip:[2001:db8:::192.0.2.1]",  # three colons
        "sip:[2001:db8::1",
        "sip:[2001:db8::1]x",
        "sip:host:65536",
        "sip:host:123456",
        "sip:host:-1",
        "sip:host:",
        "sip:us er@host",
        "sip:user@ho st",
        "sip:user@host;",
        "sip:user@host;a=",
        "sip:user@host;a b=c",
        "sip:@host",
        "sip:user@host_name",
        "sip:user@-host",
        "sip:u%zzser@host",
        "1sip:host",
        "nocolon",
        "tel:",
        "sip:user@host?a=<b>",
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_uri(text)
    assert exc.value.status == 400


def test_headers_refused_when_not_allowed() -> None:
    with pytest.raises(ParseError):
        parse_uri("sip:user@host?Route=x", allow_headers=False)


# -- name-addr / addr-spec ---------------------------------------------------------------------
def test_name_addr_with_display_and_tag() -> None:
    na = parse_name_addr('"Alice Smith" <sip:alice@example.com;transport=tcp>;tag=abc;x=y')
    assert na.display == '"Alice Smith"'
    assert na.uri.user == "alice"
    assert na.uri.transport == "TCP"
    assert na.tag == "abc"
    assert na.get_param("x") == "y"
    assert list(na.params) == [("tag", "abc"), ("x", "y")]
    assert na.angle


def test_name_addr_token_display() -> None:
    na = parse_name_addr("Bob Jones <sip:bob@example.com>")
    assert na.display == "Bob Jones"
    assert na.tag is None


def test_name_addr_no_space_before_angle() -> None:
    na = parse_name_addr("caller<sip:caller@example.com>;tag=323")
    assert na.display == "caller"
    assert na.tag == "323"


def test_addr_spec_params_belong_to_header() -> None:
    na = parse_name_addr("sip:alice@example.com;tag=1;transport=tcp")
    assert not na.angle
    assert na.tag == "1"
    assert na.get_param("transport") == "tcp"
    assert len(na.uri.params) == 0
    assert str(na.uri) == "sip:alice@example.com"


def test_angle_params_belong_to_uri() -> None:
    na = parse_name_addr("<sip:alice@example.com;transport=tcp>;tag=1")
    assert na.uri.transport == "TCP"
    assert "transport" not in na.params
    assert na.tag == "1"


def test_addr_spec_without_headers() -> None:
    with pytest.raises(ParseError):
        parse_name_addr("sip:user@example.com?Route=%3Csip:x%3E")
    na = parse_name_addr("<sip:user@example.com?Route=%3Csip:x%3E>")
    assert na.uri.headers == "Route=%3Csip:x%3E"


def test_name_addr_ipv6() -> None:
    na = parse_name_addr('"Caller" <sip:caller@[2001:db8::1]:5070>;expires=60')
    assert na.uri.host == "2001:db8::1"
    assert na.uri.port == 5070
    assert na.get_param("expires") == "60"


def test_name_addr_lws_around_params() -> None:
    na = parse_name_addr("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n")
    assert na.tag == "1918181833n"
    assert str(na) == "sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n"


def test_name_addr_quoted_param_value() -> None:
    na = parse_name_addr('<sip:a@b>;x="a;b,c";tag=t')
    assert na.get_param("x") == '"a;b,c"'
    assert na.tag == "t"


def test_star_contact() -> None:
    na = parse_name_addr("*", allow_star=True)
    assert str(na) == "*"
    with pytest.raises(ParseError):
        parse_name_addr("*")


def test_name_addr_unchanged_is_byte_exact() -> None:
    for text in ['"A" <sip:a@b>;tag=1', "sip:a@b ; tag = 2", "<sip:a@b>", 'x <sip:a@b>;p']:
        assert str(parse_name_addr(text)) == text


def test_name_addr_set_tag() -> None:
    na = parse_name_addr('"A" <sip:a@b>')
    na.tag = "xyz"
    assert str(na) == '"A" <sip:a@b>;tag=xyz'
    na.tag = None
    assert str(na) == '"A" <sip:a@b>'


def test_addr_spec_with_uri_params_gets_angles_when_rendered() -> None:
    na = parse_name_addr("sip:a@b;tag=1")
    na.uri = parse_uri("sip:a@c;transport=tcp")
    # without <> the uri-parameter would turn into a header parameter
    assert str(na) == "<sip:a@c;transport=tcp>;tag=1"
    assert parse_name_addr(str(na)).uri.transport == "TCP"


def test_name_addr_uri_changed_in_place() -> None:
    na = parse_name_addr("<sip:a@b>;tag=1")
    na.uri.host = "c"
    assert str(na) == "<sip:a@c>;tag=1"
    # rendering the URI on its own first must not freeze the old name-addr text
    na2 = parse_name_addr("<sip:a@b>;tag=1")
    na2.uri.port = 5070
    assert str(na2.uri) == "sip:a@b:5070"
    assert str(na2) == "<sip:a@b:5070>;tag=1"


def test_name_addr_copy_independent() -> None:
    na = parse_name_addr("<sip:a@b>;tag=1")
    other = na.copy()
    other.tag = "2"
    other.uri.host = "c"
    assert str(na) == "<sip:a@b>;tag=1"
    assert str(other) == "<sip:a@c>;tag=2"


def test_built_name_addr() -> None:
    na = NameAddr(parse_uri("sip:a@b"), '"Disp"', Params([("expires", "30")]))
    assert str(na) == '"Disp" <sip:a@b>;expires=30'
    assert str(NameAddr(parse_uri("sip:a@b"), angle=False)) == "sip:a@b"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '"unterminated <sip:a@b>',
        "<sip:a@b",
        "<sip:a@b>;",
        "<sip:a@b>;tag=",
        "<sip:a@b>;;tag=1",
        "sip:a b@c",
        "Bad@Name <sip:a@b>",
        '"x" sip:a@b',
        "<sip:a@b>junk",
        "<>",
    ],
)
def test_bad_name_addrs(text: str) -> None:
    with pytest.raises(ParseError):
        parse_name_addr(text)
    with pytest.raises(ParseError):
        check_name_addr(text)


def test_check_name_addr_agrees_with_parser() -> None:
    for text in ['"A" <sip:a@b>;tag=1', "sip:a@b;tag=1", "<tel:+1234>", "<sip:a@[::1]>"]:
        check_name_addr(text)
        parse_name_addr(text)


# -- parameters and list splitting -------------------------------------------------------------
def test_parse_params() -> None:
    p = parse_params(";a=1; B = 2 ;c", "test")
    assert list(p) == [("a", "1"), ("B", "2"), ("c", None)]
    assert p.get("b") == "2"
    assert p["A"] == "1"
    assert "C" in p
    assert "d" not in p
    with pytest.raises(KeyError):
        p["d"]
    p.set("b", "3")
    p.remove("A")
    assert str(p) == ";B=3;c"
    assert p == Params([("B", "3"), ("c", None)])
    assert len(parse_params("", "test")) == 0


def test_split_header_values() -> None:
    assert split_header_values("a, b ,c") == ["a", "b", "c"]
    assert split_header_values('"Doe, John" <sip:j@x>, <sip:k@y;a=b,c>') == [
        '"Doe, John" <sip:j@x>', "<sip:k@y;a=b,c>"]
    assert split_header_values('"a \\" , b" <sip:x@y>') == ['"a \\" , b" <sip:x@y>']
    assert split_header_values("<sip:a@b>;x=\"1,2\", sip:c@d") == [
        '<sip:a@b>;x="1,2"', "sip:c@d"]
    assert split_header_values("single") == ["single"]
    assert split_header_values("a,,b") == ["a", "", "b"]
    with pytest.raises(ParseError):
        split_header_values('"unterminated, x')
    with pytest.raises(ParseError):
        split_header_values("<sip:a@b, c")


def test_check_host() -> None:
    from sipproxy.uri import check_host

    assert check_host("[2001:db8::1]") == "2001:db8::1"
    assert check_host("example.com") == "example.com"
    assert check_host("192.0.2.1") == "192.0.2.1"
    for bad in ("-a.example.com", "a..b", "a_b", "[1::2::3]", "[::1", ""):
        with pytest.raises(ParseError):
            check_host(bad)


def test_name_addr_builds_its_uri_when_first_read():
    text = '"Bob" <sip:bob@example.com:5070;transport=udp>;tag=9'
    na = parse_name_addr(text)
    assert na.tag == "9" and str(na) == text
    twin = na.copy()
    assert na.uri.port == 5070 and na.uri.transport == "UDP" and str(na.uri) == (
        "sip:bob@example.com:5070;transport=udp")
    na.uri.set_param("transport", "tcp")  # changed in place: the name-addr renders anew
    assert str(na) == '"Bob" <sip:bob@example.com:5070;transport=tcp>;tag=9'
    assert str(twin) == text and twin.uri.user == "bob"  # the copy kept its own parts
    with pytest.raises(ParseError):
        parse_name_addr("<sip:bob@example.com:65536>;tag=1")


def test_the_same_text_parsed_again_gives_a_name_addr_of_its_own():
    # parsed texts are remembered (every message of a call has the same From): what a caller
    # changes in one parsed name-addr must not show in the next one parsed from that text
    text = '"Al" <sip:al@example.com;transport=udp>;tag=7;x'
    first = parse_name_addr(text)
    first.tag = "8"
    first.params.set("x", "1")
    first.uri.host = "other.example.com"
    again = parse_name_addr(text)
    assert again is not first and str(again) == text
    assert again.tag == "7" and again.get_param("x") is None
    assert again.uri.host == "example.com" and again.display == '"Al"'
    assert str(first) == '"Al" <sip:al@other.example.com;transport=udp>;tag=8;x=1'


def test_the_same_uri_text_parsed_again_gives_a_uri_of_its_own():
    text = "sip:bob@example.com:5070;transport=udp"
    first = parse_uri(text)
    first.set_param("transport", "tcp")
    first.host = "other.example.com"
    again = parse_uri(text)
    assert again is not first and str(again) == text
    assert again.transport == "UDP" and again.host == "example.com" and again.port == 5070


def test_long_distinct_values_from_a_peer_do_not_pile_up_in_memory() -> None:
    # what is parsed is remembered for the next message of the call, but only short texts:
    # 2,000 distinct 7 KB From and Request-URI values must not stay behind (they took ~70 MiB)
    pad = "a" * 7000
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(2000):
            text = f"<sip:u{i}{pad}@example.com>;tag=x{i}"
            check_name_addr(text)
            assert parse_name_addr(text).tag == f"x{i}"
            assert parse_uri(f"sip:v{i}{pad}@example.com").user == f"v{i}{pad}"
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 2 * 2**20, f"{(after - before) / 2**20:.1f} MiB kept"
