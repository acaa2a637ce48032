"""The relay's kernel fast path: stateless rewriting at the netdev ingress hook.

Once both ends of a stream pair are latched (the relay learned each party's real source from
its packets), :class:`KernelForwarder` installs, in one nftables table the relay owns
(``netdev sipproxy_relay_<pid>`` unless configured; no other table is ever touched), one rule
per direction in the ingress chain of the device the packets arrive on::

    A:a -> R_A:PA  (arriving on A's device, no IP options, not a fragment, UDP checksum
                    not 0, no longer than the MTU toward B)
        set ip saddr R_B, ip daddr B, udp sport PB, udp dport b
        counter, fwd ip to NEXT_HOP device B's device

and the same the other way. The devices and next hops are the kernel's own routes to A and B
from the relay's address on that side (``ip route get B from R_B``: the gateway, else the party
itself; ``from`` keeps policy routing, a second uplink say, as for the relay's own socket), and
the MTU toward each is the device's or the route's, whichever is smaller. Both rules go in with
one nft transaction, and out with one: a packet either meets the rule (the kernel forwards it)
or does not (it reaches the relay's socket, which is open all the time, and userspace forwards
it), so no handover (to the kernel, back on a re-INVITE, the call's end) loses a packet, and
packets userspace had queued before the rule came are still forwarded by it. A packet from
another source than the latched one never matches, so userspace treats it as it would without
the kernel (forwarded, or dropped with strict source) and the rules stay.

Why the netdev ingress hook, not DNAT/SNAT or a flowtable:

- Independent of the host's firewall: ``fwd`` transmits on the egress device directly
  (``neigh_xmit``), so relayed packets never traverse prerouting, input, forward, output or
  postrouting: a forward chain that drops the RTP range, or an input chain that drops it, does
  not matter, and nothing in the firewall's tables has to change. (The DNAT design before this
  one needed ``ct status dnat accept`` in the firewall's forward chain and lost the first
  seconds of every call where that was missing.)
- No conntrack and no NAT lookups per packet: ``bench/relay --netns`` on a 2-core VM puts its
  cost per packet on the forwarding core at parity with the host's own IP forwarding with
  conntrack and masquerading (paired medians 1.02x-1.10x in its favour, within that VM's
  noise; bench/README.md), where the DNAT/SNAT design before it reached 0.75x-0.88x. A flowtable
  also skips the chains, but only for flows conntrack accepted through the forward chain first
  (a firewall dropping the RTP range never lets them get there), and needs NAT rules for the
  rewriting: two more things the host's ruleset decides.
- Stateless, so no conntrack entry of the userspace path can clash with it, and nothing has to
  be flushed at a handover.

``fwd`` decrements the IP TTL, as a router does.

Checksums: nft updates the IP checksum and the UDP checksum (incrementally; packets with a
checksum still to be computed, CHECKSUM_PARTIAL, are fixed up correctly too). A UDP checksum of
0 means "none" and an incremental update would make it wrong, so such packets do not match and
stay in userspace; so do IP fragments (only the first carries the ports), packets with IP
options (a router would act on them, source routing say; the relay's socket sends a new packet
without them, as without the kernel path), and packets longer
than the MTU toward their destination: ``fwd`` does not fragment (the egress device would drop
them silently, a WAN with a smaller MTU than the LAN's, PPPoE's 1492, say), the relay's socket
does. (A stream whose packets all do so, or arrive on another device than the route to their
source, has rules that catch nothing: the engine removes them after a counter poll.)

What the netdev hook cannot serve stays in userspace (:class:`Unsuitable`, logged once by the
engine): a party on a local address (the device is ``lo``, or the route is ``local``: phones
on the relay's own host), no route, or a device name nft cannot take. :meth:`start` checks,
without changing anything (``nft --check``), that the kernel and nft know every expression the
rules use; where they do not, the relay stays in userspace.

Cost per call: a packet is matched against the rules ahead of its own in its device's chain,
in order (~10 ns each here: 2,000 rules ahead cut a stream that was bound by the sender from
129,000 to 35,000 packets a second), so a few hundred calls cost little; for thousands, the
rules would want a verdict map on the relay's address and port (O(1)). Every install or
removal is an nft run (~25 ms here with a thousand rules), one at a time.

Counting: each rule counts in a named counter (nftables counts the IP packet: the engine takes
the IP and UDP headers off); :meth:`counters` reads them all (``nft -j list counters``).

Every command goes through an injected :data:`NftRunner` (argv, stdin) -> Deferred of
(stdout, stderr, exit code); :func:`process_runner` runs the real programs with Twisted's
process API, so the reactor never blocks. Commands run one at a time, in order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet import defer
from twisted.logger import Logger

__all__ = [
    "FAMILY",
    "HEADER_BYTES",
    "PRIORITY",
    "TABLE_PREFIX",
    "Flow",
    "KernelError",
    "KernelForwarder",
    "NftRunner",
    "Offload",
    "Route",
    "Unsuitable",
    "default_table",
    "pid_alive",
    "process_runner",
]

_log = Logger(namespace="sipproxy.media.kernel")

TABLE_PREFIX: Final = "sipproxy_relay_"
FAMILY: Final = "netdev"
#: the ingress chains' priority: before any other netdev ingress chain of the host
PRIORITY: Final = -500
#: IPv4 + UDP headers: nftables counts them, the userspace relay counts payload only.
HEADER_BYTES: Final = 28
#: rules per offload: one per direction
RULES: Final = 2
#: route types the netdev hook cannot forward to (the packet is for this host, or nowhere)
_NOT_FORWARDABLE = frozenset({"local", "broadcast", "multicast", "anycast", "blackhole",
                              "unreachable", "prohibit", "throw", "nat"})

Address = tuple[str, int]
NftRunner = Callable[[Sequence[str], bytes | None], "defer.Deferred[tuple[bytes, bytes, int]]"]

_HANDLE = re.compile(r'comment "(?P<comment>[^"]+)" # handle (?P<handle>\d+)')
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,14}$")


class KernelError(Exception):
    """An nft or ip command failed; the text says which and why."""


class Unsuitable(KernelError):
    """The netdev hook cannot forward this stream (a local party, no route): userspace."""


def default_table() -> str:
    return f"{TABLE_PREFIX}{os.getpid()}"


def process_runner(reactor: Any = None) -> NftRunner:
    """Run the command as a child process (never blocking the reactor)."""
    from twisted.internet.utils import getProcessOutputAndValue

    def run(argv: Sequence[str], stdin: bytes | None) -> defer.Deferred[tuple[bytes, bytes, int]]:
        executable = shutil.which(argv[0]) or argv[0]
        d: defer.Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            executable, list(argv[1:]), env=dict(os.environ), reactor=reactor,
            stdinBytes=stdin,
        )
        return d

    return run


@dataclass(frozen=True, slots=True)
class Route:
    """The kernel's route to a party: its device, and the next hop on it."""

    device: str
    next_hop: str
    #: the largest IP packet the device (or the route) takes
    mtu: int


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction: packets from ``source`` (arriving on ``device``) to the relay's ``local``
    port leave from the relay's ``out`` port to ``dest``, through ``route``."""

    source: Address
    local: Address
    out: Address
    dest: Address
    device: str
    route: Route


@dataclass(eq=False)
class Offload:
    """The rules of one stream pair (both directions) while installed."""

    id: int
    flows: tuple[Flow, Flow]
    #: (chain, handle) of every rule, once installed
    rules: list[tuple[str, int]] = field(default_factory=list)
    #: the named counter of each direction's rule
    counters: tuple[str, str] = ("", "")
    #: the counters' values when last read, per direction: (packets, bytes)
    seen: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0), (0, 0)])


def chain_name(device: str) -> str:
    return f"in_{device}"


class KernelForwarder:
    """The nftables table of one relay and the rules in it (see the module docstring); the
    engine uses it as a :class:`~sipproxy.media.offload.KernelOffloader` of :class:`Offload`."""

    def __init__(self, runner: NftRunner, table: str | None = None) -> None:
        table = table or default_table()
        if not _NAME.match(table):
            raise ValueError(f"not an nftables table name: {table!r}")
        self.runner = runner
        self.table = table
        self.started = False
        #: stop() was called: what is still queued skips its work (deleting the table takes
        #: every rule and counter with it, at once, however many calls are up)
        self.stopping = False
        self._lock = defer.DeferredLock()
        self._next = 0
        self.offloads: dict[int, Offload] = {}
        #: called with the offloads whose rules went with a deleted table (see _remake), once
        #: it is made again: the engine installs their streams anew
        self.lost: Callable[[list[Offload]], None] | None = None

    # -- commands -----------------------------------------------------------------------------

    async def _run(self, argv: Sequence[str], stdin: str | None = None, *,
                   check: bool = True) -> tuple[str, str, int]:
        try:
            out, err, code = await self.runner(argv, stdin.encode() if stdin is not None
                                               else None)
        except Exception as e:
            raise KernelError(f"{argv[0]}: {e}") from e
        text, errors = out.decode(errors="replace"), err.decode(errors="replace")
        if check and code != 0:
            lines = [ln for ln in errors.splitlines() if ln.startswith("Error")] or \
                errors.strip().splitlines()[:1]
            raise KernelError(f"{' '.join(argv[:3])}: exit {code}: {' '.join(lines)}")
        return text, errors, code

    def _locked(self, fn: Callable[[], Any], *, first: bool = False) -> defer.Deferred[Any]:
        """Run ``fn`` when the commands before it are done; ``first``: before every command
        still waiting, too."""
        lock = self._lock
        acquired = lock.acquire()
        if first and lock.waiting and lock.waiting[-1] is acquired:
            lock.waiting.insert(0, lock.waiting.pop())

        def release(result: Any) -> Any:
            lock.release()
            return result

        def execute(_: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred.fromCoroutine(fn())
            d.addBoth(release)
            return d

        return acquired.addCallback(execute)

    def ruleset(self) -> str:
        """The empty table (replacing a stale one of the same name, atomically)."""
        t = f"{FAMILY} {self.table}"
        return f"table {t} {{}}\ndelete table {t}\ntable {t} {{}}\n"

    def probe(self) -> str:
        """A chain and a rule with every expression the fast path uses, for ``nft --check``
        (the kernel validates them; nothing is applied)."""
        t = f"{FAMILY} {self.table}"
        flow = Flow(("127.0.0.2", 9), ("127.0.0.3", 9), ("127.0.0.3", 11), ("127.0.0.2", 11),
                    "lo", Route("lo", "127.0.0.2", 1500))
        return (f"{self._chain(flow.device)}\nadd counter {t} probe\n"
                f"{self._rule(flow, 'probe', 'probe')}\n")

    def _chain(self, device: str) -> str:
        return (f"add chain {FAMILY} {self.table} {chain_name(device)} {{ type filter hook "
                f'ingress device "{device}" priority {PRIORITY}; policy accept; }}')

    def _rule(self, flow: Flow, counter: str, comment: str) -> str:
        (sip, sport), (lip, lport) = flow.source, flow.local
        (oip, oport), (dip, dport) = flow.out, flow.dest
        return (f"add rule {FAMILY} {self.table} {chain_name(flow.device)} "
                f"ip saddr {sip} udp sport {sport} ip daddr {lip} udp dport {lport} "
                f"ip hdrlength 5 ip frag-off & 0x3fff == 0 udp checksum != 0 "
                f"ip length <= {flow.route.mtu} "
                f"ip saddr set {oip} ip daddr set {dip} udp sport set {oport} "
                f'udp dport set {dport} counter name "{counter}" '
                f'fwd ip to {flow.route.next_hop} device "{flow.route.device}" '
                f'comment "{comment}"')

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> defer.Deferred[Any]:
        """Remove stale tables (of relays whose process is gone), check that the kernel and
        nft can do what the rules need, make the table. Fails with KernelError where they
        cannot."""
        return self._locked(self._start)

    async def _start(self) -> None:
        await self._run(["ip", "-V"])
        # (ip: the tables of the DNAT/SNAT fast path of earlier versions)
        listing, _, _ = await self._run(["nft", "list", "tables"])
        for line in listing.splitlines():
            words = line.split()
            if len(words) != 3 or words[0] != "table" or words[1] not in (FAMILY, "ip"):
                continue
            family, name = words[1], words[2]
            suffix = name[len(TABLE_PREFIX):]
            if name.startswith(TABLE_PREFIX) and suffix.isdigit() and name != self.table \
                    and not pid_alive(int(suffix)):
                await self._run(["nft", "delete", "table", family, name], check=False)
                _log.info("media relay: removed the stale nftables table {family} {name}",
                          family=family, name=name)
        self.stopping = False
        await self._run(["nft", "-f", "-"], self.ruleset())
        try:
            await self._run(["nft", "--check", "-f", "-"], self.probe())
        except KernelError as e:
            await self._run(["nft", "delete", "table", FAMILY, self.table], check=False)
            raise KernelError(f"the kernel or nft cannot rewrite and forward at the netdev "
                              f"ingress hook: {e}") from e
        self.started = True

    def stop(self) -> defer.Deferred[Any]:
        """Delete the table (every chain, rule and counter in it); installs and removals
        queued before it are skipped."""
        self.stopping = True
        return self._locked(self._stop)

    async def _stop(self) -> None:
        self.offloads.clear()
        if not self.started:
            return
        self.started = False
        await self._run(["nft", "delete", "table", FAMILY, self.table], check=False)

    # -- rules --------------------------------------------------------------------------------

    async def routes(self, *pairs: tuple[str, str]) -> list[Route]:
        """The kernel's routes to each (address, from the relay's address) and the devices'
        MTUs (one ``ip -batch``); Unsuitable where the hook cannot forward to one of them."""
        addresses = [address for address, _ in pairs]
        script = "".join(f"route get {address} from {source}\n" for address, source in pairs)
        script += "link show\n"
        out, _, _ = await self._run(["ip", "-j", "-batch", "-"], script, check=False)
        answers = out.splitlines()
        try:
            links = {str(link["ifname"]): int(link["mtu"])
                     for link in json.loads(answers[len(addresses)])}
        except (ValueError, IndexError, KeyError, TypeError):
            links = {}
        found = []
        for n, address in enumerate(addresses):
            try:
                route = json.loads(answers[n])[0]
            except (ValueError, IndexError, KeyError, TypeError):
                raise Unsuitable(f"no route to {address}") from None
            device, kind = str(route.get("dev", "")), str(route.get("type", "unicast"))
            if kind in _NOT_FORWARDABLE or device == "lo":
                raise Unsuitable(f"{address} is a {kind} address (on {device})")
            if not _DEVICE.match(device):
                raise Unsuitable(f"the device name {device!r} of the route to {address}")
            mtus = [links[device]] if device in links else []
            mtus += [int(m["mtu"]) for m in route.get("metrics", ())
                     if isinstance(m, dict) and "mtu" in m]
            if not mtus:
                raise Unsuitable(f"no MTU for the device {device} of the route to {address}")
            found.append(Route(device, str(route.get("gateway") or address), min(mtus)))
        return found

    def rules(self, offload: Offload) -> str:
        """The nft script that installs ``offload`` (comments name each rule)."""
        t = f"{FAMILY} {self.table}"
        lines = []
        for device in sorted({flow.device for flow in offload.flows}):
            lines.append(self._chain(device))
        for n, flow in enumerate(offload.flows):
            counter = offload.counters[n]
            lines.append(f"add counter {t} {counter}")
            lines.append(self._rule(flow, counter, f"o{offload.id}d{n}"))
        return "\n".join(lines) + "\n"

    def install(self, a: tuple[Address, Address], b: tuple[Address, Address]) -> defer.Deferred[
            Offload]:
        """Forward in the kernel between ``a`` = (A's source, the relay port A sends to) and
        ``b`` = (B's source, the relay port B sends to). Fires with the :class:`Offload` once
        both rules are in (atomically); fails with Unsuitable where the hook cannot serve the
        pair, KernelError where nft failed."""
        self._next += 1
        number = self._next

        async def install() -> Offload:
            if not self.started or self.stopping:
                raise KernelError("the kernel fast path is not running")
            to_a, to_b = await self.routes((a[0][0], a[1][0]), (b[0][0], b[1][0]))
            offload = Offload(
                number,
                (Flow(a[0], a[1], b[1], b[0], to_a.device, to_b),
                 Flow(b[0], b[1], a[1], a[0], to_b.device, to_a)),
                counters=(f"o{number}_ab", f"o{number}_ba"),
            )
            try:
                out, _, _ = await self._run(["nft", "--echo", "--handle", "-f", "-"],
                                            self.rules(offload))
            except KernelError:
                if not await self._remake():
                    raise
                out, _, _ = await self._run(["nft", "--echo", "--handle", "-f", "-"],
                                            self.rules(offload))
            offload.rules = [(chain_name(offload.flows[int(m.group("comment")[-1])].device),
                              int(m.group("handle"))) for m in _HANDLE.finditer(out)]
            self.offloads[offload.id] = offload
            if len(offload.rules) != RULES:
                await self._remove(offload)
                raise KernelError(f"nft echoed {len(offload.rules)} rule handles, not {RULES}")
            return offload

        return self._locked(install)

    def remove(self, offload: Offload, *, first: bool = False) -> defer.Deferred[
            dict[str, tuple[int, int]]]:
        """Delete the offload's rules and counters (atomically); fires with the counters' last
        values (name -> (packets, bytes)). ``first``: ahead of every command still waiting
        (an endpoint moved: each packet the old rule still forwards is lost)."""
        return self._locked(lambda: self._remove(offload), first=first)

    async def _remove(self, offload: Offload) -> dict[str, tuple[int, int]]:
        if self.offloads.pop(offload.id, None) is None or not self.started or self.stopping:
            return {}
        t = f"{FAMILY} {self.table}"
        script = [f"delete rule {t} {chain} handle {handle}" for chain, handle in
                  offload.rules]
        await self._run(["nft", "-f", "-"], "\n".join(script) + "\n")
        # the rules are gone: the counters are final now
        out, _, code = await self._run(["nft", "-j", "list", "counters", "table", FAMILY,
                                        self.table], check=False)
        final = {k: v for k, v in parse_counters(out).items() if k in offload.counters} \
            if code == 0 else {}
        await self._run(["nft", "-f", "-"], "".join(
            f"delete counter {t} {name}\n" for name in offload.counters), check=False)
        return final

    def counters(self) -> defer.Deferred[dict[str, tuple[int, int]]]:
        """Every named counter of the table: name -> (packets, bytes)."""

        async def read() -> dict[str, tuple[int, int]]:
            if not self.started or self.stopping:
                return {}
            out, _, code = await self._run(["nft", "-j", "list", "counters", "table", FAMILY,
                                            self.table], check=False)
            if code != 0 and await self._remake():
                return {}
            if code != 0:
                raise KernelError(f"nft -j list counters: exit {code}")
            return parse_counters(out)

        return self._locked(read)

    async def _remake(self) -> bool:
        """After a command failed: where the table is gone (a firewall reload's ``flush
        ruleset`` takes it), make it again, forget the offloads that were in it (their rules
        went with it: their streams are in userspace until :attr:`lost` has them installed
        again; their handles must never delete a new rule's) and return True."""
        _, _, code = await self._run(["nft", "list", "table", FAMILY, self.table], check=False)
        if code == 0:
            return False
        _log.warn("media relay: the nftables table {family} {table} was deleted (a firewall "
                  "reload that flushes the ruleset?); made again, with the rules of the {n} "
                  "stream pairs that were in it", family=FAMILY, table=self.table,
                  n=len(self.offloads))
        lost = list(self.offloads.values())
        self.offloads.clear()
        await self._run(["nft", "-f", "-"], self.ruleset())
        if self.lost is not None and lost:
            self.lost(lost)  # (their installs queue up behind what runs now)
        return True


def parse_counters(text: str) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        raise KernelError(f"nft -j gave no JSON: {text[:80]!r}") from None
    for item in items:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and "name" in counter:
            found[str(counter["name"])] = (int(counter.get("packets", 0)),
                                           int(counter.get("bytes", 0)))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (the owner of a table, a namespace...)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
