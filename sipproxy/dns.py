"""RFC 3263 server location: a SIP URI's host, port and transport to an ordered list of targets.

All lookups go through a twisted.names ``IResolver`` and never block the reactor. A lookup that
fails in any way (NXDOMAIN, no records, SERVFAIL, timeout) counts as "no answer" and resolution
falls through to the next step, so one broken record set never hides a working one.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError

from sipproxy.context import Target

if TYPE_CHECKING:
    from sipproxy.uri import URI

__all__ = ["DEFAULT_PORTS", "SipResolver", "Target"]

_log = Logger(namespace="sipproxy.dns")
_T = TypeVar("_T")

#: port used when neither the URI nor an SRV record gives one (RFC 3261 19.1.2)
DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "SCTP": 5060, "TLS": 5061, "TLS-SCTP": 5061}
# RFC 3263 4.1 NAPTR service fields (RFC 3261 26.6 registrations, 4168 for SCTP)
_NAPTR_SERVICES = {
    "SIP+D2U": "UDP",
    "SIP+D2T": "TCP",
    "SIPS+D2T": "TLS",
    "SIP+D2S": "SCTP",
    "SIPS+D2S": "TLS-SCTP",
}
_SRV_PREFIXES = {
    "UDP": "_sip._udp",
    "TCP": "_sip._tcp",
    "TLS": "_sips._tcp",
    "SCTP": "_sip._sctp",
    "TLS-SCTP": "_sips._sctp",
}
_SECURE = frozenset({"TLS", "TLS-SCTP"})
# a sips: URI with transport=tcp (or sctp) means TLS over it (RFC 3261 26.2.2, RFC 3263 4.1)
_SECURE_FORM = {"TCP": "TLS", "SCTP": "TLS-SCTP"}
# the client.Resolver retry ladder, cut to what fits inside our own deadline
_RETRY_LADDER = (1, 3, 11, 45)


@functools.lru_cache(maxsize=256)
def _ip_literal(host: str) -> str | None:
    """The normalized IP literal, or None for a name (cached: the same few hosts, every request)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _dedup(targets: Iterable[Target]) -> list[Target]:
    """Keep the first of equal targets: a later duplicate is no extra failover chance."""
    return list(dict.fromkeys(targets))


def _retry_schedule(deadline: float) -> tuple[int, ...]:
    steps: list[int] = []
    for step in _RETRY_LADDER:
        if sum(steps) + step > deadline:
            break
        steps.append(step)
    return tuple(steps) or (max(1, int(deadline)),)


async def _gather(coroutines: Iterable[Coroutine[Deferred[Any], Any, _T]]) -> list[_T]:
    """Run coroutines concurrently, results in input order; cancelling cancels them all.

    The first failure is re-raised as itself (not ``FirstError``), so a cancellation stays a
    ``CancelledError`` on its way out.
    """
    ds = [Deferred.fromCoroutine(c) for c in coroutines]
    if not ds:
        return []
    try:
        return await gatherResults(ds, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
        raise  # unreachable: raiseException always raises


class SipResolver:
    """Locate SIP servers per RFC 3263 section 4 (client side).

    ``supported`` lists the transports this proxy can send on, in the order it prefers them when
    DNS leaves the choice open (plain SRV fallback, A/AAAA-only domains).
    """

    def __init__(
        self,
        resolver: IResolver | None = None,
        reactor: IReactorTime | None = None,
        supported: tuple[str, ...] = ("UDP", "TCP", "TLS"),
        *,
        timeout: float = 5.0,
        rng: random.Random | None = None,
        address_types: tuple[str, ...] = ("A", "AAAA"),
    ) -> None:
        """
        :param resolver: the DNS client; default: /etc/hosts then the nameservers of
            /etc/resolv.conf, driven by ``reactor`` (which must then be a full reactor).
        :param reactor: clock for per-lookup deadlines; default: the global reactor.
        :param timeout: seconds one DNS lookup may take before it counts as "no answer".
        :param rng: random source for SRV weight selection (RFC 2782); inject one in tests.
        :param address_types: which address records to use for a name, in the order tried:
            ``("A",)`` for a proxy with no IPv6 connectivity, ``("AAAA", "A")`` to prefer IPv6.
        """
        self._resolver = resolver
        self._reactor = reactor
        self.supported = tuple(t.upper() for t in supported)
        self.timeout = timeout
        #: lookups that gave no answer (NXDOMAIN, SERVFAIL, timeout...) by record type
        self.failures: Counter[str] = Counter()
        self._retries = _retry_schedule(timeout)
        self._rng = rng if rng is not None else random.Random()
        unknown = [t for t in address_types if t.upper() not in ("A", "AAAA")]
        if unknown:
            raise ValueError(f"address_types: unknown record type(s) {unknown}")
        self.address_types = tuple(t.upper() for t in address_types)

    # -- public API ------------------------------------------------------------------------------
    def resolve(
        self, host: str, port: int | None, transport: str | None, secure: bool,
        server_name: str | None = None,
    ) -> Deferred[list[Target]]:
        """The targets for ``host``, in failover order; ``[]`` when there is none.

        ``transport`` is the URI's transport parameter (any case), ``secure`` True for sips:.
        ``server_name`` is the name a TLS server must prove (default ``host``): the URI's host
        when ``host`` is its maddr (RFC 5922 section 4).
        Fires with ``[]`` (never fails) for names that do not resolve and for transports this
        resolver does not support (sips: with transport=udp, an unsupported transport=...).
        """
        plan = self._plan(host, port, transport, secure, server_name)
        if isinstance(plan, list):
            return succeed(plan)
        return Deferred.fromCoroutine(self._locate(*plan))

    def resolve_now(
        self, host: str, port: int | None, transport: str | None, secure: bool,
        server_name: str | None = None,
    ) -> list[Target] | None:
        """What :meth:`resolve` fires with, when that needs no DNS lookup (an IP literal, a
        transport this resolver cannot use); ``None`` when it does. The proxy routes most
        requests to IP literals: this spares them a Deferred each."""
        plan = self._plan(host, port, transport, secure, server_name)
        return plan if isinstance(plan, list) else None

    def _plan(
        self, host: str, port: int | None, transport: str | None, secure: bool,
        server_name: str | None,
    ) -> list[Target] | tuple[str, int | None, str | None, bool, str]:
        """The targets when no lookup is needed, else the arguments of :meth:`_locate`."""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if server_name is not None and server_name.startswith("[") and server_name.endswith("]"):
            server_name = server_name[1:-1]
        name = (server_name or host).rstrip(".")
        if not name:
            return []
        if transport is not None:
            wanted = self._usable_transport(transport, secure)
            if wanted is None:
                _log.info(
                    "cannot reach {host}: transport {transport} not usable (secure={secure})",
                    host=host, transport=transport, secure=secure,
                )
                return []
        else:
            wanted = None
        ip = _ip_literal(host)
        if ip is not None:  # 4.1: a numeric IP needs no lookup (nor a coroutine: every request)
            chosen = wanted or self._default_transport(secure)
            if chosen is None:
                return []
            return [Target(chosen, ip, port or DEFAULT_PORTS[chosen], name)]
        return host, port, wanted, secure, name

    def uri_target(self, uri: URI) -> Deferred[list[Target]]:
        """``resolve`` for a sip:/sips: URI; its maddr parameter, if any, replaces the host."""
        if not uri.is_sip:
            return fail(ValueError(f"not a SIP URI: {uri}"))
        maddr = uri.get_param("maddr")
        return self.resolve(maddr or uri.host, uri.port, uri.transport, uri.secure,
                            uri.host if maddr else None)

    # -- RFC 3263 section 4 ----------------------------------------------------------------------
    async def _locate(
        self, host: str, port: int | None, wanted: str | None, secure: bool, server_name: str
    ) -> list[Target]:
        """The DNS part of :obj:`resolve`, for a ``host`` that is a name, not an IP literal."""
        if port is not None:  # 4.2: an explicit port means A/AAAA only
            chosen = wanted or self._default_transport(secure)
            if chosen is None:
                return []
            return await self._addresses(host, chosen, port, server_name)

        if wanted is not None:  # 4.2: transport known, SRV for it, else A/AAAA
            found, targets = await self._srv(f"{_SRV_PREFIXES[wanted]}.{host}", wanted, server_name)
            if found:
                return targets
            return await self._addresses(host, wanted, DEFAULT_PORTS[wanted], server_name)

        targets = await self._naptr(host, secure, server_name)
        if targets:
            return targets
        transports = [t for t in self._candidates(secure) if t in _SRV_PREFIXES]
        results = await _gather(
            self._srv(f"{_SRV_PREFIXES[t]}.{host}", t, server_name) for t in transports
        )
        if any(found for found, _ in results):
            # SRV records exist: RFC 2782 forbids falling back to the name's own addresses
            return _dedup(t for _, targets in results for t in targets)
        chosen = self._default_transport(secure)
        if chosen is None:
            return []
        return await self._addresses(host, chosen, DEFAULT_PORTS[chosen], server_name)

    def _usable_transport(self, transport: str, secure: bool) -> str | None:
        t = transport.upper()
        if secure:
            t = _SECURE_FORM.get(t, t)
            if t not in _SECURE:
                return None
        if t not in self.supported or t not in DEFAULT_PORTS:
            return None
        return t

    def _candidates(self, secure: bool) -> list[str]:
        return [t for t in self.supported if t in DEFAULT_PORTS and (not secure or t in _SECURE)]

    def _default_transport(self, secure: bool) -> str | None:
        """UDP for sip:, TLS for sips: (4.1); else the first supported one that qualifies."""
        preferred = "TLS" if secure else "UDP"
        if preferred in self.supported:
            return preferred
        candidates = self._candidates(secure)
        return candidates[0] if candidates else None

    async def _naptr(self, host: str, secure: bool, server_name: str) -> list[Target]:
        records: list[dns.Record_NAPTR] = await self._lookup(
            "lookupNamingAuthorityPointer", host, dns.NAPTR
        )
        chosen: list[tuple[str, str]] = []
        for record in sorted(records, key=lambda r: (r.order, r.preference)):
            if record.flags.string.lower() != b"s":
                continue  # only terminal SRV rewrites; regexp/A-flag NAPTRs are not for SIP
            service = record.service.string.decode("ascii", "replace").upper()
            transport = _NAPTR_SERVICES.get(service)
            if transport is None or transport not in self._candidates(secure):
                continue
            name = record.replacement.name.decode("ascii", "replace").rstrip(".")
            if name:
                chosen.append((name, transport))
        results = await _gather(self._srv(name, t, server_name) for name, t in chosen)
        return _dedup(t for _, targets in results for t in targets)

    async def _srv(self, name: str, transport: str, server_name: str) -> tuple[bool, list[Target]]:
        """(whether SRV records exist, their targets in RFC 2782 order)."""
        records: list[dns.Record_SRV] = await self._lookup("lookupService", name, dns.SRV)
        ordered = [
            r for r in self._order_srv(records) if r.target.name.rstrip(b".")
        ]  # a target of "." means: decidedly no service here
        results = await _gather(
            self._addresses(r.target.name.decode("ascii", "replace"), transport, r.port,
                            server_name)
            for r in ordered
        )
        return bool(records), _dedup(t for targets in results for t in targets)

    def _order_srv(self, records: list[dns.Record_SRV]) -> list[dns.Record_SRV]:
        """RFC 2782: ascending priority; within one, weighted random without replacement."""
        out: list[dns.Record_SRV] = []
        for priority in sorted({r.priority for r in records}):
            group = [r for r in records if r.priority == priority]
            group.sort(key=lambda r: r.weight != 0)  # zero weights first, as RFC 2782 says
            while len(group) > 1:
                pick = self._rng.randint(0, sum(r.weight for r in group))
                running = 0
                index = len(group) - 1
                for i, r in enumerate(group):
                    running += r.weight
                    if running >= pick:
                        index = i
                        break
                out.append(group.pop(index))
            out.extend(group)
        return out

    async def _addresses(
        self, name: str, transport: str, port: int, server_name: str
    ) -> list[Target]:
        name = name.rstrip(".") or name
        ip = _ip_literal(name)
        if ip is not None:
            return [Target(transport, ip, port, server_name)]
        results = await _gather(self._address_lookup(kind, name) for kind in self.address_types)
        return _dedup(
            Target(transport, _address_text(record), port, server_name)
            for records in results
            for record in records
        )

    async def _address_lookup(self, kind: str, name: str) -> list[Any]:
        if kind == "A":
            return await self._lookup("lookupAddress", name, dns.A)
        return await self._lookup("lookupIPV6Address", name, dns.AAAA)

    async def _lookup(self, method: str, name: str, record_type: int) -> list[Any]:
        """The payloads of ``record_type`` in the answer; ``[]`` on any DNS failure."""
        lookup: Callable[..., Deferred[Any]] = getattr(self._get_resolver(), method)
        d = lookup(name, timeout=self._retries)
        d.addTimeout(self.timeout, self._get_reactor())
        try:
            answers, _authority, _additional = await d
        except CancelledError:
            raise  # our caller was cancelled: stop, do not fall through
        except Exception as e:
            self.failures[str(dns.QUERY_TYPES.get(record_type, record_type))] += 1
            _log.debug(
                "{type} lookup for {name} gave no answer: {error!r}",
                type=dns.QUERY_TYPES.get(record_type, record_type), name=name, error=e,
            )
            return []
        # filtering by type skips any CNAME chain the server put in front of the records
        return [rr.payload for rr in answers if rr.type == record_type]

    # -- lazy defaults: constructing a SipResolver reads no files ---------------------------------
    def _get_reactor(self) -> IReactorTime:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        assert self._reactor is not None
        return self._reactor

    def _get_resolver(self) -> IResolver:
        if self._resolver is None:
            self._resolver = _system_resolver(self._get_reactor())
        return self._resolver


def _system_resolver(reactor: IReactorTime) -> IResolver:
    """What ``client.createResolver`` builds on POSIX, but bound to our reactor."""
    from twisted.names import client, hosts, resolve

    return resolve.ResolverChain(
        [
            hosts.Resolver(b"/etc/hosts"),
            client.Resolver(resolv=b"/etc/resolv.conf", reactor=reactor),
        ]
    )


def _address_text(record: dns.Record_A | dns.Record_AAAA) -> str:
    """A or AAAA payload to the text form Target.host carries (both store packed bytes)."""
    packed = record.address
    assert packed is not None
    return str(ipaddress.ip_address(packed))


class _NoDNS(ResolverBase):
    """A resolver that knows no names: ``[dns] servers = []`` (only IP literals route)."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Deferred[Any]:
        return fail(DNSNameError(name))


def make_resolver(
    servers: Iterable[tuple[str, int]] | None, timeout: float, reactor: Any
) -> SipResolver:
    """The SipResolver a config asks for: the system's DNS (``servers`` None), these
    servers, or none at all (an empty list)."""
    if servers is None:
        return SipResolver(reactor=reactor, timeout=timeout)
    servers = list(servers)
    if not servers:
        return SipResolver(_NoDNS(), reactor=reactor, timeout=timeout)
    from twisted.names import client

    return SipResolver(client.Resolver(servers=servers, reactor=reactor), reactor=reactor,
                       timeout=timeout)
