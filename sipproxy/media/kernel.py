"""The relay's kernel fast path: nftables DNAT/SNAT per latched stream, conntrack forwards.

Once both ends of a stream pair are latched (the relay learned each party's real source from
its packets), :class:`KernelForwarder` installs, in one nftables table the relay owns
(``ip sipproxy_relay_<pid>`` unless configured; no other table is ever touched)::

    A:a -> R_A:PA   dnat to B:b      (prerouting for forwarded packets, output for local ones)
    then            snat to R_B:PB   (postrouting, matched on the conntrack original tuple)

and the same the other way (B:b -> R_B:PB to A:a from R_A:PA), so whichever side sends first
makes the conntrack entry and the other direction is its reply. The kernel then forwards the
stream without the relay's process. Conntrack entries the userspace path made for the relay's
ports are deleted (``conntrack -D``, :meth:`KernelForwarder.flush`) once the rules are in and the
userspace relay stopped forwarding that pair, and again after the rules are removed: NAT rules
are consulted only for new conntrack entries, so without that the kernel would keep delivering
to the userspace sockets (or keep NATing after removal); and an entry of the relay's own
sending (relay port -> B) has the reply tuple the NATed flow needs, so the kernel would drop
the NATed flow's packets as a clash.

Counting: filter chains right after the DNAT (prerouting for forwarded packets, output for the
relay's own host, e.g. 127.0.0.1) count what arrives per direction in a named counter, and one
after the SNAT (postrouting) what leaves, so after any forward filter: packets that arrive and
never leave mean a firewall drops them (the engine then falls back to userspace).
:meth:`counters` reads them all (``nft -j list counters``). nftables counts IP packet bytes:
the engine takes the IP and UDP headers off.

A firewall whose forward chain drops the RTP range has to let the relay's flows through, e.g.
``ct status dnat accept`` before the drop: only flows something NATs pass.

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
    "DEFAULT_POLL_INTERVAL",
    "TABLE_PREFIX",
    "Flow",
    "KernelError",
    "KernelForwarder",
    "NftRunner",
    "Offload",
    "default_table",
    "pid_alive",
    "process_runner",
]

_log = Logger(namespace="sipproxy.media.kernel")

TABLE_PREFIX: Final = "sipproxy_relay_"
DEFAULT_POLL_INTERVAL: Final = 2.0
#: IPv4 + UDP headers: nftables counts them, the userspace relay counts payload only.
HEADER_BYTES: Final = 28
#: rules per offload: per direction DNAT (prerouting, output), SNAT, 3 counting rules
RULES: Final = 12

Address = tuple[str, int]
NftRunner = Callable[[Sequence[str], bytes | None], "defer.Deferred[tuple[bytes, bytes, int]]"]

_HANDLE = re.compile(r'comment "(?P<comment>[^"]+)" # handle (?P<handle>\d+)')
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


class KernelError(Exception):
    """An nft or conntrack command failed; the text says which and why."""


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
class Flow:
    """One direction: packets from ``source`` to the relay's ``local`` port go to ``dest``
    from the relay's ``out`` port."""

    source: Address
    local: Address
    out: Address
    dest: Address


@dataclass(eq=False)
class Offload:
    """The rules of one stream pair (both directions) while installed."""

    id: int
    flows: tuple[Flow, Flow]
    #: (chain, handle) of every rule, once installed
    rules: list[tuple[str, int]] = field(default_factory=list)
    #: per direction: what arrived (after DNAT) and what left (after SNAT, so after any
    #: forward filter): a direction whose packets arrive but do not leave is blocked
    counters: tuple[str, str] = ("", "")
    out_counters: tuple[str, str] = ("", "")
    #: the counters' values when last read, per direction: (packets, bytes)
    seen: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0), (0, 0)])
    seen_out: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def ports(self) -> list[Address]:
        """The relay's own addresses of the pair."""
        return [self.flows[0].local, self.flows[0].out]


def _quote(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class KernelForwarder:
    """The nftables table of one relay and the rules in it (see the module docstring)."""

    def __init__(self, runner: NftRunner, table: str | None = None, *,
                 conntrack: bool = True) -> None:
        table = table or default_table()
        if not _NAME.match(table):
            raise ValueError(f"not an nftables table name: {table!r}")
        self.runner = runner
        self.table = table
        self.conntrack = conntrack
        self.started = False
        self._lock = defer.DeferredLock()
        self._next = 0
        self.offloads: dict[int, Offload] = {}

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

    def _locked(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        return self._lock.run(lambda: defer.Deferred.fromCoroutine(fn()))

    def ruleset(self) -> str:
        t = self.table
        return (
            f"table ip {t} {{}}\n"
            f"delete table ip {t}\n"
            f"table ip {t} {{\n"
            "  chain prerouting { type nat hook prerouting priority dstnat - 10; "
            "policy accept; }\n"
            "  chain output { type nat hook output priority -110; policy accept; }\n"
            "  chain postrouting { type nat hook postrouting priority srcnat - 10; "
            "policy accept; }\n"
            "  chain count_in { type filter hook prerouting priority dstnat + 10; "
            "policy accept; }\n"
            "  chain count_local { type filter hook output priority filter; "
            "policy accept; }\n"
            "  chain count_out { type filter hook postrouting priority srcnat + 10; "
            "policy accept; }\n"
            "}\n"
        )

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> defer.Deferred[Any]:
        """Remove stale tables (ours, or of relays whose process is gone), make the table.
        Fails with KernelError where nftables (or conntrack) does not work."""
        return self._locked(self._start)

    async def _start(self) -> None:
        if self.conntrack:
            await self._run(["conntrack", "--version"])
        listing, _, _ = await self._run(["nft", "list", "tables", "ip"])
        for line in listing.splitlines():
            name = line.split()[-1] if line.startswith("table ip ") else ""
            suffix = name[len(TABLE_PREFIX):]
            if name.startswith(TABLE_PREFIX) and suffix.isdigit() and name != self.table \
                    and not pid_alive(int(suffix)):
                await self._run(["nft", "delete", "table", "ip", name], check=False)
                _log.info("media relay: removed the stale nftables table {name}", name=name)
        await self._run(["nft", "-f", "-"], self.ruleset())
        self.started = True

    def stop(self) -> defer.Deferred[Any]:
        """Delete the table (every rule and counter in it), then the conntrack entries."""
        return self._locked(self._stop)

    async def _stop(self) -> None:
        offloads = list(self.offloads.values())
        self.offloads.clear()
        if not self.started:
            return
        self.started = False
        await self._run(["nft", "delete", "table", "ip", self.table], check=False)
        for offload in offloads:
            await self._flush(offload)

    # -- rules --------------------------------------------------------------------------------

    def rules(self, offload: Offload) -> str:
        """The nft script that installs ``offload`` (comments name each rule)."""
        t = self.table
        lines = []
        for n, flow in enumerate(offload.flows):
            counter = offload.counters[n]
            tag = f"o{offload.id}d{n}"
            (sip, sport), (lip, lport) = flow.source, flow.local
            dip, dport = flow.dest
            match = f"ip saddr {sip} udp sport {sport} ip daddr {lip} udp dport {lport}"
            lines.append(f"add counter ip {t} {counter}")
            for chain in ("prerouting", "output"):
                lines.append(f'add rule ip {t} {chain} {match} dnat to {_quote(flow.dest)} '
                             f'comment "{tag}{chain[0]}"')
            lines.append(
                f"add rule ip {t} postrouting ct status dnat ct protocol udp "
                f"ct original ip saddr {sip} ct original proto-src {sport} "
                f"ct original ip daddr {lip} ct original proto-dst {lport} "
                f'snat to {_quote(flow.out)} comment "{tag}s"')
            counted = (f"ct status dnat ip saddr {sip} udp sport {sport} "
                       f"ip daddr {dip} udp dport {dport}")
            for chain, letter in (("count_in", "i"), ("count_local", "l")):
                lines.append(f'add rule ip {t} {chain} {counted} counter name "{counter}" '
                             f'comment "{tag}{letter}"')
            out = offload.out_counters[n]
            lines.append(f"add counter ip {t} {out}")
            lines.append(f"add rule ip {t} count_out ct status dnat ip saddr {flow.out[0]} "
                         f"udp sport {flow.out[1]} ip daddr {dip} udp dport {dport} "
                         f'counter name "{out}" comment "{tag}x"')
        return "\n".join(lines) + "\n"

    def install(self, a: tuple[Address, Address], b: tuple[Address, Address]) -> defer.Deferred[
            Offload]:
        """Forward in the kernel between ``a`` = (A's source, the relay port A sends to) and
        ``b`` = (B's source, the relay port B sends to). Fires with the :class:`Offload` once
        the rules are in; packets of the existing conntrack entries still reach the userspace
        sockets until :meth:`flush`."""
        self._next += 1
        offload = Offload(
            self._next,
            (Flow(a[0], a[1], b[1], b[0]), Flow(b[0], b[1], a[1], a[0])),
            counters=(f"o{self._next}_ab", f"o{self._next}_ba"),
            out_counters=(f"o{self._next}_ab_out", f"o{self._next}_ba_out"),
        )

        async def install() -> Offload:
            if not self.started:
                raise KernelError("the kernel fast path is not running")
            script = self.rules(offload)
            out, _, _ = await self._run(["nft", "--echo", "--handle", "-f", "-"], script)
            chains = {m.group("comment"): int(m.group("handle")) for m in _HANDLE.finditer(out)}
            names = {"p": "prerouting", "o": "output", "s": "postrouting",
                     "i": "count_in", "l": "count_local", "x": "count_out"}
            offload.rules = [(names[c[-1]], h) for c, h in chains.items()]
            self.offloads[offload.id] = offload
            if len(offload.rules) != RULES:
                await self._remove(offload)
                raise KernelError(f"nft echoed {len(offload.rules)} rule handles, not {RULES}")
            return offload

        return self._locked(install)

    def flush(self, offload: Offload) -> defer.Deferred[None]:
        """Delete the conntrack entries of the offload's relay ports, so that the next packets
        meet the rules. Call it once the userspace relay stopped sending from those ports:
        an entry its next packet made would be in the way again."""
        return self._locked(lambda: self._flush(offload))

    def remove(self, offload: Offload) -> defer.Deferred[dict[str, tuple[int, int]]]:
        """Delete the offload's rules and counters, then its conntrack entries; fires with
        the counters' last values (name -> (packets, bytes))."""
        return self._locked(lambda: self._remove(offload))

    async def _remove(self, offload: Offload) -> dict[str, tuple[int, int]]:
        if self.offloads.pop(offload.id, None) is None or not self.started:
            return {}
        t = self.table
        names = offload.counters + offload.out_counters
        out, _, code = await self._run(["nft", "-j", "list", "counters", "table", "ip", t],
                                       check=False)
        final = {k: v for k, v in parse_counters(out).items() if k in names} if code == 0 \
            else {}
        script = [f"delete rule ip {t} {chain} handle {handle}" for chain, handle in
                  offload.rules]
        script += [f"delete counter ip {t} {name}" for name in
                   offload.counters + offload.out_counters]
        try:
            await self._run(["nft", "-f", "-"], "\n".join(script) + "\n")
        finally:
            await self._flush(offload)
        return final

    async def _flush(self, offload: Offload) -> None:
        """Delete the conntrack entries of the relay's ports of the pair (exit status 1 is
        "none found")."""
        if not self.conntrack:
            return
        for ip, port in offload.ports:
            for which in (["--orig-dst", ip, "--orig-port-dst"],
                          ["--orig-src", ip, "--orig-port-src"]):
                await self._run(["conntrack", "-D", "-p", "udp", *which, str(port)],
                                check=False)

    def counters(self) -> defer.Deferred[dict[str, tuple[int, int]]]:
        """Every named counter of the table: name -> (packets, bytes)."""

        async def read() -> dict[str, tuple[int, int]]:
            if not self.started:
                return {}
            out, _, _ = await self._run(["nft", "-j", "list", "counters", "table", "ip",
                                         self.table])
            return parse_counters(out)

        return self._locked(read)


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
