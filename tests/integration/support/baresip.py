"""
A real softphone for the end-to-end tests: Debian's C{baresip}, headless, in a namespace.

Each L{Baresip} gets a config directory of its own (C{-f DIR}) written here: no sound card (the
audio source is the C{aufile} module playing a WAV tone L{write_tone} makes; the player is
C{aubridge}, which takes the received audio and plays it nowhere), G.711 only, no ICE/STUN, and
the C{ctrl_tcp} module on the namespace's loopback: netstring JSON commands (C{uanew},
C{dial}, C{hangup}; calls are answered at once, C{answermode=auto}) and events
(C{REGISTER_OK}, C{CALL_ESTABLISHED}, C{CALL_CLOSED}...), which L{Baresip.wait_event} waits
for. Every wait is bounded; L{Baresip.stop} ends the process.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import struct
import subprocess
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.support.harness import HarnessError, read_tail
from tests.integration.support.netns import Namespace

__all__ = ["Account", "Baresip", "baresip_unavailable", "write_tone"]

MODULES = Path("/usr/lib/baresip/modules")
CTRL_PORT = 4444
RTP_PORTS = (10000, 10099)
_NEEDED = ("g711", "aufile", "aubridge", "ctrl_tcp", "menu", "account", "srtp")


def baresip_unavailable() -> str | None:
    """Why baresip cannot run here, or None."""
    if shutil.which("baresip") is None:
        return "baresip is not installed (Debian package baresip-core; scripts/test installs it)"
    missing = [m for m in _NEEDED if not (MODULES / f"{m}.so").exists()]
    if missing:
        return f"baresip modules missing in {MODULES}: {', '.join(missing)}"
    return None


def write_tone(path: Path, seconds: float = 10.0, rate: int = 8000,
               frequency: float = 440.0) -> Path:
    """A mono 16-bit WAV with a sine tone: the phone's microphone."""
    frames = int(seconds * rate)
    samples = (int(8000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(frames))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return path


@dataclass(frozen=True)
class Account:
    """A baresip account: the line its C{uanew} command (or C{accounts} file) takes."""

    aor: str  # sip:alice@provider.test
    password: str | None = None
    outbound: str | None = None  # sip:192.168.77.1:5060 (the proxy), or None: the AOR's domain
    media_encryption: str | None = None  # srtp-mand: SRTP (RTP/SAVP, a=crypto)

    def line(self) -> str:
        params = ["answermode=auto", "regint=600", "audio_codecs=PCMU,PCMA", "ptime=20"]
        if self.password is not None:
            params.append(f"auth_pass={self.password}")
        if self.outbound is not None:
            params.append(f'outbound="{self.outbound}"')
        if self.media_encryption is not None:
            params.append(f"mediaenc={self.media_encryption}")
        return f"<{self.aor}>;" + ";".join(params)


class Baresip:
    """One baresip in namespace C{ns}, listening for SIP on C{host}:C{port} (UDP)."""

    def __init__(self, ns: Namespace, workdir: Path, account: Account, *, host: str,
                 port: int = 5060) -> None:
        self.ns = ns
        self.workdir = Path(workdir)
        self.account = account
        self.host = host
        self.port = port
        self.log_path = self.workdir / "baresip.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._token = 0

    def config(self) -> str:
        tone = write_tone(self.workdir / "tone.wav")
        lines = {
            "poll_method": "epoll",
            "sip_listen": f"{self.host}:{self.port}",
            "call_local_timeout": "30",
            "call_max_calls": "4",
            "audio_source": f"aufile,{tone}",
            "audio_player": "aubridge,nowhere",
            "audio_alert": "aubridge,nowhere",
            "ausrc_srate": "8000",
            "ausrc_channels": "1",
            "rtp_ports": f"{RTP_PORTS[0]}-{RTP_PORTS[1]}",
            "rtcp_mux": "no",
            "jitter_buffer_delay": "1-10",
            "module_path": str(MODULES),
            "ctrl_tcp_listen": f"127.0.0.1:{CTRL_PORT}",
        }
        text = [f"{key}\t{value}" for key, value in lines.items()]
        text += [f"module\t{m}.so" for m in ("g711", "aufile", "aubridge", "srtp")]
        text += ["module_tmp\taccount.so", "module_app\tmenu.so", "module_app\tctrl_tcp.so"]
        return "\n".join(text) + "\n"

    def start(self, timeout: float = 10.0) -> Baresip:
        self.workdir.mkdir(parents=True, exist_ok=True)
        confdir = self.workdir / "conf"
        confdir.mkdir(exist_ok=True)
        (confdir / "config").write_text(self.config())
        # the account comes with the "uanew" command, once the control connection is open:
        # otherwise its first REGISTER_OK could come before anyone listens
        (confdir / "accounts").write_text("")
        (confdir / "contacts").write_text("")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*self.ns.prefix(), "baresip", "-f", str(confdir)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self._sock is None:
            if self.process.poll() is not None:
                raise HarnessError(f"baresip exited with {self.process.returncode}\n"
                                   f"{self.log_tail()}")
            try:
                with self.ns.entered():
                    self._sock = socket.create_connection(("127.0.0.1", CTRL_PORT), timeout=1)
            except OSError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"baresip's ctrl_tcp did not open within {timeout} s\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.1)
        response = self.command("uanew", self.account.line())
        if not response.get("ok"):
            raise HarnessError(f"baresip refused the account: {response}\n{self.log_tail()}")
        return self

    # --- ctrl_tcp: netstrings of JSON ----------------------------------------------------------

    def _read(self, timeout: float) -> None:
        assert self._sock is not None
        self._sock.settimeout(max(0.01, timeout))
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise HarnessError(f"baresip closed its control connection\n{self.log_tail()}")
        self._buffer += data
        while b":" in self._buffer:
            length_text, _, rest = self._buffer.partition(b":")
            length = int(length_text)
            if len(rest) < length + 1:
                return
            message = json.loads(rest[:length])
            self._buffer = rest[length + 1:]
            (self.events if message.get("event") else self.responses).append(message)

    def command(self, command: str, params: str = "", timeout: float = 5.0) -> dict[str, Any]:
        """Run a command (e.g. C{dial sip:600@provider.test}) and return baresip's response."""
        assert self._sock is not None
        self._token += 1
        token = str(self._token)
        payload = json.dumps({"command": command, "params": params, "token": token}).encode()
        self._sock.sendall(b"%d:%s," % (len(payload), payload))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for response in self.responses:
                if response.get("token") == token:
                    return response
            self._read(deadline - time.monotonic())
        raise HarnessError(f"baresip did not answer {command!r} within {timeout} s\n"
                           f"{self.log_tail()}")

    def wait_event(self, kind: str, timeout: float = 10.0, *, after: int = 0,
                   fail_on: tuple[str, ...] = ()) -> dict[str, Any]:
        """The first event of type C{kind} (e.g. C{CALL_ESTABLISHED}) from index C{after} on;
        an event of a type in C{fail_on} (e.g. C{REGISTER_FAIL}) before it fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[after:]:
                if event.get("type") == kind:
                    return event
                if event.get("type") in fail_on:
                    raise HarnessError(f"baresip: {event} while waiting for {kind}\n"
                                       f"{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"baresip: no {kind} event within {timeout} s; events: "
                                   f"{[e.get('type') for e in self.events]}\n{self.log_tail()}")
            self._read(min(left, 0.2))

    def stop(self) -> None:
        """SIGTERM (it unregisters and hangs up), SIGKILL after 3 s; then the control socket."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def log_tail(self, lines: int = 40) -> str:
        return f"--- baresip log ({self.log_path}) ---\n{read_tail(self.log_path, lines)}"
