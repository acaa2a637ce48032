"""
Exhaustion and guessing probes against a running proxy, from outside sources (issue 11, part B).

Network namespaces (tests/integration/support/netns.py), so the flood guard's loopback exemption
does not apply: the proxy (``px``) has one veth toward each of

- ``phone`` 192.0.2.10: the legitimate phone, sipp registering alice and bob (digest) and
  alice calling bob, all through the proxy while each probe runs;
- ``attacker`` 198.51.100.66-71: several source addresses, hand-made SIP over UDP and TCP;
- ``victim`` 203.0.113.99: where an attacker would like the proxy to send traffic; a socket
  there counts what arrives (or, for the dialog probe, answers INVITEs).

The probes, scaled down through the config keys: wrong digest answers until the source is
banned (``[auth] max_failures``); a TCP table full of idle connections pinging CRLF, then a
phone's OPTIONS over a new connection (``[limits] max_connections``, ``idle_timeout``); 400
Contacts for one user and one INVITE to it (``[registrar] max_contacts``, ``[proxy]
max_branches``); transactions, dialogs and NAT mappings from many sources (``[limits]
max_transactions``, ``max_dialogs``, ``[nat] max_mappings``); a valid account whose Contact,
Record-Route and many 2xx name the victim, and its accomplice's in-dialog requests over UDP and
TCP (nat reaches a binding where it registered from, acl an outside party only on its own
host, one INVITE sets up at most ``max_branches`` dialogs); INVITEs from the victim's (spoofed)
address get one answer each (no 100 Trying, no Timer G for what the proxy answers itself);
Contacts that name the proxy itself (no spiral of forks).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sipproxy.credentials import format_line
from sipproxy.digest import authorization, ha1
from sipproxy.message import Request, Response, parse_message
from sipproxy.testing import sip_request
from tests.integration.support.harness import SippProcess
from tests.integration.support.netns import Capture, Namespace, NsProxyProcess, NsSipp, Topology

pytestmark = [pytest.mark.netns]

SIP = 5060
DOMAIN = "lan.example"
USERS = {"alice": "wonderland", "bob": "builder", "carol": "c4rol", "mallory": "m4llory"}
PROXY_PHONE, PHONE_IP = "192.0.2.1", "192.0.2.10"
PROXY_ATTACKER, ATTACKERS = "198.51.100.1", [f"198.51.100.{66 + i}" for i in range(6)]
PROXY_VICTIM, VICTIM_IP = "203.0.113.1", "203.0.113.99"
INSIDE_EXEMPT = ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]
SIPP_TIMEOUT = 40.0


# ------------------------------------------------------------------------------------------------
# the lab: namespaces, the proxy, the legitimate phone
# ------------------------------------------------------------------------------------------------
@dataclass
class Lab:
    topology: Topology
    px: Namespace
    phone: Namespace
    attacker: Namespace
    victim: Namespace
    workdir: Path
    proxy: NsProxyProcess | None = None

    def start(self, **tables: dict[str, Any]) -> NsProxyProcess:
        """The proxy in ``px``: UDP and TCP on every address, acl and auth (MD5, for sipp);
        ``tables`` are merged into the config's tables of those names."""
        users = self.workdir / "users.txt"
        users.write_text("".join(
            format_line(u, DOMAIN, {a: ha1(a, u, DOMAIN, pw) for a in ("MD5", "SHA-256")})
            + "\n" for u, pw in USERS.items()))
        config: dict[str, Any] = {
            "proxy": {"domains": [DOMAIN]},
            "listen": [
                {"side": "outside", "transport": "udp", "address": "0.0.0.0", "port": SIP},
                {"side": "outside", "transport": "tcp", "address": "0.0.0.0", "port": SIP},
            ],
            "plugins": {"enabled": ["acl", "auth"]},
            "auth": {"users_file": str(users), "algorithms": ["MD5"]},
        }
        for name, values in tables.items():
            config[name] = {**config.get(name, {}), **values}
        self.proxy = NsProxyProcess(self.px, config, self.workdir / "proxy", name="proxy")
        self.proxy.start()
        return self.proxy

    def log(self) -> str:
        return self.proxy.log_text() if self.proxy is not None else ""


@pytest.fixture
def lab(netns_ready: None, tmp_path: Path) -> Iterator[Lab]:
    topology = Topology()
    try:
        px = topology.namespace("px")
        phone = topology.namespace("phone")
        attacker = topology.namespace("attacker")
        victim = topology.namespace("victim")
        topology.veth(px, "ph0", f"{PROXY_PHONE}/24", phone, "eth0", f"{PHONE_IP}/24")
        topology.veth(px, "at0", f"{PROXY_ATTACKER}/24", attacker, "eth0", f"{ATTACKERS[0]}/24")
        for address in ATTACKERS[1:]:
            attacker.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        topology.veth(px, "vi0", f"{PROXY_VICTIM}/24", victim, "eth0", f"{VICTIM_IP}/24")
        site = Lab(topology, px, phone, attacker, victim, tmp_path)
        try:
            yield site
        finally:
            if site.proxy is not None:
                site.proxy.stop()
    finally:
        topology.close()


class Phone:
    """The legitimate phone: bob's sipp answers calls, alice's sipp registers and calls bob
    again and again (digest for both), all through the proxy's address on the phone's veth."""

    def __init__(self, lab: Lab, calls: int = 4, rate: float = 1.0) -> None:
        self.lab = lab
        self.calls = calls
        self.sipp = NsSipp(lab.phone, lab.workdir / "phone")
        self.callee: SippProcess | None = None
        self.registering: SippProcess | None = None
        self.calling: SippProcess | None = None
        self.rate = rate

    def _register(self, user: str, contact: str, count: int = 1) -> SippProcess:
        return self.sipp.start_uac(
            "register_auth.xml", (PROXY_PHONE, SIP), count=count, rate=self.rate,
            timeout=SIPP_TIMEOUT, keys={"user": user, "domain": DOMAIN, "contact": contact,
                                        "expires": "600"},
            variables={"contact": contact}, extra_args=["-au", user, "-ap", USERS[user]])

    def start(self) -> Phone:
        self.callee = self.sipp.start_uas("uas_rr.xml", 5080, count=self.calls,
                                          timeout=SIPP_TIMEOUT)
        bob = self._register("bob", f"sip:bob@{PHONE_IP}:5080").wait()
        assert bob.ok(1), f"{bob.describe()}\n{self.lab.log()[-3000:]}"
        self.registering = self._register("alice", f"sip:alice@{PHONE_IP}:5090", self.calls)
        self.calling = self.sipp.start_uac(
            "uac_auth.xml", (PROXY_PHONE, SIP), count=self.calls, rate=self.rate,
            timeout=SIPP_TIMEOUT, keys={"ruri": f"sip:bob@{DOMAIN}", "user": "alice",
                                        "domain": DOMAIN},
            extra_args=["-au", "alice", "-ap", USERS["alice"]])
        return self

    def check(self) -> None:
        """Every registration and every call of the phone succeeded."""
        assert self.registering is not None and self.calling is not None
        assert self.callee is not None
        for process in (self.registering, self.calling):
            result = process.wait()
            assert result.ok(self.calls), f"{result.describe()}\n{self.lab.log()[-4000:]}"
        server = self.callee.wait(15)
        assert server.ok(self.calls), f"{server.describe()}\n{self.lab.log()[-4000:]}"


# ------------------------------------------------------------------------------------------------
# hand-made user agents
# ------------------------------------------------------------------------------------------------
def parsed(data: bytes) -> Request | Response | None:
    try:
        message = parse_message(data)
    except Exception:
        return None
    return message if isinstance(message, Request | Response) else None


class Agent:
    """A UDP user agent on one address of a namespace: requests built by hand, bounded waits."""

    def __init__(self, ns: Namespace, host: str, proxy: str = PROXY_ATTACKER,
                 port: int = 0) -> None:
        self.sock = ns.socket()
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.proxy = (proxy, SIP)
        self.cseq = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, uri: str, *, from_: str = "<sip:probe@example.org>;tag=p1",
             to: str | None = None, call_id: str | None = None,
             headers: tuple[str, ...] = ()) -> str:
        """Send one request (a new branch and CSeq); its Call-ID."""
        self.cseq += 1
        call_id = call_id or uuid.uuid4().hex
        via = f"SIP/2.0/UDP {self.host}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport"
        self.sock.sendto(sip_request(method, uri, via=via, from_=from_, to=to or f"<{uri}>",
                                     call_id=call_id, cseq=self.cseq, headers=headers),
                         self.proxy)
        return call_id

    def receive(self, quiet: float = 0.5, limit: float = 5.0) -> list[Request | Response]:
        """Everything that arrives until nothing has for ``quiet`` seconds (at most ``limit``)."""
        out: list[Request | Response] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self.sock.settimeout(quiet)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                break
            message = parsed(data)
            if message is not None:
                out.append(message)
        return out

    def final(self, call_id: str, limit: float = 3.0) -> Response | None:
        """The final response for ``call_id`` (provisionals and others skipped), or None."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                return None
            message = parsed(data)
            if isinstance(message, Response) and message.call_id == call_id and \
                    message.status >= 200:
                return message
        return None

    def ask(self, method: str, uri: str, limit: float = 3.0, **kw: Any) -> Response | None:
        return self.final(self.send(method, uri, **kw), limit)

    def digest(self, user: str, password: str, method: str, uri: str, challenge: Response,
               nc: int = 1) -> str:
        header = "WWW-Authenticate" if challenge.status == 401 else "Proxy-Authenticate"
        value = challenge.headers.get(header)
        assert value is not None, challenge
        return authorization(value, user, password, method, uri, nc=nc)


def register_as(agent: Agent, user: str, contacts: list[str]) -> list[Response | None]:
    """``user`` registers each group of Contacts in its own REGISTER (one challenge, then the
    nonce count goes up); the answers."""
    aor = f"<sip:{user}@{DOMAIN}>"
    challenge = agent.ask("REGISTER", f"sip:{DOMAIN}", from_=f"{aor};tag=r1", to=aor)
    assert challenge is not None and challenge.status == 401, challenge
    answers = []
    for n, contact in enumerate(contacts, start=1):
        value = agent.digest(user, USERS[user], "REGISTER", f"sip:{DOMAIN}", challenge, nc=n)
        answers.append(agent.ask("REGISTER", f"sip:{DOMAIN}", from_=f"{aor};tag=r1", to=aor,
                                 call_id="reg-" + user, headers=(
                                     f"Contact: {contact}", "Expires: 600",
                                     f"Authorization: {value}")))
    return answers


def drain(sock: socket.socket, quiet: float = 0.5, limit: float = 5.0) -> list[bytes]:
    got = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        sock.settimeout(quiet)
        try:
            got.append(sock.recv(65535))
        except TimeoutError:
            break
    return got


# ------------------------------------------------------------------------------------------------
# 4. password guessing
# ------------------------------------------------------------------------------------------------
def test_password_guessing_is_banned_and_the_phone_keeps_working(lab: Lab) -> None:
    """300 wrong digest answers from one source: 10 are answered (401), then the source is
    banned through the flood guard's ban list (no answer over UDP, TCP closed at accept),
    logged once; another source and the phone are not affected."""
    proxy = lab.start(auth={"max_failures": 10, "window": 60})
    phone = Phone(lab).start()
    guesser = Agent(lab.attacker, ATTACKERS[0])
    aor = f"<sip:alice@{DOMAIN}>"
    challenge = guesser.ask("REGISTER", f"sip:{DOMAIN}", from_=f"{aor};tag=g1", to=aor)
    assert challenge is not None and challenge.status == 401
    for i in range(300):
        value = guesser.digest("alice", f"guess{i}", "REGISTER", f"sip:{DOMAIN}", challenge)
        guesser.send("REGISTER", f"sip:{DOMAIN}", from_=f"{aor};tag=g1", to=aor,
                     call_id="guess", headers=(f"Authorization: {value}", "Expires: 600"))
    answers = [m for m in guesser.receive(quiet=1.0, limit=10) if isinstance(m, Response)]
    assert [m.status for m in answers] == [401] * 10, [m.status for m in answers]
    # banned: no answer over UDP any more, and TCP connections closed at accept
    assert guesser.ask("OPTIONS", f"sip:{DOMAIN}", limit=1.5) is None
    with lab.attacker.entered():
        conn = socket.create_connection((PROXY_ATTACKER, SIP), timeout=3,
                                        source_address=(ATTACKERS[0], 0))
    with conn:
        conn.settimeout(3)
        try:
            conn.sendall(sip_request(
                "OPTIONS", f"sip:{DOMAIN}", via=f"SIP/2.0/TCP {ATTACKERS[0]}:9;branch=z9hG4bKt1",
                from_="<sip:probe@example.org>;tag=t", to=f"<sip:{DOMAIN}>", call_id="tcp-1",
                cseq=1))
            assert conn.recv(65535) == b""
        except ConnectionResetError:
            pass
    # another address is not banned
    neighbour = Agent(lab.attacker, ATTACKERS[1])
    answer = neighbour.ask("OPTIONS", f"sip:{DOMAIN}")
    assert answer is not None and answer.status == 200
    phone.check()
    log = lab.log()
    assert log.count(f"banned {ATTACKERS[0]} for") == 1, log[-3000:]
    assert "10 failed digest authentication attempts within 60 s" in log
    assert proxy.running()


# ------------------------------------------------------------------------------------------------
# 5. TCP exhaustion
# ------------------------------------------------------------------------------------------------
class Pinger:
    """TCP connections that send nothing but RFC 5626 CRLF pings; which ones are still open."""

    def __init__(self) -> None:
        self.open: list[socket.socket] = []
        self.closed = 0

    def connect(self, ns: Namespace, source: str, target: tuple[str, int]) -> None:
        with ns.entered():
            s = socket.create_connection(target, timeout=3, source_address=(source, 0))
        s.setblocking(False)
        self.open.append(s)

    def ping(self) -> None:
        for s in list(self.open):
            try:
                s.send(b"\r\n\r\n")
            except OSError:
                self._lost(s)
        time.sleep(0.05)
        self.poll()

    def poll(self) -> None:
        for s in list(self.open):
            try:
                while True:
                    data = s.recv(4096)
                    if not data:
                        self._lost(s)
                        break
            except BlockingIOError:
                continue
            except OSError:
                self._lost(s)

    def _lost(self, s: socket.socket) -> None:
        if s in self.open:
            self.open.remove(s)
            self.closed += 1
            s.close()

    def close(self) -> None:
        for s in self.open:
            s.close()
        self.open.clear()


def tcp_exchange(conn: socket.socket, request: bytes, limit: float = 3.0) -> Response | None:
    conn.settimeout(limit)
    conn.sendall(request)
    data = b""
    deadline = time.monotonic() + limit
    while b"\r\n\r\n" not in data.lstrip(b"\r\n") and time.monotonic() < deadline:
        try:
            chunk = conn.recv(65535)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    message = parsed(data.lstrip(b"\r\n"))
    return message if isinstance(message, Response) else None


def tcp_options(conn: socket.socket, call_id: str) -> bytes:
    host, port = conn.getsockname()[:2]
    return sip_request("OPTIONS", f"sip:{DOMAIN}", via=f"SIP/2.0/TCP {host}:{port};branch="
                       f"z9hG4bK{call_id}", from_="<sip:phone@example.org>;tag=o",
                       to=f"<sip:{DOMAIN}>", call_id=call_id, cseq=1)


def test_a_full_tcp_table_still_answers_a_phone_quickly(lab: Lab) -> None:
    """6 sources x 6 idle connections (CRLF pings only) against max_connections 30: the oldest
    idle ones are closed to make room, a phone's new TCP OPTIONS is answered at once, the
    connection carol registered over survives, and pings alone do not keep the attackers'
    connections beyond idle_timeout."""
    idle_timeout = 4.0
    lab.start(limits={"max_connections": 30, "max_connections_per_source": 6,
                      "idle_timeout": idle_timeout})
    phone = Phone(lab).start()
    # carol registers over a TCP connection she keeps (a binding's flow: protected)
    with lab.phone.entered():
        carol = socket.create_connection((PROXY_PHONE, SIP), timeout=3)
    host, port = carol.getsockname()[:2]
    aor = f"<sip:carol@{DOMAIN}>"

    def register(headers: tuple[str, ...], cseq: int) -> Response | None:
        return tcp_exchange(carol, sip_request(
            "REGISTER", f"sip:{DOMAIN}", via=f"SIP/2.0/TCP {host}:{port};branch=z9hG4bKc{cseq}",
            from_=f"{aor};tag=c", to=aor, call_id="carol-reg", cseq=cseq,
            headers=(f"Contact: <sip:carol@{host}:{port};transport=tcp>", "Expires: 600",
                     *headers)))

    challenge = register((), 1)
    assert challenge is not None and challenge.status == 401
    value = authorization(challenge.headers.get("WWW-Authenticate") or "", "carol",
                          USERS["carol"], "REGISTER", f"sip:{DOMAIN}")
    ok = register((f"Authorization: {value}",), 2)
    assert ok is not None and ok.status == 200, ok

    attackers = Pinger()
    try:
        for source in ATTACKERS:
            for _ in range(6):
                attackers.connect(lab.attacker, source, (PROXY_ATTACKER, SIP))
        time.sleep(0.3)
        attackers.poll()
        # 36 + carol's against 30: at least 7 of the attackers' were closed to make room
        assert attackers.closed >= 7, attackers.closed
        # a phone's new connection: answered at once, not after idle_timeout
        with lab.phone.entered():
            fresh = socket.create_connection((PROXY_PHONE, SIP), timeout=3)
        with fresh:
            started = time.monotonic()
            answer = tcp_exchange(fresh, tcp_options(fresh, "fresh1"), limit=3.0)
            elapsed = time.monotonic() - started
        assert answer is not None and answer.status == 200, lab.log()[-3000:]
        assert elapsed < 1.0, elapsed
        # pings only: the attackers' connections go at idle_timeout; carol's (pinging too) stays
        deadline = time.monotonic() + idle_timeout + 3
        while attackers.open and time.monotonic() < deadline:
            attackers.ping()
            carol.sendall(b"\r\n\r\n")
            time.sleep(0.5)
        assert attackers.open == [], f"{len(attackers.open)} idle connections still open"
        answer = tcp_exchange(carol, tcp_options(carol, "carol2"))
        assert answer is not None and answer.status == 200
    finally:
        attackers.close()
        carol.close()
    phone.check()
    log = lab.log()
    assert "closed an idle connection from 198.51.100." in log, log[-3000:]


# ------------------------------------------------------------------------------------------------
# 6. forking amplification
# ------------------------------------------------------------------------------------------------
def test_contacts_per_user_and_branches_per_request_are_capped(lab: Lab) -> None:
    """mallory (a valid account) registers 400 Contacts at the victim, 10 per REGISTER: the
    first 10 are bound, the other REGISTERs get 403 Too Many Registered Contacts; one INVITE
    from a stranger then forks into max_branches (4) INVITEs at the victim, not 400."""
    lab.start(proxy={"max_branches": 4})
    phone = Phone(lab).start()
    victim = lab.victim.socket()
    victim.bind((VICTIM_IP, SIP))
    try:
        mallory = Agent(lab.attacker, ATTACKERS[0])
        groups = [", ".join(f"<sip:m{10 * n + k}@{VICTIM_IP}:{SIP}>" for k in range(10))
                  for n in range(40)]
        answers = register_as(mallory, "mallory", groups)
        assert all(a is not None for a in answers)
        statuses = [(a.status, a.reason) for a in answers if a is not None]
        assert statuses[0] == (200, "OK")
        assert statuses[1:] == [(403, "Too Many Registered Contacts")] * 39
        assert len(answers[0].contacts) == 10  # type: ignore[union-attr]
        assert drain(victim, quiet=0.2, limit=1) == []  # registering sends the victim nothing
        stranger = Agent(lab.attacker, ATTACKERS[1])
        stranger.send("INVITE", f"sip:mallory@{DOMAIN}", from_="<sip:x@evil.example>;tag=x",
                      headers=(f"Contact: <sip:x@{ATTACKERS[1]}:{stranger.port}>",))
        got = [parsed(d) for d in drain(victim, quiet=1.5, limit=3)]
        invites = [m for m in got if isinstance(m, Request) and m.method == "INVITE"]
        branches = {m.top_via.branch for m in invites if m.top_via is not None}
        targets = {str(m.uri) for m in invites}
        assert len(branches) == 4 and len(targets) == 4, sorted(targets)
        assert targets <= {f"sip:m{n}@{VICTIM_IP}:{SIP}" for n in range(10)}
        assert len(invites) <= 4 * 4  # with retransmissions (T1 0.5 s) within 3 s
    finally:
        victim.close()
    phone.check()
    assert "forking" in lab.log() and "to the 4 with the highest q" in lab.log()


# ------------------------------------------------------------------------------------------------
# 7. tables an outside host can grow
# ------------------------------------------------------------------------------------------------
def test_transactions_in_all_are_capped_and_the_inside_keeps_working(lab: Lab) -> None:
    """4 outside sources x 15 INVITEs that the callee never answers (they stay open) against
    max_transactions 40: no more than 40 reach the callee, the rest get 503 with Retry-After;
    the phone (in [limits] exempt, the inside) registers and calls meanwhile."""
    lab.start(limits={"max_transactions": 40, "max_transactions_per_source": 15,
                      "exempt": INSIDE_EXEMPT})
    blackhole = lab.victim.socket()
    blackhole.bind((VICTIM_IP, SIP))
    try:
        mallory = Agent(lab.attacker, ATTACKERS[0])
        [bound] = register_as(mallory, "mallory", [f"<sip:mallory@{VICTIM_IP}:{SIP}>"])
        assert bound is not None and bound.status == 200
        phone = Phone(lab).start()
        agents = [Agent(lab.attacker, source) for source in ATTACKERS[2:6]]
        for agent in agents:
            for i in range(15):
                agent.send("INVITE", f"sip:mallory@{DOMAIN}", call_id=f"{agent.host}-{i}",
                           from_=f"<sip:x{i}@evil.example>;tag=x{i}")
        refused = []
        for agent in agents:
            refused += [m for m in agent.receive(quiet=0.5, limit=3)
                        if isinstance(m, Response) and m.status == 503]
        reached = {m.call_id for m in map(parsed, drain(blackhole, quiet=0.5, limit=3))
                   if isinstance(m, Request) and m.method == "INVITE"}
        # mallory's two REGISTER transactions (challenge, 200) may still be open as well
        assert 38 <= len(reached) <= 40, len(reached)
        # (a 503 to an INVITE is sent again until ACKed: count the calls)
        assert len({r.call_id for r in refused}) == 60 - len(reached), len(refused)
        assert {r.headers.get("Retry-After") for r in refused} == {"5"}
        phone.check()
    finally:
        blackhole.close()
    assert "transactions open from outside sources in all" in lab.log()


class Responder:
    """A callee that answers every INVITE with 200 (and never hangs up): the dialogs stay.
    ``contact`` and ``headers`` go into its 2xx, one 2xx per tag of ``tags``."""

    def __init__(self, ns: Namespace, host: str, port: int, contact: str | None = None,
                 headers: tuple[tuple[str, str], ...] = (),
                 tags: tuple[str, ...] = ("callee",)) -> None:
        self.sock = ns.socket()
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.contact = contact or f"<sip:callee@{host}:{port}>"
        self.headers = headers
        self.tags = tags
        self.invites: list[Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            message = parsed(data)
            if not isinstance(message, Request) or message.method != "INVITE":
                continue
            if all(m.call_id != message.call_id for m in self.invites):
                self.invites.append(message)
            for tag in self.tags:
                response = message.make_response(200)
                to = response.headers.get("To") or ""
                response.headers.set("To", to + f";tag={tag}" if "tag=" not in to else to)
                for value in message.headers.get_all("Record-Route"):
                    response.headers.add("Record-Route", value)
                for name, value in self.headers:
                    response.headers.add(name, value)
                response.headers.add("Contact", self.contact)
                self.sock.sendto(response.to_bytes(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_dialogs_in_all_and_nat_mappings_are_capped(lab: Lab) -> None:
    """Calls from outside sources that are never hung up, against max_dialogs 5: the sixth
    INVITE gets 503 with Retry-After. Each forwarded call from behind a NAT (a private
    Contact) takes a NAT mapping; with max_mappings 3 the least recently used are forgotten
    (a request to such a token gets 404), the newest still leads to its caller."""
    lab.start(limits={"max_dialogs": 5, "max_dialogs_per_source": 3, "exempt": INSIDE_EXEMPT},
              plugins={"enabled": ["acl", "auth", "nat"]},
              nat={"max_mappings": 3, "keepalive_interval": 0})
    # the callee registers from where it is (else the nat plugin reaches it where its
    # REGISTER came from), then answers there
    callee = Agent(lab.victim, VICTIM_IP, proxy=PROXY_VICTIM, port=5070)
    [bound] = register_as(callee, "mallory", [f"<sip:mallory@{VICTIM_IP}:5070>"])
    callee.close()
    assert bound is not None and bound.status == 200
    responder = Responder(lab.victim, VICTIM_IP, 5070)
    try:
        phone = Phone(lab).start()
        agents = [Agent(lab.attacker, source) for source in ATTACKERS[2:5]]
        finals: list[Response | None] = []
        for i in range(8):
            agent = agents[i // 3]
            call_id = agent.send("INVITE", f"sip:mallory@{DOMAIN}",
                                 from_=f"<sip:x{i}@evil.example>;tag=x{i}",
                                 headers=(f"Contact: <sip:x{i}@10.9.9.{i + 1}:{SIP}>",))
            finals.append(agent.final(call_id))
        statuses = [f.status if f is not None else None for f in finals]
        assert statuses == [200] * 5 + [503] * 3, statuses
        assert {f.headers.get("Retry-After") for f in finals[5:] if f is not None} == {"5"}
        assert len(responder.invites) == 5
        tokens = [invite.contacts[0].uri.user or "" for invite in responder.invites]
        assert all(t.startswith("nat-") for t in tokens), tokens
        # the two least recently used mappings are gone; the newest leads to its caller
        probe = Agent(lab.victim, VICTIM_IP, proxy=PROXY_VICTIM)
        gone = probe.ask("OPTIONS", f"sip:{tokens[0]}@{PROXY_VICTIM}:{SIP}")
        assert gone is not None and gone.status == 404
        probe.send("OPTIONS", f"sip:{tokens[4]}@{PROXY_VICTIM}:{SIP}")
        caller = agents[1]  # call 4 came from the second agent
        relayed = [m for m in caller.receive(quiet=0.5, limit=3)
                   if isinstance(m, Request) and m.method == "OPTIONS"]
        # (sent again while unanswered: one request)
        assert len({m.call_id for m in relayed}) == 1 and relayed[0].uri.host == "10.9.9.5"
        phone.check()
    finally:
        responder.close()
    log = lab.log()
    assert "dialogs open from outside sources in all" in log
    assert "nat: 3 contact mappings (the most): forgot the least recently used" in log


# ------------------------------------------------------------------------------------------------
# an account pointing at the victim (audit of issue 11)
# ------------------------------------------------------------------------------------------------
IN_DIALOG = ("MESSAGE", "INFO", "UPDATE", "NOTIFY", "REFER", "PRACK", "OPTIONS", "INVITE", "BYE")


def test_an_account_and_its_accomplice_cannot_aim_the_proxy_at_a_victim(lab: Lab) -> None:
    """mallory (a valid account) registers from port 5060 with a Contact at the victim's
    5060 and answers calls with 12 2xx (new To tags each), a Contact and a Record-Route at
    the victim; her accomplice calls her from another address and sends every kind of
    in-dialog request (UDP, and one over TCP) along that route set and to that Contact. The
    call reaches mallory where she registered from, only max_branches (4) of the 2xx become
    dialogs, every in-dialog request is refused 403, an ACK to mallory goes where she
    registered from, and nothing reaches the victim; the phone registers and calls
    meanwhile."""
    lab.start(proxy={"max_branches": 4}, plugins={"enabled": ["acl", "auth", "nat"]},
              nat={"keepalive_interval": 1})
    victim = lab.victim.socket()
    victim.bind((VICTIM_IP, SIP))
    at_victim = f"<sip:m@{VICTIM_IP}:{SIP}>"
    registering = Agent(lab.attacker, ATTACKERS[1], port=SIP)
    [bound] = register_as(registering, "mallory", [at_victim])
    registering.close()
    assert bound is not None and bound.status == 200
    mallory = Responder(lab.attacker, ATTACKERS[1], SIP, contact=at_victim,
                        headers=(("Record-Route", f"<sip:{VICTIM_IP};lr>"),),
                        tags=tuple(f"m{n}" for n in range(12)))
    try:
        phone = Phone(lab).start()
        caller = Agent(lab.attacker, ATTACKERS[0])
        from_ = "<sip:x@evil.example>;tag=x1"
        call_id = caller.send("INVITE", f"sip:mallory@{DOMAIN}", from_=from_,
                              headers=(f"Contact: <sip:x@{ATTACKERS[0]}:{caller.port}>",))
        oks = [m for m in caller.receive(quiet=1.0, limit=5)
               if isinstance(m, Response) and m.status == 200 and m.call_id == call_id]
        assert {m.to.tag for m in oks} == {"m0", "m1", "m2", "m3"}, [m.to.tag for m in oks]
        assert [str(m.uri) for m in mallory.invites] == [f"sip:m@{VICTIM_IP}:{SIP}"]
        ok = oks[0]
        route = tuple(f"Route: {v}" for v in reversed(ok.headers.get_all("Record-Route")))
        assert f"Route: <sip:{VICTIM_IP};lr>" in route
        to = f"<sip:mallory@{DOMAIN}>;tag={ok.to.tag}"
        target = f"sip:m@{VICTIM_IP}:{SIP}"
        caller.send("ACK", target, from_=from_, to=to, call_id=call_id, headers=route)
        statuses = {}
        for method in IN_DIALOG:
            answer = caller.ask(method, target, from_=from_, to=to, call_id=call_id,
                                headers=route)
            statuses[method] = answer.status if answer is not None else None
        assert statuses == dict.fromkeys(IN_DIALOG, 403), statuses
        with lab.attacker.entered():
            conn = socket.create_connection((PROXY_ATTACKER, SIP), timeout=3,
                                            source_address=(ATTACKERS[0], 0))
        with conn:
            host, port = conn.getsockname()[:2]
            answer = tcp_exchange(conn, sip_request(
                "MESSAGE", target, via=f"SIP/2.0/TCP {host}:{port};branch=z9hG4bKtcp1",
                from_=from_, to=to, call_id=call_id, cseq=99, headers=route))
            assert answer is not None and answer.status == 403, answer
        # an ACK to mallory outside any dialog (forwarded statelessly): to her source too
        caller.send("ACK", f"sip:mallory@{DOMAIN}", from_=from_, call_id=call_id,
                    to=f"<sip:mallory@{DOMAIN}>;tag=stray")
        time.sleep(1.5)  # a keepalive (1 s) goes to where mallory registered from
        assert drain(victim, quiet=1.0, limit=3) == []
        phone.check()
    finally:
        mallory.close()
        victim.close()
    log = lab.log()
    assert "acl: relaying denied" in log and "one INVITE sets up at most 4 dialogs" in log


def test_a_spoofed_source_gets_one_answer_per_invite_and_no_binding(lab: Lab) -> None:
    """INVITEs with the victim's address as their (spoofed) source, which the proxy answers
    itself (404 unknown user, 407 challenge, 403 relaying denied): the victim gets one
    answer per INVITE, no 100 Trying and no Timer G retransmissions (which made 3 INVITEs of
    693 bytes into 36 datagrams of 11 KB). mallory answers a challenge she got at her own
    address in a REGISTER from the victim's (nat would reach that binding there): a stale
    challenge, to the victim, and no binding, so a call to her sends the victim nothing. The
    phone keeps calling."""
    lab.start(plugins={"enabled": ["acl", "auth", "nat"]}, nat={"keepalive_interval": 1})
    for interface in ("all", "at0"):  # the spoofed packets come in where the victim is not
        lab.px.sysctl(f"net.ipv4.conf.{interface}.rp_filter", 0)
    lab.attacker.run("ip", "addr", "add", f"{VICTIM_IP}/32", "dev", "lo")
    victim = lab.victim.socket()
    victim.bind((VICTIM_IP, SIP))
    spoofer = Agent(lab.attacker, VICTIM_IP, port=SIP)
    try:
        phone = Phone(lab).start()
        probes = [(f"sip:nobody@{DOMAIN}", "<sip:x@evil.example>;tag=s", 404),
                  (f"sip:bob@{DOMAIN}", f"<sip:alice@{DOMAIN}>;tag=s", 407),
                  ("sip:+1900@evil.example", "<sip:x@evil.example>;tag=s", 403)]
        for uri, from_, _ in probes:
            spoofer.send("INVITE", uri, from_=from_)
        mallory = Agent(lab.attacker, ATTACKERS[0])
        aor = f"<sip:mallory@{DOMAIN}>"
        challenge = mallory.ask("REGISTER", f"sip:{DOMAIN}", from_=f"{aor};tag=r", to=aor)
        assert challenge is not None and challenge.status == 401
        value = mallory.digest("mallory", USERS["mallory"], "REGISTER", f"sip:{DOMAIN}",
                               challenge)
        spoofer.send("REGISTER", f"sip:{DOMAIN}", from_=f"{aor};tag=r", to=aor, headers=(
            f"Contact: <sip:m@{VICTIM_IP}:{SIP}>", "Expires: 600", f"Authorization: {value}"))
        got = [parsed(d) for d in drain(victim, quiet=1.0, limit=8)]
        assert sorted(m.status for m in got if isinstance(m, Response)) == \
            sorted([401, *(status for _, _, status in probes)]), \
            [m and m.start_line() for m in got]
        assert len(got) == len(probes) + 1
        call = mallory.ask("INVITE", f"sip:mallory@{DOMAIN}", from_="<sip:x@evil.example>;tag=c")
        assert call is not None and call.status == 404
        time.sleep(3)  # Timer G would have resent each answer at 0.5, 1.5 and 3.5 s
        assert drain(victim, quiet=0.5, limit=1) == []
        phone.check()
    finally:
        spoofer.close()
        victim.close()


def test_contacts_that_name_the_proxy_do_not_spiral(lab: Lab) -> None:
    """The no-config default (no auth: anyone registers; every address of the host is its
    domain): mallory's 10 Contacts name the proxy itself, so one INVITE to her came back and
    forked into the 10 again, each again (RFC 5393's amplification: about 20,000 packets the
    proxy sent itself within 3 s, until it banned its own address). Such bindings are skipped:
    480, nothing sent; a phone registers and calls meanwhile."""
    default_udp = {"side": "inside", "transport": "udp", "address": "0.0.0.0", "port": SIP}
    lab.proxy = NsProxyProcess(lab.px, {"listen": [default_udp]}, lab.workdir / "proxy",
                               name="proxy")
    lab.proxy.start()
    sipp = NsSipp(lab.phone, lab.workdir / "phone")
    callee = sipp.start_uas("uas_rr.xml", 5080, count=1, timeout=SIPP_TIMEOUT)
    bob = sipp.run_uac("register.xml", (PROXY_PHONE, SIP), count=1, timeout=SIPP_TIMEOUT,
                       keys={"user": "bob", "domain": PROXY_PHONE, "expires": "600",
                             "contact": f"sip:bob@{PHONE_IP}:5080"})
    assert bob.ok(1), bob.describe()
    mallory = Agent(lab.attacker, ATTACKERS[0])
    aor = f"<sip:mallory@{PROXY_ATTACKER}>"
    contacts = ", ".join(f"<sip:mallory@{PROXY_ATTACKER};x={k}>" for k in range(10))
    bound = mallory.ask("REGISTER", f"sip:{PROXY_ATTACKER}", from_=f"{aor};tag=r", to=aor,
                        headers=(f"Contact: {contacts}", "Expires: 600"))
    assert bound is not None and bound.status == 200 and len(bound.contacts) == 10
    loop = Capture(lab.px, ["lo"])
    try:
        answer = mallory.ask("INVITE", f"sip:mallory@{PROXY_ATTACKER}",
                             from_="<sip:x@evil.example>;tag=x")
        call = sipp.run_uac("uac_rr.xml", (PROXY_PHONE, SIP), count=1, timeout=SIPP_TIMEOUT,
                            keys={"ruri": f"sip:bob@{PROXY_PHONE}"})
        loop.settle()
    finally:
        sent_to_itself = loop.stop()
    assert answer is not None and answer.status == 480, answer
    assert sent_to_itself == [], len(sent_to_itself)
    assert call.ok(1), call.describe()
    assert callee.wait(15).ok(1)
    assert "it names this proxy" in lab.log()
