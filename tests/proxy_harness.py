"""The proxy of tests/test_proxy.py (sipproxy.testing's harness with a registrar for
lan.example and the provider upstream) and its message builders, shared with the tests of the
flood guard's per-source limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sipproxy.context import Target
from sipproxy.message import Message, Request, Response, Source
from sipproxy.testing import ProxyHarness, ResolverDouble, listen_toml

INSIDE = "192.168.1.1"  # the proxy's inside UDP listener
OUTSIDE = "203.0.113.10"  # the proxy's outside UDP listener
ALICE = Source("UDP", "192.168.1.20", 5060, INSIDE, 5060, "inside")
PROVIDER = Target("UDP", "198.51.100.7", 5070, "provider.example")
PROVIDER_SOURCE = Source("UDP", PROVIDER.host, PROVIDER.port, OUTSIDE, 5060, "outside")
BOB_1 = "sip:bob@192.168.1.30:5062"
BOB_2 = "sip:bob@192.168.1.31:5062"
CONFIG = f"""
[proxy]
domains = ["lan.example"]
user_agent = "sipproxy-test"

{listen_toml(inside=INSIDE, outside=OUTSIDE)}
[upstream]
uri = "sip:provider.example:5070;transport=udp"
"""


@dataclass
class Harness(ProxyHarness):
    """sipproxy.testing's proxy with what these tests ask of it."""

    counter: list[int] = field(default_factory=lambda: [0])

    # -- input -----------------------------------------------------------------------------------
    def receive(self, data: bytes | str, source: Source = ALICE) -> Message:
        return super().receive(data, source)

    def respond(
        self,
        request: Request,
        status: int,
        to_tag: str | None = "callee",
        source: Source | None = None,
        extra: str = "",
    ) -> Response:
        """The response a downstream element sends to ``request`` (as we sent it)."""
        response = request.make_response(status)
        text = response.to_bytes().decode()
        if to_tag and status > 100 and ";tag=" not in (request.headers.get("to") or ""):
            text = text.replace(f"To: {request.headers.get('to')}",
                                f"To: {request.headers.get('to')};tag={to_tag}", 1)
        if extra:
            text = text.replace("\r\n\r\n", f"\r\n{extra}\r\n\r\n", 1)
        if source is None:
            target = self.target_of(request)
            source = Source(target.transport, target.host, target.port, INSIDE, 5060, "inside")
        parsed = self.receive(text, source)
        assert isinstance(parsed, Response)
        return parsed

    def target_of(self, request: Request) -> Target:
        for sent, target in self.wire.requests:
            if sent is request:
                return target
        raise AssertionError(f"{request!r} was not sent")

    # -- output ----------------------------------------------------------------------------------
    def sent(self, method: str | None = None) -> list[Request]:
        return [r for r, _ in self.wire.requests if method is None or r.method == method]

    def replies(self, status: int | None = None) -> list[Response]:
        return [r for r, _ in self.wire.responses if status is None or r.status == status]

    def statuses(self) -> list[int]:
        return [r.status for r, _ in self.wire.responses]

    def finals(self, method: str | None = None) -> list[int]:
        """Final statuses sent upstream (for ``method`` only, if given); a retransmission
        (the same bytes again, Timer G) is counted once."""
        seen: set[bytes] = set()
        result = []
        for r, _ in self.wire.responses:
            if r.status >= 200 and (method is None or r.cseq.method == method):
                data = r.to_bytes()
                if data not in seen:
                    seen.add(data)
                    result.append(r.status)
        return result

    # -- setup helpers ---------------------------------------------------------------------------
    def register(self, user: str, contact: str, call_id: str | None = None) -> Response:
        self.counter[0] += 1
        n = self.counter[0]
        before = len(self.wire.responses)
        self.receive(request(
            "REGISTER", "sip:lan.example", call_id=call_id or f"reg-{user}-{n}", cseq=n,
            to=f"<sip:{user}@lan.example>", from_=f"<sip:{user}@lan.example>;tag=r{n}",
            branch=f"z9hG4bKreg{n}", extra=f"Contact: <{contact}>\r\nExpires: 3600",
        ))
        answers = self.wire.responses[before:]
        assert len(answers) == 1
        return answers[0][0]

    def settle(self, limit: int = 200) -> None:
        """Run every pending timer, bounded in count."""
        super().settle(limit)

    def assert_no_leaks(self) -> None:
        self.settle()
        self.assert_nothing_left()


def make_harness(config_text: str = CONFIG, plugins: list[Any] | None = None) -> Harness:
    resolver = ResolverDouble({"provider.example": [PROVIDER]})
    harness: Harness = Harness.build(config_text, plugins=plugins or [], resolver=resolver)
    return harness


def request(
    method: str,
    uri: str,
    *,
    call_id: str = "call-1",
    cseq: int = 1,
    branch: str = "z9hG4bKalice1",
    via: str | None = None,
    to: str = "<sip:bob@lan.example>",
    from_: str = "<sip:alice@lan.example>;tag=a1",
    max_forwards: int | None = 70,
    extra: str = "",
    body: str = "",
) -> str:
    lines = [f"{method} {uri} SIP/2.0"]
    lines.append(via or f"Via: SIP/2.0/UDP {ALICE.host}:{ALICE.port};branch={branch}")
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines += [f"To: {to}", f"From: {from_}", f"Call-ID: {call_id}",
              f"CSeq: {cseq} {method}"]
    if extra:
        lines.append(extra)
    lines.append(f"Content-Length: {len(body.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + body


def invite(uri: str = "sip:bob@lan.example", **kw: Any) -> str:
    kw.setdefault("extra", f"Contact: <sip:alice@{ALICE.host}:{ALICE.port}>")
    return request("INVITE", uri, **kw)


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]
