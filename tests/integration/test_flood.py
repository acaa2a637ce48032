"""
Flood protection end to end: a real proxy process on 127.0.0.1, a bounded garbage generator
(tests/integration/support/flooder.py, another process) flooding it from 127.0.0.2, and 100
sipp calls from 127.0.0.1 (exempt) through the proxy to a sipp UAS at the same time: every call
completes, the flooder is banned, and it is answered again once the ban time is over.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.integration.support.harness import LOOPBACK, REPO_ROOT, ProxyProcess, Sipp, free_port

FLOODER = "127.0.0.2"
BAN_TIME = 3.0
FLOOD_RATE = 10_000
FLOOD_SECONDS = 10.0
CALLS = 100


def config(port: int, uas_port: int) -> dict[str, Any]:
    return {
        "proxy": {"domains": ["lan.example"]},
        "listen": [{"side": "inside", "transport": "udp", "address": LOOPBACK, "port": port}],
        "upstream": {"uri": f"sip:{LOOPBACK}:{uas_port};transport=udp"},
        "limits": {
            "exempt": [f"{LOOPBACK}/32"],  # the sipp UAC and UAS; 127.0.0.2 is not exempt
            "messages_per_second": 100,
            "burst": 200,
            "ban_time": BAN_TIME,
            "log_interval": 5,
        },
        "plugins": {"enabled": []},
    }


def options_from(source: str, target: tuple[str, int], timeout: float = 0.5) -> bytes | None:
    """One OPTIONS (Max-Forwards: 0, so the proxy answers it itself) sent from C{source}."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        local = s.getsockname()[1]
        call_id = uuid.uuid4().hex
        s.sendto(
            (
                f"OPTIONS sip:probe@{target[0]} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {source}:{local};branch=z9hG4bK{call_id[:16]};rport\r\n"
                "Max-Forwards: 0\r\n"
                f"From: <sip:probe@{source}>;tag={call_id[:8]}\r\n"
                f"To: <sip:probe@{target[0]}>\r\n"
                f"Call-ID: {call_id}\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode(),
            target,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # skip anything that is not our answer (bounded)
            try:
                data = s.recv(65535)
            except OSError:
                return None
            if call_id.encode() in data:
                return data
    return None


def burst_from(source: str, target: tuple[str, int], count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for i in range(count):
            s.sendto(b"garbage %d" % i, target)


def wait_answered(source: str, target: tuple[str, int], limit: float) -> float | None:
    """Seconds until an OPTIONS from C{source} is answered, or None within C{limit}."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if options_from(source, target, 0.25) is not None:
            return time.monotonic() - start
    return None


def test_flood_is_banned_while_calls_complete(proxy_factory, sipp: Sipp, tmp_path: Path) -> None:
    uas_port = free_port()
    proxy: ProxyProcess = proxy_factory(config(free_port(), uas_port))
    target = proxy.address("udp")
    assert options_from(FLOODER, target) is not None, "the flooder's address is answered first"

    uas = sipp.start_uas("uas_rr.xml", uas_port, count=CALLS, timeout=60)
    report_path = tmp_path / "flood.json"
    cpu_before = proxy.cpu_seconds()
    flooder = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests/integration/support/flooder.py"),
         "--source", FLOODER, "--target", f"{target[0]}:{target[1]}",
         "--rate", str(FLOOD_RATE), "--duration", str(FLOOD_SECONDS),
         "--report", str(report_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # the flood is on (and its source banned) before the calls start
        uac = sipp.run_uac(
            "uac_rr.xml", target, rate=25, count=CALLS,
            keys={"ruri": f"sip:service@{LOOPBACK}:{uas_port}"}, timeout=60,
        )
        _, stderr = flooder.communicate(timeout=FLOOD_SECONDS + 15)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(5)
    server = uas.wait(15)
    cpu = proxy.cpu_seconds() - cpu_before
    assert flooder.returncode == 0, stderr
    flood = json.loads(report_path.read_text())
    assert proxy.running(), f"the proxy died\n{proxy.log_tail()}"
    assert uac.ok(CALLS), uac.describe()
    assert server.ok(CALLS), server.describe()
    # the generator really flooded: at least 80 % of the planned rate, bounded duration
    assert flood["sent"] >= 0.8 * FLOOD_RATE * FLOOD_SECONDS, flood
    assert flood["seconds"] <= FLOOD_SECONDS + 3, flood

    log = proxy.log_path.read_text(errors="replace")
    bans = len(re.findall(rf"banned {re.escape(FLOODER)} for ", log))
    assert bans >= 1, proxy.log_tail()
    assert "Traceback" not in log, proxy.log_tail(200)

    # ban and unban on time: wait out the flood's ban, ban the source again with a burst, and
    # check it gets no answer while banned and an answer once ban_time has passed
    assert wait_answered(FLOODER, target, BAN_TIME + 3) is not None, proxy.log_tail()
    banned_at = time.monotonic()
    burst_from(FLOODER, target, 300)
    time.sleep(0.2)
    assert options_from(FLOODER, target) is None, "answered while banned"
    time.sleep(max(0.0, banned_at + BAN_TIME - 0.8 - time.monotonic()))
    assert options_from(FLOODER, target, 0.3) is None, "answered before ban_time was over"
    unbanned_after = wait_answered(FLOODER, target, 3.0)
    assert unbanned_after is not None, proxy.log_tail()
    unbanned_at = time.monotonic() - banned_at
    assert BAN_TIME - 0.5 <= unbanned_at <= BAN_TIME + 2.0, unbanned_at
    assert options_from(LOOPBACK, target) is not None  # the exempt side never noticed

    log = proxy.log_path.read_text(errors="replace")
    unbans = len(re.findall(rf"unbanned {re.escape(FLOODER)} after", log))
    print(
        f"\nflood: {flood['sent']} datagrams in {flood['seconds']} s ({flood['rate']}/s, "
        f"{flood['errors']} send errors) from {FLOODER}; calls: {uac.successful} completed, "
        f"{uac.failed} failed; bans of {FLOODER}: {bans} during the flood, {unbans} unbans in "
        f"all; proxy CPU during flood+calls: {cpu:.2f} s; controlled ban answered again after "
        f"{unbanned_at:.2f} s (ban_time {BAN_TIME:g} s)"
    )
