"""
A real softphone for the integration tests: Debian's ``linphonec`` (linphone-cli), headless, in a
network namespace, driven through its console as a user types into it.

linphonec reads its commands with readline, so it runs on a pseudo-terminal (with a pipe it never
serves its event loop between commands). It has no sound card here: ``soundcard use files``
makes it play a WAV file to the far end instead of a microphone. Every phone has its own HOME
(liblinphone keeps a database there and gives up on the account without one) and its own
config file written here; every wait is bounded and the output so far is in every failure.
"""

from __future__ import annotations

import codecs
import os
import pty
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from tests.integration.support.harness import HarnessError
from tests.integration.support.netns import Namespace

__all__ = ["HELLO_WAV", "Linphone", "linphone_available"]

#: a short spoken sample shipped with linphone-common, played as the phone's "microphone"
HELLO_WAV = Path("/usr/share/sounds/linphone/hello8000.wav")


def linphone_available() -> bool:
    return shutil.which("linphonec") is not None and HELLO_WAV.exists()


class Linphone:
    """
    One linphonec in namespace C{ns}: SIP on C{transport} (udp or tcp) C{sip_port} of its
    address, RTP on C{rtp_port}.

    C{registrar} is the registrar/domain the user types in (the account's identity is
    C{sip:user@registrar}), C{outbound_proxy} the "outbound proxy" setting, if any, C{password}
    the account's password (the realm is the registrar's domain). C{auto_answer}: incoming
    calls are answered at once (``linphonec -a``).
    """

    def __init__(self, ns: Namespace, workdir: Path, user: str, registrar: str, *,
                 outbound_proxy: str | None = None, password: str | None = None,
                 sip_port: int = 5062, transport: str = "udp",
                 rtp_port: int = 7078, auto_answer: bool = False) -> None:
        self.ns = ns
        self.user = user
        self.workdir = Path(workdir)
        self.home = self.workdir / "home"
        (self.home / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "linphonerc"
        # linphone's "SIP server address" is where REGISTER goes (the identity's domain names
        # the registrar); its "outbound proxy" switch makes that address the route for calls.
        server = outbound_proxy or registrar
        route = (f"reg_route=<sip:{outbound_proxy};transport={transport};lr>\n"
                 if outbound_proxy else "")
        self.config_path.write_text(
            "[sip]\n"
            f"sip_port={sip_port if transport == 'udp' else 0}\n"
            f"sip_tcp_port={sip_port if transport == 'tcp' else 0}\n"
            f"sip_tls_port={sip_port if transport == 'tls' else 0}\n"
            # the test's own CA is not in the phone's trust store
            "verify_server_certs=0\nverify_server_cn=0\n"
            "default_proxy=0\nipv6_enabled=0\n"
            "[rtp]\n"
            f"audio_rtp_port={rtp_port}\nvideo_rtp_port=0\n"
            "[sound]\necho_cancellation=0\n"
            "[video]\ncapture=0\ndisplay=0\nautomatically_initiate=0\n"
            "[proxy_0]\n"
            f"reg_proxy=<sip:{server};transport={transport}>\n{route}"
            f"reg_identity=sip:{user}@{registrar}\n"
            "reg_expires=600\nreg_sendregister=1\npublish=0\n"
            + (f"[auth_info_0]\nusername={user}\npasswd={password}\nrealm={registrar}\n"
               f"domain={registrar}\n" if password else "")
        )
        self.output = ""
        self._seen = 0
        master, slave = pty.openpty()
        argv = [*ns.prefix(), "linphonec", "-c", str(self.config_path), "-d", "0"]
        if auto_answer:
            argv.append("-a")
        env = dict(os.environ, HOME=str(self.home), TERM="dumb")
        try:
            self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                            env=env, close_fds=True, start_new_session=True)
        finally:
            os.close(slave)
        self._master = master
        # read all the time: a full pseudo-terminal would block the phone while it is talking
        self._reader = threading.Thread(target=self._read, name=f"linphone-{user}", daemon=True)
        self._reader.start()
        self.command("soundcard use files")
        self.command(f"play {HELLO_WAV}")

    # -- the console -----------------------------------------------------------------------------

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # the phone exited, or the pty was closed: the end
                return
            if not data:
                return
            self.output += decoder.decode(data)

    def command(self, line: str) -> None:
        """Type one line into the console."""
        os.write(self._master, line.encode() + b"\n")

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait (bounded) for C{pattern} in what the phone printed since the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.output, self._seen)
            if found:
                self._seen = found.end()
                return found
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise HarnessError(
                    f"{self.user}: no {pattern!r} within {timeout} s; its console:\n"
                    + self.output[-3000:])
            time.sleep(0.05)

    def wait_registered(self, timeout: float = 15.0) -> None:
        """Poll ``status register`` until the account is registered (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            self.command("status register")
            try:
                self.expect(r"registered, identity=|registered=-?\d", 2.0)
            except HarnessError:
                pass
            if re.search(r"registered, identity=", self.output[-2000:]):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.user} did not register:\n{self.output[-3000:]}")
            time.sleep(0.5)

    def call(self, uri: str) -> None:
        self.command(f"call {uri}")

    def hang_up(self) -> None:
        self.command("terminate")

    def drain(self, seconds: float = 0.5) -> None:
        """Let the call go on for C{seconds} (what the phone prints is read meanwhile)."""
        time.sleep(seconds)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.command("quit")
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.process.pid, 9)
                self.process.wait(5)
        self._reader.join(2)
        os.close(self._master)
