"""
The relay's kernel fast path end to end, across the NAT of tests/integration/netns.py.

The same call as test_media_netns.py (the phone plays G.711 from the pcap, the provider echoes,
hold and resume, both media ports in the range fw drops), with the relay's kernel fast path on
(real nftables and conntrack in fw): once both ends are latched the kernel forwards the RTP,
so the relay's userspace sockets see only the first packets while the kernel's counters grow;
the relay's table holds the stream's rules during the call and none after the BYE; after the
relay stops the table is gone and fw's ruleset is what it was. The captures are judged as for
the userspace relay (RTP both ways, only through the relay's ports, no inside address
outside). Once with the relay in the proxy's process, once with ``twist sipproxy-relay``.
And once with a firewall that drops what the kernel path forwards (no ``ct status dnat
accept``): the relay notices and relays in userspace.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from sipproxy.media.ng import decode_message, encode_message
from tests.integration.netns import FW_INSIDE, PHONE_IP, PROVIDER_IP, Namespace, NatNet
from tests.integration.test_media_netns import (
    KERNEL_TABLE,
    MIN_PACKETS,
    NG_PORT,
    PHONE_RTP,
    PROVIDER_RTP,
    RELAY_PORTS,
    RelayProcess,
    describe_sip,
    judge,
    media_config,
    media_net,
    open_relay_ports,
    standalone_relay,
)
from tests.integration.test_nat_netns import SIP, SIPP_TIMEOUT, pair, start_site

pytestmark = [pytest.mark.netns]
__all__ = ["media_net"]  # the fixture


def ng(ns: Namespace, message: dict[str, Any], timeout: float = 1.0) -> dict[str, Any] | None:
    """One NG command to the relay on fw's loopback; None without a reply."""
    sock = ns.socket()
    try:
        sock.settimeout(timeout)
        sock.sendto(encode_message(b"k1", message), ("127.0.0.1", NG_PORT))
        data = sock.recv(65535)
    except TimeoutError:
        return None
    finally:
        sock.close()
    return decode_message(data)[1]


def table(ns: Namespace) -> dict[str, Any] | None:
    """The relay's table in ``ns``: {"rules": n, "counters": {name: packets arrived},
    "left": packets that left}; None: no such table."""
    result = ns.run("nft", "-j", "list", "table", "ip", KERNEL_TABLE, check=False)
    if result.returncode != 0:
        return None
    items = json.loads(result.stdout)["nftables"]
    rules = sum("rule" in item for item in items)
    counters = {i["counter"]["name"]: i["counter"]["packets"] for i in items if "counter" in i}
    return {"rules": rules, "counters": {k: v for k, v in counters.items()
                                         if not k.endswith("_out")},
            "left": sum(v for k, v in counters.items() if k.endswith("_out"))}


def userspace_packets(reply: dict[str, Any] | None) -> tuple[int, int] | None:
    """(userspace RTP packets, kernel RTP packets the relay counted) over every stream."""
    if not reply or reply.get("result") != "ok":
        return None
    user = kernel = 0
    for mono in reply.get("tags", {}).values():
        for media in mono.get("medias", []):
            for stream in media.get("streams", []):
                if "RTP" in stream.get("flags", []):
                    user += int(stream.get("userspace stats", {}).get("packets", 0))
                    kernel += int(stream.get("kernel stats", {}).get("packets", 0))
    return user, kernel


def kernel_call(net: NatNet, workdir: Path, relay: str) -> None:
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    process: RelayProcess | None = None
    config = media_config(relay)
    if relay == "ng":
        process = standalone_relay(net.fw, workdir, kernel="on").start()
    else:
        config["media"].update(kernel=True, kernel_table=KERNEL_TABLE,
                               listen_ng=f"127.0.0.1:{NG_PORT}")
    site = start_site(net, workdir, config)
    samples: list[tuple[float, dict[str, Any] | None, tuple[int, int] | None]] = []
    try:
        # the table is there once the relay runs (its start is asynchronous: bounded wait)
        deadline = time.monotonic() + 5
        while table(net.fw) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert table(net.fw) == {"rules": 0, "counters": {}, "left": 0}, site.logs()
        uas = site.provider.start_uas("uas_media.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                      extra_args=["-rtp_echo", "-mp", str(PROVIDER_RTP)])
        uac = site.phone.start_uac("uac_media.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
                                   timeout=SIPP_TIMEOUT, keys={"ruri": "sip:bob@provider.example"},
                                   extra_args=["-mp", str(PHONE_RTP)])
        # while the call runs: the table's rules and counters, the relay's own counts
        deadline = time.monotonic() + SIPP_TIMEOUT
        while uac.process.poll() is None and time.monotonic() < deadline:
            calls = (ng(net.fw, {"command": "list"}) or {}).get("calls") or []
            stats = userspace_packets(ng(net.fw, {"command": "query", "call-id": calls[0]})) \
                if calls else None
            samples.append((time.monotonic(), table(net.fw), stats))
            time.sleep(0.25)
        server, client = pair(uas, uac)
        site.capture.settle()
        logs = site.logs() + (process.log_tail() if process is not None else "") + "\n" + \
            describe_sip(site.capture.snapshot())
        assert client.ok(1), f"{client.describe()}\n{logs}"
        assert server.ok(1), f"{server.describe()}\n{logs}"

        # during the call: one stream pair's rules (RTP; sipp's RTCP never flows) ...
        during = [t for _, t, _ in samples if t is not None]
        assert max(t["rules"] for t in during) == 12, (during, logs)
        # ... whose kernel counters grew to most of the call's packets ...
        kernel_most = max(sum(t["counters"].values()) for t in during)
        assert kernel_most >= 2 * MIN_PACKETS, (during, logs)
        # ... and that left fw again (past its forward chain)
        assert max(t["left"] for t in during) >= 2 * MIN_PACKETS - 4, (during, logs)
        # ... while the relay's userspace sockets saw only the first packets, then no more
        counted = [(at, s) for at, _, s in samples if s is not None]
        assert counted, logs
        user_last = counted[-1][1][0]
        assert user_last <= 40, (counted, logs)
        later = [s for at, s in counted if at >= counted[0][0] + 2.0]
        assert later and later[0][0] == user_last, (counted, logs)  # flat for the last seconds
        assert max(s[1] for _, s in counted) > 0, (counted, logs)  # polled kernel counts

        # after the BYE: no rule (and no counter) is left, no relay port is open
        deadline = time.monotonic() + 5
        empty = {"rules": 0, "counters": {}, "left": 0}
        while table(net.fw) != empty and time.monotonic() < deadline:
            time.sleep(0.1)
        assert table(net.fw) == empty, logs
        deadline = time.monotonic() + 5
        while open_relay_ports(net.fw) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_relay_ports(net.fw) == [], logs
        # the kernel's packets are on the wire like the userspace relay's: same judgement
        judge(site.capture.snapshot(), net, logs)
        # no conntrack entry of the relay's ports NATs anything any more
        entries = net.fw.run("conntrack", "-L", "-p", "udp", check=False).stdout
        leftover = [line for line in entries.splitlines() if "dport=" in line and any(
            f"port={p} " in line for p in range(RELAY_PORTS[0], RELAY_PORTS[0] + 8))
            and "[UNREPLIED]" not in line and "src=203.0.113.50" in line
            and "dst=192.168.77.10" in line]
        assert leftover == [], (leftover, logs)
    finally:
        site.stop()
        if process is not None:
            process.stop()
    # after the relay stopped: its table is gone, fw's ruleset is as it was
    assert table(net.fw) is None
    assert net.fw.run("nft", "list", "ruleset").stdout == nft_before


def test_kernel_fast_path_in_the_proxys_relay(media_net: NatNet, tmp_path: Path) -> None:
    """``[media] kernel = true`` with the builtin relay."""
    kernel_call(media_net, tmp_path, "builtin")


def test_kernel_fast_path_in_the_standalone_relay(media_net: NatNet, tmp_path: Path) -> None:
    """``twist sipproxy-relay --kernel on`` on fw, over NG."""
    kernel_call(media_net, tmp_path, "ng")


def test_a_firewall_that_drops_the_kernel_path_gets_userspace(media_net: NatNet,
                                                               tmp_path: Path) -> None:
    """fw's forward chain without ``ct status dnat accept``: the first packets the kernel
    forwards are dropped by it, the relay sees they arrive but never leave, removes the rules
    and relays in userspace: media flows after all (logged once)."""
    net = media_net
    listing = net.fw.run("nft", "-a", "list", "chain", "ip", "sipnat", "forward").stdout
    handle = next(line.rsplit("# handle ", 1)[1] for line in listing.splitlines()
                  if "ct status dnat accept" in line)
    net.fw.run("nft", "delete", "rule", "ip", "sipnat", "forward", "handle", handle.strip())
    config = media_config("builtin")
    config["media"].update(kernel=True, kernel_table=KERNEL_TABLE,
                           listen_ng=f"127.0.0.1:{NG_PORT}")
    site = start_site(net, tmp_path, config)
    try:
        uas = site.provider.start_uas("uas_media.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                      extra_args=["-rtp_echo", "-mp", str(PROVIDER_RTP)])
        uac = site.phone.start_uac("uac_media.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
                                   timeout=SIPP_TIMEOUT, keys={"ruri": "sip:bob@provider.example"},
                                   extra_args=["-mp", str(PHONE_RTP)])
        rules_seen = 0
        deadline = time.monotonic() + SIPP_TIMEOUT
        while uac.process.poll() is None and time.monotonic() < deadline:
            found = table(net.fw)
            rules_seen = max(rules_seen, found["rules"] if found else 0)
            time.sleep(0.2)
        server, client = pair(uas, uac)
        site.capture.settle()
        logs = site.logs()
        assert client.ok(1) and server.ok(1), logs
        assert rules_seen == 12, logs  # the kernel path was tried
        assert "never left: a firewall drops them" in logs, logs
        assert logs.count("never left") == 1, logs  # logged once
        # the rest of the call went through userspace: RTP reached the provider and came back
        wan = site.capture.on(net.wan_if)
        lan = site.capture.on(net.lan_if)
        to_provider = [p for p in wan if p.dst == PROVIDER_IP and p.dport == PROVIDER_RTP]
        to_phone = [p for p in lan if p.dst == PHONE_IP and p.dport == PHONE_RTP]
        assert len(to_provider) >= 40 and len(to_phone) >= 40, (len(to_provider),
                                                                len(to_phone), logs)
        assert table(net.fw) == {"rules": 0, "counters": {}, "left": 0}, logs
    finally:
        site.stop()
    assert table(net.fw) is None
