"""twistd sipproxy-relay: options, one-line errors, and a real relay process driven over NG."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.python import usage

from sipproxy.media import bencode, tap
from sipproxy.media.ports import RelayInterface
from sipproxy.sdp import parse_sdp

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
LOCAL = "127.0.0.1"


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def options(*args: str) -> tap.Options:
    o = tap.Options()
    o.parseOptions(list(args))
    return o


def test_options_to_config() -> None:
    config = tap.relay_config(options(
        "--listen-ng", "127.0.0.1:2299", "--port-min", "31001", "--port-max", "31100",
        "--interface", "inside/192.168.1.1", "-i", "outside/10.0.0.1!203.0.113.1",
        "--timeout", "30",
    ))
    assert config.listen_ng == ("127.0.0.1", 2299)
    assert (config.port_min, config.port_max, config.timeout) == (31001, 31100, 30.0)
    assert config.interfaces == (
        RelayInterface("inside", "192.168.1.1"),
        RelayInterface("outside", "10.0.0.1", "203.0.113.1"),
    )


def test_defaults() -> None:
    config = tap.relay_config(options())
    assert config.listen_ng == ("127.0.0.1", 2223)
    assert config.interfaces == (RelayInterface("default", "127.0.0.1"),)


BAD_OPTIONS = [
    (["--listen-ng", "nowhere"], '--listen-ng: must be ADDRESS:PORT, got "nowhere"'),
    (["--port-min", "abc"], '--port-min: must be an integer from 1024 to 65534, got "abc"'),
    (["--port-min", "5000", "--port-max", "5003"], None),  # two pairs: one call
    (["--port-min", "5000", "--port-max", "5001"], "--port-max: must be at least 5003"),
    (["--port-min", "5001", "--port-max", "5004"], "--port-max: must be at least 5005"),
    (["--interface", "inside/bogus"], "--interface: not an IP address: 'bogus'"),
    (["-i", "a/127.0.0.1", "-i", "a/127.0.0.2"], '--interface: "a" given twice'),
    (["--timeout", "0"], "--timeout: must be a number from 1 to 86400, got 0"),
    (["--timeout", "1e9"], "--timeout: must be a number from 1 to 86400, got 1000000000.0"),
    (["--kernel", "true"], '--kernel: must be auto, on or off, got "true"'),
    (["--metrics", "9101"], '--metrics: must be ADDRESS:PORT, got "9101"'),
]


@pytest.mark.parametrize(("args", "line"), BAD_OPTIONS)
def test_bad_options_are_one_line(
    args: list[str], line: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    if line is None:
        tap.relay_config(options(*args))
        return
    with pytest.raises(SystemExit) as info:
        tap.makeService(options(*args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"sipproxy-relay: {line}"), err


def test_unknown_option() -> None:
    with pytest.raises(usage.UsageError):
        options("--frobnicate")


def test_twistd_lists_the_relay_plugin(tmp_path: Path) -> None:
    result = subprocess.run([*TWISTD, "--help"], cwd=tmp_path, env=run_env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["sipproxy-relay"] for line in result.stdout.splitlines())


def test_twistd_bad_option_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*TWISTD, "-n", "--pidfile=", "sipproxy-relay", "--port-min", "x"],
                            cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("sipproxy-relay: --port-min: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stdout + result.stderr


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def relay_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The relay's /metrics, parsed with prometheus_client's parser."""
    with urllib.request.urlopen(f"http://{LOCAL}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class NG:
    """A bare NG client on a blocking socket, to test the relay from the outside."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.5)
        self.port = port
        self.n = 0

    def __call__(self, message: dict[str, object], tries: int = 1) -> dict[bytes, object]:
        self.n += 1
        cookie = f"t{self.n}".encode()
        for _ in range(tries):
            self.sock.sendto(cookie + b" " + bencode.encode(message), (LOCAL, self.port))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            got, _, body = data.partition(b" ")
            assert got == cookie
            reply = bencode.decode(body)
            assert isinstance(reply, dict)
            return reply
        raise TimeoutError("no NG reply")

    def close(self) -> None:
        self.sock.close()


SDP_A = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio %d RTP/AVP 0\r\n"
)


@pytest.mark.integration
def test_relay_process_ping_offer_answer_delete(tmp_path: Path) -> None:
    ng_port = free_udp_port()
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        metrics_port = s.getsockname()[1]
    port_min = 43000 + (os.getpid() % 50) * 20
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sipproxy-relay", "--listen-ng", f"{LOCAL}:{ng_port}",
             "--port-min", str(port_min), "--port-max", str(port_min + 19),
             "-i", f"inside/{LOCAL}", "-i", f"outside/{LOCAL}",
             "--metrics", f"{LOCAL}:{metrics_port}"],
            cwd=tmp_path, env=run_env(), stdout=stdout, stderr=stderr,
        )
        ng = NG(ng_port)
        phone_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        phone_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            deadline = time.monotonic() + 30
            pong = None
            while pong is None and proc.poll() is None and time.monotonic() < deadline:
                try:
                    pong = ng({"command": "ping"})
                except (TimeoutError, ConnectionRefusedError):
                    time.sleep(0.1)
            assert pong == {b"result": b"pong"}, f"rc={proc.poll()} {err.read_text()}"

            for phone in (phone_a, phone_b):
                phone.bind((LOCAL, 0))
                phone.settimeout(5)
            a_port, b_port = phone_a.getsockname()[1], phone_b.getsockname()[1]
            offer = ng({"command": "offer", "call-id": "call-1", "from-tag": "A",
                        "sdp": SDP_A % a_port, "direction": ["internal", "external"],
                        "flags": ["trust-address"], "replace": ["origin"]}, tries=3)
            assert offer[b"result"] == b"ok", offer
            to_b_side = parse_sdp(offer[b"sdp"]).media[0].port
            answer = ng({"command": "answer", "call-id": "call-1", "from-tag": "A",
                         "to-tag": "B", "sdp": SDP_A % b_port}, tries=3)
            assert answer[b"result"] == b"ok", answer
            to_a_side = parse_sdp(answer[b"sdp"]).media[0].port
            assert port_min <= min(to_a_side, to_b_side) <= port_min + 19

            phone_a.sendto(b"\x80\x00hello", (LOCAL, to_a_side))
            assert phone_b.recvfrom(100) == (b"\x80\x00hello", (LOCAL, to_b_side))
            phone_b.sendto(b"\x80\x00back", (LOCAL, to_b_side))
            assert phone_a.recvfrom(100) == (b"\x80\x00back", (LOCAL, to_a_side))

            # its own /metrics: the session, and each direction's packet by interface and path
            metrics = relay_metrics(metrics_port)
            assert metrics[("sipproxy_relay_sessions", ())] == 1
            inside = ("sipproxy_relay_packets_total", (("interface", "inside"),
                                                       ("path", "userspace")))
            outside = ("sipproxy_relay_packets_total", (("interface", "outside"),
                                                        ("path", "userspace")))
            assert (metrics[inside], metrics[outside]) == (1, 1)
            # a pair per party; both interfaces are on 127.0.0.1, whose range they share
            used = ("sipproxy_relay_ports_used", (("interface", "inside"),))
            assert metrics[used] == 4
            assert ("process_cpu_seconds_total", ()) in metrics

            listed = ng({"command": "list"})
            assert listed == {b"result": b"ok", b"calls": [b"call-1"]}
            deleted = ng({"command": "delete", "call-id": "call-1", "from-tag": "A"}, tries=3)
            assert deleted[b"result"] == b"ok"
            totals = deleted[b"totals"]
            assert isinstance(totals, dict)
            assert totals[b"RTP"] == {b"packets": 2, b"bytes": 13, b"errors": 0}
            assert ng({"command": "query", "call-id": "call-1"})[b"result"] == b"error"
            after = relay_metrics(metrics_port)  # an ended call's packets stay counted
            assert after[("sipproxy_relay_sessions", ())] == 0
            assert (after[inside], after[outside]) == (1, 1)
            for port in (to_a_side, to_b_side):  # the ports are closed again
                for _ in range(50):
                    try:
                        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                            s.bind((LOCAL, port))
                        break
                    except OSError:
                        time.sleep(0.05)
                else:
                    pytest.fail(f"port {port} still open after delete")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            ng.close()
            phone_a.close()
            phone_b.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    logs = out.read_text() + err.read_text()
    assert rc in (0, -signal.SIGTERM), logs
    assert "Traceback" not in logs
