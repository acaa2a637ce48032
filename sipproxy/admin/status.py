"""
The proxy's live state as JSON-able dicts: what ``/api/status`` (and the status page) shows.

Everything is read from the live objects at request time (nothing is counted on the hot path).
Times are seconds (floats unless said), addresses ``host:port`` (IPv6 as ``[addr]:port``).

The contract of the JSON API (``sipproxy.admin.api``), each endpoint a ``GET`` returning
``application/json``::

    GET /api/status -> {
        "now": 1733419200.5,                  # the proxy's clock (Unix time)
        "registrations": [Registration, ...],
        "calls": [Call, ...],
        "bans": [Ban, ...],
        "listeners": [Listener, ...],
        "plugins": [Plugin, ...],
    }
    GET /api/registrations -> {"now": ..., "registrations": [...]}
    GET /api/calls         -> {"now": ..., "calls": [...]}
    GET /api/bans          -> {"now": ..., "bans": [...]}
    GET /api/listeners     -> {"now": ..., "listeners": [...]}
    GET /api/plugins       -> {"now": ..., "plugins": [...]}

    Registration = {
        "aor": "sip:alice@example.com",
        "contact": "sip:alice@203.0.113.5:5060;...",  # the contact as the provider (the
                                                       # upstream) sees it: rewritten by the
                                                       # nat plugin, else as registered
        "source": "192.168.1.20:5060",        # the phone's real address (where the REGISTER
                                              # came from); null if unknown
        "transport": "udp",                   # "udp" | "tcp" | "tls" (lower case)
        "expires_in": 3597,                   # whole seconds left (int, >= 0)
        "user_agent": "Yealink ..." | null,
    }
    Call = {
        "call_id": "a84b4c76e66710",
        "from": "sip:alice@example.com",      # From URI of the INVITE, without the tag
        "to": "sip:bob@example.com",          # To URI of the INVITE, without the tag
        "state": "established",               # "established": a 2xx set up the dialog;
                                              # not answered yet (an initial INVITE the
                                              # proxy is working on): "trying" (no
                                              # provisional answer beyond 100 sent to the
                                              # caller), "ringing" (a 101-199, e.g. 180 or
                                              # 183, was), "answered" (a 2xx arrived, its
                                              # dialog not set up yet: plugins still at it)
        "duration": 12.5,                     # seconds since the dialog was set up; not
                                              # answered yet: since the INVITE arrived
        "media": [Media, ...],                # [] when the proxy relays no media for it
    }                                         # (always [] before "established")
    Media = {                                 # one per direction and media line (RTP only)
        "direction": "caller->callee",        # "caller->callee" | "callee->caller"
        "media": "audio",                     # the m= line's type
        "packets": 1520,                      # relayed so far (userspace + kernel)
        "bytes": 261440,
        "lost": 3,                            # RTP packets lost on the way to the relay (RFC
                                              # 3550: expected by sequence number - received,
                                              # >= 0); null: unknown (the kernel fast path
                                              # forwarded some: it sees no sequence numbers)
        "path": "userspace",                  # "userspace" | "kernel" (nftables fast path)
        "last_packet_age": 0.02,              # seconds since the last packet; null: none yet
    }
    Ban = {
        "source": "198.51.100.7",             # the banned IP
        "reason": "over 20 messages/s (burst 40)",
        "time_left": 287.4,                   # seconds until the ban ends
    }
    Listener = {"transport": "udp", "address": "0.0.0.0", "port": 5060,
                "side": "inside",
                "advertised": "192.168.1.1"}      # named in Via and Record-Route; null: chosen
                                              # per message (a listener on every address
                                              # without ``advertise``: the local address of
                                              # the route toward each peer)
    Plugin = {
        "name": "nat",
        "status": {...} | null,               # the plugin's own section (IStatusProvider)
    }

A plugin that provides :class:`sipproxy.interfaces.IStatusProvider` adds its section under its
``Plugin`` entry; keys the page does not know are shown as a generic table. ``media`` is filled
by the ``media`` plugin with the built-in relay (an NG relay's calls have ``[]``); its
``packets`` count what arrives on the sending party's RTP port (RTCP too when muxed), and a
direction whose ``last_packet_age`` grows is silent. On the kernel path the relay reads the
kernel's counters every 2 s, so there ``last_packet_age`` (and the counts) move in steps of up
to ~2 s while media flows: call a direction silent only after ~3 s or more. ``"now"`` and
the times are the proxy's clock, so a page computes nothing from the browser's clock.

The site (:func:`sipproxy.admin.service.admin_root`) is the status page
(:func:`sipproxy.admin.page.page_resource`: ``/`` and its files) with ``/metrics`` and ``/api``
put on it; with ``[admin] token`` every path, ``/`` included, needs the token (a browser asks
for it: basic auth with the token as the password). The page reads ``api/status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from sipproxy.addressing import WILDCARD_ADDRESSES
from sipproxy.interfaces import IStatusProvider
from sipproxy.uri import format_host

if TYPE_CHECKING:
    from sipproxy.context import RequestContext
    from sipproxy.location import Binding
    from sipproxy.proxy import Proxy

__all__ = ["PARTS", "StatusModel", "plugin_name", "status_providers"]

_log = Logger(namespace="sipproxy.admin")

#: The parts of ``/api/status``, each also served alone at ``/api/<part>``.
PARTS = ("registrations", "calls", "bans", "listeners", "plugins")


def plugin_name(plugin: object) -> str:
    """The name a plugin goes by on the page and in metrics (its ``name``, else its class)."""
    name = getattr(plugin, "name", None)
    return name if isinstance(name, str) else type(plugin).__name__


def status_providers(proxy: Proxy) -> Iterator[tuple[str, Any]]:
    """(name, plugin) of every running plugin that provides :class:`IStatusProvider`."""
    for plugin in proxy.pipeline.plugins:
        if IStatusProvider.providedBy(plugin):
            yield plugin_name(plugin), plugin


def _by_aor(registration: Mapping[str, Any]) -> tuple[str, str]:
    return registration["aor"], registration["contact"]


@dataclass
class _Snapshot:
    """What the plugins said, once per request: their sections and what they add to ours."""

    sections: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    media: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class StatusModel:
    """Builds the JSON of ``/api/...`` (see the module docstring) from the live proxy.

    :param proxy: the proxy core (location, dialogs, flood guard, listeners, plugins).
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def now(self) -> float:
        """The proxy's clock."""
        return float(self.proxy.clock.seconds())

    def status(self, parts: Iterable[str] = PARTS) -> dict[str, Any]:
        """``{"now": ..., part: [...], ...}`` for each of ``parts`` (names in :data:`PARTS`)."""
        snapshot = self._snapshot()
        now = self.now()
        builders = {
            "registrations": lambda: self.registrations(now, snapshot),
            "calls": lambda: self.calls(now, snapshot),
            "bans": lambda: self.bans(now),
            "listeners": self.listeners,
            "plugins": lambda: self.plugins(snapshot),
        }
        result: dict[str, Any] = {"now": now}
        for part in parts:
            result[part] = builders[part]()
        return result

    def _snapshot(self) -> _Snapshot:
        snapshot = _Snapshot()
        for name, plugin in status_providers(self.proxy):
            try:
                section = plugin.status()
                if section is not None:
                    section = dict(section)
                    snapshot.registrations.extend(section.pop("registrations", ()))
                    snapshot.media.update(section.pop("media", {}))
            except Exception:
                _log.failure("plugin {plugin}: status() failed", plugin=name)
                section = None
            snapshot.sections[name] = section
        return snapshot

    # -- the parts -------------------------------------------------------------------------------

    def registrations(self, now: float, snapshot: _Snapshot) -> list[dict[str, Any]]:
        """The registrar's bindings, then what plugins know (the phones registered at the
        provider through the ``nat`` plugin), each sorted by AOR."""
        own = [self._binding(b, now) for b in self.proxy.location.store.all_bindings()
               if b.expires_at > now]
        return sorted(own, key=_by_aor) + sorted(snapshot.registrations, key=_by_aor)

    @staticmethod
    def _binding(binding: Binding, now: float) -> dict[str, Any]:
        source = binding.source
        return {
            "aor": binding.aor,
            "contact": binding.contact,
            "source": f"{format_host(source.host)}:{source.port}" if source is not None else None,
            "transport": source.transport.lower() if source is not None else None,
            "expires_in": max(0, int(binding.remaining(now))),
            "user_agent": binding.user_agent,
        }

    def calls(self, now: float, snapshot: _Snapshot) -> list[dict[str, Any]]:
        """The dialogs the proxy tracks, oldest first, with their media where a plugin relays
        it; then the calls not answered yet, oldest first."""
        dialogs = sorted(self.proxy.dialogs, key=lambda d: d.created)
        return [{
            "call_id": d.call_id,
            "from": d.from_uri,
            "to": d.to_uri,
            "state": "established",
            "duration": round(max(0.0, now - d.created), 3),
            "media": snapshot.media.get(d.call_id, []),
        } for d in dialogs] + [self._attempt(ctx, now) for ctx in self.proxy.calls_in_progress()]

    @staticmethod
    def _attempt(ctx: RequestContext, now: float) -> dict[str, Any]:
        """A call not answered yet (see ``state`` in the module docstring)."""
        request = ctx.request
        tx = ctx.server_transaction
        last = tx.last_response if tx is not None else None
        if any(b.final is not None and 200 <= b.final.status < 300 for b in ctx.branches):
            state = "answered"
        elif last is not None and 100 < last.status < 200:
            state = "ringing"
        else:
            state = "trying"
        return {
            "call_id": request.call_id,
            "from": str(request.from_.uri),
            "to": str(request.to.uri),
            "state": state,
            "duration": round(max(0.0, now - ctx.arrived), 3) if ctx.arrived is not None
            else 0.0,
            "media": [],
        }

    def bans(self, now: float) -> list[dict[str, Any]]:
        """The flood guard's bans, the one ending last first."""
        flood = self.proxy.flood
        if flood is None:
            return []
        bans = [{
            "source": host,
            "reason": ban.reason,
            "time_left": round(max(0.0, ban.unban.getTime() - now), 3),
        } for host, ban in list(flood.banned.items())]
        return sorted(bans, key=lambda b: -b["time_left"])

    def listeners(self) -> list[dict[str, Any]]:
        """The SIP sockets."""
        return [{
            "transport": lst.transport.lower(),
            "address": lst.address,
            "port": lst.port,
            "side": lst.side,
            "advertised": None if lst.via_host in WILDCARD_ADDRESSES else lst.via_host,
        } for lst in self.proxy.listeners]

    def plugins(self, snapshot: _Snapshot) -> list[dict[str, Any]]:
        """Every running plugin, in pipeline order, with its section."""
        return [{"name": (name := plugin_name(p)), "status": snapshot.sections.get(name)}
                for p in self.proxy.pipeline.plugins]
