"""
Hypothesis-driven mutations of valid SIP messages sent over UDP and TCP to a running proxy
process: it stays up, logs no unhandled exception, and answers a valid OPTIONS afterwards on
both transports. C{SIPPROXY_FUZZ_EXAMPLES} raises the example count (default 300 per transport).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import chunked, examples, mutated
from tests.integration.support.harness import LOOPBACK, ProxyProcess, free_port, options_probe

pytestmark = pytest.mark.fuzz

SETTINGS = settings(
    max_examples=examples(300), deadline=None, database=None, derandomize=False,
    suppress_health_check=list(HealthCheck),
)


def config(port: int) -> dict[str, Any]:
    return {
        "proxy": {"domains": ["lan.example"]},
        "listen": [
            {"side": "inside", "transport": "udp", "address": LOOPBACK, "port": port},
            {"side": "inside", "transport": "tcp", "address": LOOPBACK, "port": port},
        ],
        # forwarded requests go to a port where nobody listens: they fail, as on a bad day
        "upstream": {"uri": f"sip:{LOOPBACK}:{free_port()};transport=udp"},
        "limits": {"message_timeout": 2},
        "plugins": {"enabled": []},
    }


def assert_healthy(proxy: ProxyProcess) -> None:
    assert proxy.running(), f"the proxy died\n{proxy.log_tail()}"
    host, port = proxy.address("udp")
    for transport in ("udp", "tcp"):
        answer = None
        for _ in range(10):  # bounded: it may be busy with what the fuzzer sent
            answer = options_probe(host, port, transport, timeout=1.0)
            if answer is not None:
                break
            time.sleep(0.2)
        assert answer is not None, f"no answer over {transport}\n{proxy.log_tail()}"
    log = proxy.log_path.read_text(errors="replace")
    assert "Traceback" not in log, proxy.log_tail(300)


def test_mutated_messages_over_udp_and_tcp(proxy_factory) -> None:
    proxy: ProxyProcess = proxy_factory(config(free_port()))
    target = proxy.address("udp")
    sent = {"udp": 0, "tcp": 0, "tcp_reconnects": 0}

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((LOOPBACK, 0))
        udp.setblocking(False)

        @SETTINGS
        @given(mutated())
        def over_udp(data: bytes) -> None:
            try:
                udp.sendto(data[:65000], target)
                sent["udp"] += 1
                while True:  # drain answers so our buffer never fills (bounded by the kernel)
                    udp.recv(65535)
            except OSError:
                pass

        over_udp()
    assert_healthy(proxy)

    tcp: list[socket.socket] = []

    def connection() -> socket.socket:
        if not tcp:
            s = socket.create_connection(target, timeout=2)
            s.setblocking(False)
            tcp.append(s)
            sent["tcp_reconnects"] += 1
        return tcp[0]

    def drop() -> None:
        while tcp:
            tcp.pop().close()

    @SETTINGS
    @given(st.lists(mutated(), min_size=1, max_size=3), st.lists(st.integers(0, 10**6),
                                                                  max_size=4), st.booleans())
    def over_tcp(messages: list[bytes], cuts: list[int], fresh: bool) -> None:
        if fresh:
            drop()
        try:
            s = connection()
            for chunk in chunked(b"".join(messages), cuts):
                s.sendall(chunk)
            sent["tcp"] += len(messages)
            while True:
                if not s.recv(65535):  # the proxy closed it (a framing error): next one
                    drop()
                    break
        except BlockingIOError:
            pass
        except OSError:
            drop()

    try:
        over_tcp()
    finally:
        drop()
    assert_healthy(proxy)
    print(f"\nfuzz: {sent['udp']} UDP datagrams, {sent['tcp']} TCP messages on "
          f"{sent['tcp_reconnects']} connections; the proxy answered OPTIONS afterwards")
