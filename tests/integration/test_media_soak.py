"""
A bounded soak of the media plugin and its relay's kernel fast path, behind the seed's firewall
(tests/integration/support/netns.py: phone | fw | provider, fw's forward chain dropping UDP
10000-60000, no exception for the relay): 1,000 calls from sipp on the phone through the proxy
on fw (``nat`` + ``media``, the default ``kernel = "auto"``) to sipp on the provider, every
INVITE and 200 with SDP, two callers side by side:

- 900 short silent calls (200 ms, 25 a second): the relay opens and closes ports and sessions,
  no RTP, so no rule;
- 100 calls (every 10th call, 2.5 a second) that play 2 s of G.711 which the provider echoes:
  the relay latches both ends and moves both directions into the kernel (two rules in its own
  ``netdev sipproxy_relay_<pid>`` table), while the other calls come and go. Each such call
  costs five nft/ip runs (~25 ms each, one at a time: install, then the rules and counters out),
  so their rate is bounded to keep the nft queue short.

While the calls run, the relay holds sessions and ports, and its table holds rules whose
counters count most of the echoed RTP; the echo comes back all but 1 %; fw's own ruleset
never changes. Afterwards: no session (NG ``list`` on ``[media] listen_ng``), no relay port
open in fw (/proc/net/udp), no rule or counter in the relay's table; once the proxy stops its
table is gone and fw's ruleset is byte for byte what it was.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support.harness import wait_for
from tests.integration.support.netns import FW_INSIDE, LAN, PHONE_IP, SEED_RTP_PORTS, NatNet
from tests.integration.support.relays import (
    NG_PORT,
    PHONE_RTP,
    PROVIDER_RTP,
    RELAY_PORTS,
    TABLE_PREFIX,
    firewall_tables,
    media_config,
    ng,
    open_relay_ports,
    relay_table,
)
from tests.integration.support.rtp import callee_scenario, caller_scenario, is_rtp, write_rtp_pcap
from tests.integration.support.sites import SIP, start_site

pytestmark = [pytest.mark.netns]

CALLS = 1000
#: every 10th call has RTP both ways
RTP_CALLS = 100
SILENT_CALLS = CALLS - RTP_CALLS
SILENT_RATE = 25.0
SILENT_MS = 200
#: both callers span the same ~36-40 s
RTP_RATE = 2.5
RTP_SECONDS = 2.0
#: the silent caller's SIP port (the one with RTP has 5060)
SILENT_SIP = 5062
LIMIT = 90.0


@pytest.fixture
def soak_net(netns_ready: None) -> Iterator[NatNet]:
    """The standard topology, fw dropping forwarded UDP to 10000-60000 (the seed's)."""
    with NatNet.build(rtp_ports=SEED_RTP_PORTS) as net:
        yield net


class Sampler(threading.Thread):
    """While the calls run, every 0.5 s (bounded by ``limit`` seconds): the relay's calls (NG
    ``list``), its open ports, and from one ``nft -j list ruleset`` its rules, the highest
    value each of its counters reached (a counter per rule and direction, gone with the rule)
    and fw's own tables."""

    def __init__(self, net: NatNet, limit: float) -> None:
        super().__init__(daemon=True)
        self.net = net
        self.deadline = time.monotonic() + limit
        self.stop_event = threading.Event()
        self.most_calls = self.most_ports = self.most_rules = 0
        self.counters: dict[str, int] = {}
        self.firewall: set[str] = set()
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            calls = (ng(self.net.fw, {"command": "list", "limit": CALLS}) or {}).get("calls")
            self.most_calls = max(self.most_calls, len(calls or []))
            self.most_ports = max(self.most_ports, len(open_relay_ports(self.net.fw)))
            self.look_at_ruleset()
            self.samples += 1
            self.stop_event.wait(0.5)

    def look_at_ruleset(self) -> tuple[int, int]:
        """Record what the ruleset holds now; returns the relay's (rules, counters)."""
        items = json.loads(self.net.fw.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
        rules = counters = 0
        own = []
        for item in items:
            kind, body = next(iter(item.items()))
            table = body.get("table", body.get("name", "")) if kind != "metainfo" else ""
            if not str(table).startswith(TABLE_PREFIX):
                own.append(json.dumps(item, sort_keys=True))
            elif kind == "rule":
                rules += 1
            elif kind == "counter":
                counters += 1
                name = body["name"]
                self.counters[name] = max(self.counters.get(name, 0), body["packets"])
        self.most_rules = max(self.most_rules, rules)
        self.firewall.add("\n".join(own))
        return rules, counters

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)


def test_a_thousand_calls_through_the_kernel_path_leave_no_rule_port_or_session(
        soak_net: NatNet, tmp_path: Path) -> None:
    net = soak_net
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    pcap = tmp_path / "counted.pcap"
    per_call = write_rtp_pcap(pcap, RTP_SECONDS)
    caller = caller_scenario(tmp_path / "uac_counted.xml", pcap, RTP_SECONDS)
    config = media_config("builtin")
    # the default kernel = "auto"; the NG port for the test's look at the relay's sessions
    config["media"] = {"port_min": RELAY_PORTS[0], "port_max": RELAY_PORTS[1],
                       "listen_ng": f"127.0.0.1:{NG_PORT}"}
    # one phone placing 27.5 calls a second would be a flood: the LAN is exempt, as the
    # example config shows for an inside network
    config["limits"] = {"exempt": ["127.0.0.0/8", str(LAN)]}
    site = start_site(net, tmp_path, config)
    sampler = Sampler(net, LIMIT)
    started = time.monotonic()
    try:
        wait_for(lambda: relay_table(net.fw) is not None)
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}, site.logs()
        firewall_before = firewall_tables(net.fw)
        sampler.look_at_ruleset()
        sampler.start()
        uas = site.provider.start_uas(callee_scenario(tmp_path / "uas_counted.xml"), SIP,
                                      count=CALLS, timeout=LIMIT,
                                      extra_args=["-rtp_echo", "-mp", str(PROVIDER_RTP)])
        keys = {"ruri": "sip:bob@provider.example"}
        talking = site.phone.start_uac(caller, (FW_INSIDE, SIP), local_port=SIP,
                                       count=RTP_CALLS, rate=RTP_RATE, timeout=LIMIT, keys=keys,
                                       extra_args=["-mp", str(PHONE_RTP)])
        silent = site.phone.start_uac("uac_rr.xml", (FW_INSIDE, SIP), local_port=SILENT_SIP,
                                      count=SILENT_CALLS, rate=SILENT_RATE,
                                      call_duration_ms=SILENT_MS, timeout=LIMIT, keys=keys)
        quiet, loud = silent.wait(), talking.wait()
        server = uas.wait(10)
        calls_took = time.monotonic() - started
        sampler.finish()
        site.capture.settle()
        logs = site.logs()
        assert site.proxy.running(), logs
        assert quiet.ok(SILENT_CALLS), f"{quiet.describe()}\n{logs}"
        assert loud.ok(RTP_CALLS), f"{loud.describe()}\n{logs}"
        assert server.ok(CALLS), f"{server.describe()}\n{logs}"

        # the calls went through the relay: it held sessions and ports while they ran
        figures = (f"{calls_took:.1f} s, {sampler.samples} samples, at most "
                   f"{sampler.most_calls} calls, {sampler.most_ports} ports, "
                   f"{sampler.most_rules} rules, {len(sampler.counters)} kernel counters")
        assert sampler.most_calls >= 5 and sampler.most_ports >= 20, (figures, logs)
        # ... and the kernel carried the echoed calls' RTP: a rule and a counter per direction
        # of (nearly) every one of them, counting most of their packets (a lower bound: the
        # highest values sampled; here ~98 %, the rest went through userspace before the rules
        # were in)
        lan = [p for p in site.capture.on(net.lan_if) if is_rtp(p)]
        from_phone = sum(p.src == PHONE_IP for p in lan)
        to_phone = sum(p.dst == PHONE_IP for p in lan)
        in_kernel = sum(sampler.counters.values())
        counted = sum(n > 0 for n in sampler.counters.values())
        figures += (f"; RTP: the phone sent {from_phone} (of {RTP_CALLS * per_call}), got "
                    f"{to_phone} back, the kernel counted at least {in_kernel} "
                    f"(of {2 * from_phone} relayed) in {counted} counters")
        print(figures)
        assert sampler.most_rules >= 2, (figures, logs)
        assert counted >= 2 * RTP_CALLS * 0.9, (figures, logs)
        assert in_kernel >= 2 * from_phone * 0.75, (figures, logs)
        # every echoed call's audio came back (the capture sees each packet once per way)
        assert from_phone >= RTP_CALLS * per_call * 0.995, (figures, logs)
        assert to_phone >= from_phone * 0.99, (figures, logs)
        assert "kernel fast path: " not in site.proxy.log_text(), logs

        # nothing left: no rule, no counter, no session, no open port (bounded wait for the
        # last BYEs and the nft queue)
        wait_for(lambda: sampler.look_at_ruleset() == (0, 0) and not open_relay_ports(net.fw),
                 15)
        assert sampler.look_at_ruleset() == (0, 0), (figures, logs)
        assert open_relay_ports(net.fw) == [], (figures, logs)
        assert (ng(net.fw, {"command": "list", "limit": CALLS}) or {}).get("calls") == [], logs
        # fw's own tables: the same all along (the first look was before the calls)
        assert len(sampler.firewall) == 1, sampler.firewall
        assert firewall_tables(net.fw) == firewall_before
    finally:
        sampler.finish()
        site.stop()
    # the proxy stopped: the relay's table is gone, fw's ruleset is what it was
    assert relay_table(net.fw) is None
    assert net.fw.run("nft", "list", "ruleset").stdout == nft_before
