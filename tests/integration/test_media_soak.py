"""
A bounded soak of the media plugin: 1,000 short calls (50 per second, 200 ms each) through the
proxy and its built-in relay on loopback, sipp UAC -> proxy -> sipp UAS, every INVITE and 200
with SDP. The relay's NG port (``[media] listen_ng``) shows its sessions while the calls run;
afterwards it holds none and no relay port is open (/proc/net/udp).
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sipproxy.media.ng import decode_message, encode_message
from tests.integration.harness import LOOPBACK, Sipp, free_port

CALLS = 1000
RATE = 50
RELAY_PORTS = (21000, 21999)


def ng(port: int, message: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(encode_message(secrets.token_hex(6).encode(), message), (LOOPBACK, port))
        _cookie, reply, _ = decode_message(sock.recv(65535))
    assert reply is not None
    return reply


def relay_ports_open() -> list[int]:
    ports = []
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1 and ":" in fields[1]:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if RELAY_PORTS[0] <= port <= RELAY_PORTS[1]:
                    ports.append(port)
    return ports


class Sampler(threading.Thread):
    """Asks the relay for its calls every 0.2 s (bounded by ``limit`` seconds)."""

    def __init__(self, port: int, limit: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.deadline = time.monotonic() + limit
        self.stop_event = threading.Event()
        self.most_calls = 0
        self.most_ports = 0

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            try:
                calls = ng(self.port, {"command": "list", "limit": 1000}).get("calls") or []
            except TimeoutError:
                calls = []
            self.most_calls = max(self.most_calls, len(calls))
            self.most_ports = max(self.most_ports, len(relay_ports_open()))
            self.stop_event.wait(0.2)


def test_a_thousand_short_calls_leave_no_session_and_no_port(proxy_factory: Any,
                                                              sipp: Sipp) -> None:
    uas_port, ng_port = free_port(), free_port()
    assert relay_ports_open() == []  # nothing else uses the range
    proxy = proxy_factory({
        "proxy": {"domains": []},
        "listen": [{"side": "outside", "transport": "udp", "address": LOOPBACK,
                    "port": free_port()}],
        "upstream": {"uri": f"sip:{LOOPBACK}:{uas_port}"},
        # a public relay for unauthenticated callers: this is about media, not access control
        "plugins": {"enabled": ["media"], "open_relay": True},
        # userspace: the soak runs in the host's own network namespace, whose nftables
        # ruleset the tests leave alone (the kernel fast path: test_media_kernel_netns.py)
        "media": {"port_min": RELAY_PORTS[0], "port_max": RELAY_PORTS[1],
                  "listen_ng": f"{LOOPBACK}:{ng_port}", "kernel": False},
    })
    assert ng(ng_port, {"command": "ping"})["result"] == "pong"
    sampler = Sampler(ng_port, limit=60)
    sampler.start()
    try:
        uas = sipp.start_uas("uas_rr.xml", uas_port, count=CALLS, timeout=60)
        client = sipp.run_uac("uac_rr.xml", proxy.address(), rate=RATE, count=CALLS,
                              call_duration_ms=200, timeout=60,
                              keys={"ruri": f"sip:service@{LOOPBACK}:{uas_port}"})
        server = uas.wait(15)
    finally:
        sampler.stop_event.set()
        sampler.join(5)
    assert proxy.running(), proxy.log_tail()
    assert client.ok(CALLS), f"{client.describe()}\n{proxy.log_tail()}"
    assert server.ok(CALLS), server.describe()
    # the calls really went through the relay: it held sessions and ports while they ran
    assert sampler.most_calls >= 2 and sampler.most_ports >= 8, (
        sampler.most_calls, sampler.most_ports)
    # and nothing is left: no session, no open port (bounded wait for the last BYE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (relay_ports_open() or
                                           ng(ng_port, {"command": "list"})["calls"]):
        time.sleep(0.1)
    assert ng(ng_port, {"command": "list", "limit": 1000})["calls"] == []
    assert relay_ports_open() == []
    assert "media relay refused" not in proxy.log_path.read_text(errors="replace")
