"""
README promises checked the way a user checks them, with tools a user has at hand.

- ``twistd -n sipproxy`` (no config) in a namespace, probed with ``sipsak`` from the LAN phone's
  namespace: the proxy answers OPTIONS to itself over UDP and TCP, takes a REGISTER from any
  user, answers an interval under ``min_expires`` with 423 and ``Min-Expires: 60``, and has
  nobody at an unregistered user.
- A real scanner (Debian's sipvicious: ``svmap``, ``svwar``) from outside finds nothing: its
  requests are dropped without an answer and the log names it once.
- ``python3 -m sipproxy.plugins.auth hash USER REALM`` (password from stdin) prints a users-file
  line that the proxy's users file takes and whose hashes are the RFC 2617/7616 HA1s.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipproxy.credentials import parse_credentials_file
from tests.integration.support.netns import FW_INSIDE, FW_OUTSIDE, PHONE_IP, NatNet, NoConfigProxy

needs_sipsak = pytest.mark.skipif(shutil.which("sipsak") is None,
                                  reason="sipsak not installed")
needs_sipvicious = pytest.mark.skipif(shutil.which("svmap") is None,
                                      reason="sipvicious not installed")


@pytest.fixture
def no_config(nat_net: NatNet, tmp_path: Path) -> Iterator[tuple[NatNet, NoConfigProxy]]:
    proxy = NoConfigProxy(nat_net.fw, {}, tmp_path / "proxy")
    proxy.start()
    try:
        yield nat_net, proxy
    finally:
        proxy.stop()


def sipsak(net: NatNet, *args: str) -> tuple[int, str]:
    """sipsak from the phone's namespace (its own address in Via and Contact): its exit status
    and all it printed (the messages, on stdout or, for a failure, stderr)."""
    done = net.phone.run("sipsak", "-H", PHONE_IP, "-vvv", *args, check=False, timeout=30)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.netns
@needs_sipsak
def test_sipsak_probes_the_no_config_proxy(no_config: tuple[NatNet, NoConfigProxy]) -> None:
    net, proxy = no_config
    for transport in ("udp", "tcp"):
        status, out = sipsak(net, "-E", transport, "-s", f"sip:{FW_INSIDE}")
        assert status == 0 and "SIP/2.0 200 OK" in out, out

    status, out = sipsak(net, "-U", "-x", "600", "-s", f"sip:dave@{FW_INSIDE}")
    assert status == 0 and "SIP/2.0 200 OK" in out and "expires=600" in out, out

    status, out = sipsak(net, "-U", "-x", "30", "-s", f"sip:erin@{FW_INSIDE}")
    assert status != 0 and "SIP/2.0 423 Interval Too Brief" in out, out
    assert "Min-Expires: 60" in out, out

    status, out = sipsak(net, "-s", f"sip:nobody@{FW_INSIDE}")
    assert status != 0 and "SIP/2.0 404 Not Found" in out, out

    log = proxy.log_text()
    assert "Traceback" not in log and "#warn" not in log, log


@pytest.mark.netns
@needs_sipvicious
def test_a_scanner_finds_nothing(no_config: tuple[NatNet, NoConfigProxy]) -> None:
    net, proxy = no_config
    for scan in (["svmap", FW_OUTSIDE], ["svwar", "-e100-199", FW_OUTSIDE]):
        done = net.provider.run(*scan, check=False, timeout=60)
        assert "found nothing" in done.stdout + done.stderr, done.stdout + done.stderr
    status, out = sipsak(net, "-s", f"sip:{FW_INSIDE}")
    assert status == 0 and "SIP/2.0 200 OK" in out, out
    log = proxy.log_text()
    assert log.count("scanner User-Agent 'friendly-scanner'") == 1, log
    assert "Traceback" not in log, log


def test_auth_hash_command_makes_a_users_file_line() -> None:
    command = [sys.executable, "-m", "sipproxy.plugins.auth", "hash", "carol", "sip.example.com"]
    made = subprocess.run(command, input="s3cret\n", capture_output=True, text=True, timeout=30,
                          check=False)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    line = made.stdout.strip()
    assert "\n" not in line
    secret = b"carol:sip.example.com:s3cret"  # the newline ends the password
    ha1 = {"MD5": hashlib.md5(secret).hexdigest(), "SHA-256": hashlib.sha256(secret).hexdigest()}
    assert parse_credentials_file(line + "\n") == {("carol", "sip.example.com"): ha1}

    unusable = subprocess.run([*command[:-1]], input="x\n", capture_output=True, text=True,
                              timeout=30, check=False)
    assert unusable.returncode == 2 and "usage:" in unusable.stderr
