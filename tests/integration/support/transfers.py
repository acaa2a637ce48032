"""What the transfer tests share (tests/integration/test_transfer_netns.py and
test_transfer_baresip_netns.py): the outside transfer target, timings, and reading the REFER
that crossed the firewall."""

from __future__ import annotations

import time
from urllib.parse import unquote

from sipproxy.message import Request
from sipproxy.plugins.topology import uri_span
from tests.integration.support.netns import PROVIDER_IP
from tests.integration.support.sites import Site, describe_packets

#: seconds of audio the transferred call plays
TALK = 1.5
#: how long the transferee waits (ms) between its NOTIFYs: the transferred call's time
TRANSFER_MS = "5000"
#: an outside transfer target: carol, a second sipp at the provider
CAROL_PORT = 5062
CAROL = f"sip:carol@{PROVIDER_IP}:{CAROL_PORT}"


def wait_refer(site: Site, interface: str, dst: str, after: int,
               limit: float = 10.0) -> Request:
    """The first REFER sent to ``dst`` on ``interface`` in the capture's frames from
    ``after`` on (bounded wait)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for packet in site.capture.snapshot()[after:]:
            if packet.interface == interface and packet.dst == dst and packet.outgoing:
                message = packet.sip()
                if isinstance(message, Request) and message.method == "REFER":
                    return message
        time.sleep(0.1)
    raise AssertionError(f"no REFER reached {dst}\n{describe_packets(site.outside())}\n"
                         f"{site.logs()}")


def refer_target(refer: Request) -> tuple[str, str | None]:
    """The Refer-To URI without its headers, and its ``Replaces=`` (unescaped) if any."""
    value = refer.headers.get("refer-to") or ""
    start, end = uri_span(value)
    base, _, headers = value[start:end].partition("?")
    for item in headers.split("&"):
        name, _, escaped = item.partition("=")
        if name.lower() == "replaces":
            return base, unquote(escaped)
    return base, None
