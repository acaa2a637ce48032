"""
The proxy's JSON log and its call records, with real sipp calls through a real proxy.

Topology: sipp UAC -> proxy -> sipp UAS (the proxy's [upstream]) on loopback, with
``[log] format = "json"`` and ``[cdr] file``: answered calls hung up by either side, a busy
callee, calls cancelled while ringing. Every log line must be plain JSON (``jq`` reads it), the
call records one line per call with the right codes, durations and who hung up; after the
record file is moved away, SIGHUP makes the proxy write a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.support.harness import (
    LOOPBACK,
    REPO_ROOT,
    ProxyProcess,
    Sipp,
    free_port,
    options_probe,
)


def wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {limit} s: {what}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def calls(proxy: ProxyProcess, sipp: Sipp, uas: str, uac: str, uas_port: int, count: int,
          *, uac_pause_ms: int = 0, uas_args: tuple[str, ...] = ()) -> None:
    server = sipp.start_uas(uas, uas_port, count=count, timeout=30, extra_args=uas_args)
    client = sipp.run_uac(uac, proxy.address("udp"), rate=10, count=count, timeout=30,
                          call_duration_ms=uac_pause_ms,
                          keys={"ruri": f"sip:service@{LOOPBACK}:{uas_port}"})
    done = server.wait(15)
    assert client.ok(count), client.describe()
    assert done.ok(count), done.describe()


def stray_response(proxy: ProxyProcess) -> None:
    """A 200 that matches no transaction: the proxy logs that it dropped it."""
    message = (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP {LOOPBACK}:5999;branch=z9hG4bKstray\r\n"
        "From: <sip:a@example.org>;tag=1\r\nTo: <sip:b@example.org>;tag=2\r\n"
        "Call-ID: stray-call@ops-test\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(message, proxy.address("udp"))


def test_json_log_and_call_records(proxy_factory, sipp: Sipp, tmp_path: Path) -> None:
    uas_port = free_port()
    records = tmp_path / "cdr" / "calls.json"
    records.parent.mkdir()
    proxy = proxy_factory({
        "proxy": {"domains": ["lan.example"]},
        "listen": [{"side": "inside", "transport": "udp", "address": LOOPBACK,
                    "port": free_port()}],
        "upstream": {"uri": f"sip:{LOOPBACK}:{uas_port};transport=udp"},
        "plugins": {"enabled": ["cdr"]},
        "cdr": {"file": str(records)},
        "log": {"format": "json"},
    })
    calls(proxy, sipp, "uas_rr.xml", "uac_rr.xml", uas_port, 3, uac_pause_ms=1000)
    calls(proxy, sipp, "uas_bye.xml", "uac_waitbye.xml", uas_port, 2, uas_args=("-d", "500"))
    calls(proxy, sipp, "uas_busy.xml", "uac_busy.xml", uas_port, 2)
    calls(proxy, sipp, "uas_ringing.xml", "uac_cancel.xml", uas_port, 2)
    wait_until(lambda: len(lines(records)) >= 9, 10, f"9 call records in {records}")
    written = [json.loads(line) for line in lines(records)]
    assert len(written) == 9, written
    outcomes = Counter((r["code"], r["hangup_by"], r["hangup_reason"]) for r in written)
    assert outcomes == {(200, "caller", "BYE"): 3, (200, "callee", "BYE"): 2,
                        (486, "callee", "486 Busy Here"): 2, (487, "caller", "CANCEL"): 2}
    for r in written:
        # every socket here faces the inside: the call never crossed the outside
        assert r["call_id_inside"] and r["call_id_outside"] is None, r
        assert r["to"] == f"sip:service@{LOOPBACK}:{uas_port}" and r["start"] <= r["end"], r
        if r["code"] == 200:
            pause = 1.0 if r["hangup_by"] == "caller" else 0.5
            assert pause - 0.1 <= r["duration"] <= pause + 2.0, r
            assert r["start"] <= r["answer"] <= r["end"], r
        else:
            assert r["answer"] is None and r["duration"] == 0.0, r
    assert len({r["call_id_inside"] for r in written}) == 9

    # logrotate: move the file away, SIGHUP; the next call goes to a new file
    rotated = records.with_name("calls.json.1")
    os.rename(records, rotated)
    proxy.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(records.exists, 10, "the proxy reopened the call records after SIGHUP")
    calls(proxy, sipp, "uas_busy.xml", "uac_busy.xml", uas_port, 1)
    wait_until(lambda: len(lines(records)) == 1, 10, "a call record in the new file")
    assert len(lines(rotated)) == 9
    assert json.loads(lines(records)[0])["code"] == 486

    stray_response(proxy)
    wait_until(lambda: "stray-call@ops-test" in proxy.log_path.read_text(), 10,
               "the dropped response in the log")
    assert proxy.running(), proxy.log_tail()
    proxy.stop()

    text = proxy.log_path.read_text()
    assert "\x1e" not in text
    logged: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "namespace", "text"} <= set(e) for e in logged)
    assert any(e["namespace"] == "sipproxy.service" and "listening" in e["text"] for e in logged)
    [stray] = [e for e in logged if e.get("call_id") == "stray-call@ops-test"]
    assert stray["source"] == LOOPBACK and "matches no transaction" in stray["text"]
    if shutil.which("jq"):
        jq = subprocess.run(["jq", "-c", "select(.call_id) | .call_id", str(proxy.log_path)],
                            capture_output=True, text=True, timeout=30, check=True)
        assert '"stray-call@ops-test"' in jq.stdout.splitlines()


def test_twistd_writes_its_log_as_json_lines(tmp_path: Path) -> None:
    """``twistd -n --logfile FILE sipproxy`` (as the README runs it) with [log] format = "json":
    the file twistd writes is JSON lines from its first line to its last."""
    config = tmp_path / "sipproxy.toml"
    port = free_port()
    config.write_text(f'[[listen]]\naddress = "{LOOPBACK}"\nport = {port}\n'
                      '[dns]\nservers = []\n[log]\nformat = "json"\n')
    log_file = tmp_path / "twistd.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    twistd = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "--logfile",
         str(log_file), "sipproxy", "--config", str(config)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: options_probe(LOOPBACK, port) is not None, 20, "twistd answering")
    finally:
        twistd.send_signal(signal.SIGTERM)
        _, stderr = twistd.communicate(timeout=20)
    assert twistd.returncode in (0, -signal.SIGTERM), stderr  # twistd re-raises the signal
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert logged[0]["text"].startswith("twistd ") and "starting up" in logged[0]["text"]
    assert any(e["namespace"] == "sipproxy.service" for e in logged)
    assert any(e["text"] == "Main loop terminated." for e in logged)  # to the very end
