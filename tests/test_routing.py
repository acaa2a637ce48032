"""sipproxy.proxy.routing's functions for plugins: where the core will send a request (RFC 3261
16.4), worked out before it routes it and without changing the request."""

from __future__ import annotations

import pytest

from sipproxy.errors import ParseError
from sipproxy.message import Request, parse_message
from sipproxy.proxy.routing import next_hop, preprocess_routes
from sipproxy.uri import URI

OURS = "192.0.2.1"


def is_own(uri: URI) -> bool:
    return uri.host == OURS and uri.port in (None, 5060)


def request(uri: str, *routes: str) -> Request:
    route_lines = "".join(f"Route: {r}\r\n" for r in routes)
    message = parse_message((
        f"INVITE {uri} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK-1\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>\r\n"
        "Call-ID: r1\r\n"
        "CSeq: 1 INVITE\r\n"
        f"{route_lines}"
        "Content-Length: 0\r\n\r\n"
    ).encode())
    assert isinstance(message, Request)
    return message


@pytest.mark.parametrize(("uri", "routes", "expected"), [
    ("sip:bob@example.com", (), ("sip:bob@example.com", False)),
    ("sip:bob@example.com", (f"<sip:{OURS};lr>",), ("sip:bob@example.com", False)),
    ("sip:bob@example.com", (f"<sip:{OURS};lr>, <sip:peer.example;lr>", "<sip:far.example;lr>"),
     ("sip:peer.example;lr", True)),
    # a strict router put our Record-Route in the Request-URI: the last Route is the target
    (f"sip:{OURS};lr", ("<sip:peer.example;lr>", "<sip:bob@example.com>"),
     ("sip:peer.example;lr", True)),
    (f"sip:{OURS};lr", ("<sip:bob@example.com>",), ("sip:bob@example.com", False)),
], ids=["no-route", "only-ours", "ours-then-foreign", "strict-with-route", "strict"])
def test_next_hop_is_where_the_core_sends_it(
    uri: str, routes: tuple[str, ...], expected: tuple[str, bool]
) -> None:
    message = request(uri, *routes)
    before = message.to_bytes()
    hop, routed = next_hop(message, is_own)
    assert (str(hop), routed) == expected
    assert message.to_bytes() == before  # worked out on a copy
    # the same as the core's preprocessing leaves it
    preprocess_routes(message, is_own)
    left = message.headers.get_all("route")
    assert (left[0].strip("<>") if left else str(message.uri)) == expected[0]


def test_a_route_that_does_not_parse() -> None:
    with pytest.raises(ParseError):
        next_hop(request("sip:bob@example.com", "<sip:bad"), is_own)
