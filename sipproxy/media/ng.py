"""rtpengine's NG control protocol: the commands, a UDP server, and a client.

On the wire each message is ``COOKIE SP DICT``: the cookie matches a reply to its request (the
reply carries the same cookie), and the dictionary is bencoded (a JSON object is accepted too,
and answered in JSON). Requests carry ``command``; replies carry ``result`` (``ok``, ``error``
with ``error-reason``, ``pong`` for ``ping``) and may carry ``warning``. See rtpengine's
``docs/ng_control_protocol.md``; this module follows it so that any SIP proxy that drives
rtpengine (Kamailio, OpenSIPS, ...) can drive this relay, and so that the client here can drive
a real rtpengine.

- :class:`NGCommands` turns a request dictionary into a reply dictionary, using a
  :class:`~sipproxy.media.engine.RelayEngine`. Commands: ``ping``, ``offer``, ``answer``,
  ``delete``, ``query``, ``list``. Keys are matched as rtpengine does: ``-``, ``_`` and space
  are the same, case does not matter (``received-from`` = ``received from``).
- :class:`NGServerProtocol` is the UDP server, with a reply cache: a retransmitted request
  (same cookie from the same address within ``cache_ttl``) gets the very same reply bytes and
  is not executed again.
- :class:`NGClient` sends commands and returns Deferreds, retransmitting with the same cookie
  until a reply arrives or the tries run out.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from sipproxy.addressing import is_ip_literal
from sipproxy.media import bencode
from sipproxy.media.engine import RelayEngine
from sipproxy.media.errors import RelayError, UnknownCall
from sipproxy.media.offer_answer import SignalOptions
from sipproxy.media.settings import DEFAULT_CACHE_TTL
from sipproxy.sdp import SdpError, parse_sdp

__all__ = [
    "COMMANDS",
    "NGClient",
    "NGCommands",
    "NGError",
    "NGServerProtocol",
    "NGTimeout",
    "decode_message",
    "encode_message",
    "normalize",
    "to_text",
]

_log = Logger(namespace="sipproxy.media.ng")

COMMANDS: Final = ("ping", "offer", "answer", "delete", "query", "list")
MAX_COOKIE: Final = 128
DEFAULT_CACHE_SIZE: Final = 10_000
DEFAULT_LIST_LIMIT: Final = 32

# Flags we understand but that change nothing here (no transcoding, recording, kernel path).
_IGNORED_FLAGS: Final = frozenset(
    {
        "all",
        "fatal",
        "port latching",
        "no port latching",
        "record call",
        "loop protect",
        "original sendrecv",
        "reset",
        "unidirectional",
        "generate mid",
        "nat wait",
        "pierce nat",
        "trickle ice",
        "early media",
        "debug",
        "debugging",
        "no codec renegotiation",
        "reuse codecs",
        "single codec",
        "strip extmap",
    }
)
_TRANSPORTS: Final = frozenset(
    {"RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF", "UDP/TLS/RTP/SAVP", "UDP/TLS/RTP/SAVPF"}
)


class NGError(Exception):
    """A reply with ``"result": "error"``; ``reason`` is its ``error-reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NGTimeout(NGError):
    """No reply after every retransmission."""


class _BadRequest(Exception):
    """A request we cannot read: answered with ``result: error``."""


# --------------------------------------------------------------------------- framing


def normalize(key: str) -> str:
    """A key or flag as rtpengine compares them: ``-``/``_`` as space, lower case."""
    return key.replace("-", " ").replace("_", " ").lower()


def to_text(value: Any) -> Any:
    """Bencode strings (bytes) to :class:`str`, all the way down.

    Bytes that are not UTF-8 survive the round trip via ``surrogateescape``; both the NG server
    and the in-process :class:`~sipproxy.media.backends.LocalRelay` hand commands over this way.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [to_text(v) for v in value]
    if isinstance(value, dict):
        return {to_text(k): to_text(v) for k, v in value.items()}
    return value


def decode_message(datagram: bytes) -> tuple[bytes, dict[str, Any] | None, bool]:
    """(cookie, request dict or None if unreadable, JSON?); ValueError without a cookie."""
    cookie, sep, payload = datagram.partition(b" ")
    if not sep or not cookie or len(cookie) > MAX_COOKIE or not cookie.isascii():
        raise ValueError("no cookie")
    if any(b <= 0x20 or b == 0x7F for b in cookie):
        raise ValueError("bad cookie")
    is_json = payload.lstrip().startswith(b"{")
    try:
        if is_json:
            value = json.loads(payload.decode("utf-8", "surrogateescape"))
        else:
            value = to_text(bencode.decode(payload))
    except (ValueError, RecursionError):
        return cookie, None, is_json
    if not isinstance(value, dict):
        return cookie, None, is_json
    return cookie, value, is_json


def encode_message(cookie: bytes, message: Mapping[str, Any], as_json: bool = False) -> bytes:
    if as_json:
        body = json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogateescape")
    else:
        body = bencode.encode(message)
    return cookie + b" " + body


def _error(reason: str) -> dict[str, Any]:
    return {"result": "error", "error-reason": reason}


# --------------------------------------------------------------------------- the commands


class _Request:
    """A request dictionary with normalized keys and typed getters."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.values: dict[str, Any] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                raise _BadRequest("Invalid key")
            self.values.setdefault(normalize(key), value)
        self.flags: set[str] = set()
        for flag in self.strings("flags"):
            name, eq, value = flag.partition("=")
            if eq:  # "key=value" in flags, as newer rtpengine accepts
                self.values.setdefault(normalize(name), value)
            else:
                self.flags.add(normalize(flag))

    def string(self, key: str, required: str | None = None) -> str | None:
        value = self.values.get(key)
        if value is None:
            if required is not None:
                raise _BadRequest(required)
            return None
        if not isinstance(value, str):
            raise _BadRequest(f"Invalid value for '{key}'")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.values.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _BadRequest(f"Invalid value for '{key}'")
        return value


class NGCommands:
    """Carries out NG requests (dicts with str keys) on a relay engine; never raises."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        try:
            req = _Request(request)
            command = req.string("command", "Incomplete message: no command")
            assert command is not None
            handler = getattr(self, "_cmd_" + normalize(command).replace(" ", "_"), None)
            if handler is None or normalize(command) not in COMMANDS:
                return _error("Unrecognized command")
            result: dict[str, Any] = handler(req)
            return result
        except _BadRequest as e:
            return _error(str(e))
        except RelayError as e:
            return _error(str(e))
        except Exception:
            _log.failure("NG command failed")
            return _error("Internal error")

    # -- commands

    def _cmd_ping(self, req: _Request) -> dict[str, Any]:
        return {"result": "pong"}

    def _cmd_offer(self, req: _Request) -> dict[str, Any]:
        return self._signal(req, offer=True)

    def _cmd_answer(self, req: _Request) -> dict[str, Any]:
        return self._signal(req, offer=False)

    def _cmd_delete(self, req: _Request) -> dict[str, Any]:
        call_id = req.string("call id", "No call-id in message")
        assert call_id is not None
        from_tag = req.string("from tag")
        try:
            stats = self.engine.delete(call_id, from_tag)
        except UnknownCall as e:
            if "fatal" in req.flags:
                return _error(str(e))
            return {"result": "ok", "warning": "Call-ID not found or tags didn't match"}
        return {"result": "ok", **stats}

    def _cmd_query(self, req: _Request) -> dict[str, Any]:
        call_id = req.string("call id", "No call-id in message")
        assert call_id is not None
        return {"result": "ok", **self.engine.query(call_id)}

    def _cmd_list(self, req: _Request) -> dict[str, Any]:
        limit = req.values.get("limit", DEFAULT_LIST_LIMIT)
        if isinstance(limit, str) and limit.isdigit():
            limit = int(limit)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise _BadRequest("Invalid value for 'limit'")
        return {"result": "ok", "calls": self.engine.list_calls(limit)}

    # -- offer and answer

    def _signal(self, req: _Request, *, offer: bool) -> dict[str, Any]:
        sdp_text = req.string("sdp", "No SDP body in message")
        call_id = req.string("call id", "No call-id in message")
        from_tag = req.string("from tag", "No from-tag in message")
        to_tag = req.string("to tag", None if offer else "No to-tag in message")
        assert sdp_text is not None and call_id is not None and from_tag is not None
        options, warnings = self._options(req, offer=offer)
        try:
            sdp = parse_sdp(sdp_text.encode("utf-8", "surrogateescape"))
        except (SdpError, UnicodeEncodeError):
            raise _BadRequest("Failed to parse SDP") from None
        if offer:
            out = self.engine.offer(call_id, from_tag, sdp, options, to_tag=to_tag or None)
        else:
            assert to_tag is not None
            out = self.engine.answer(call_id, from_tag, to_tag, sdp, options)
        reply: dict[str, Any] = {
            "result": "ok",
            "sdp": out.to_bytes().decode("utf-8", "surrogateescape"),
        }
        if warnings:
            reply["warning"] = "; ".join(warnings)
        return reply

    def _options(self, req: _Request, *, offer: bool) -> tuple[SignalOptions, list[str]]:
        o = SignalOptions()
        warnings: list[str] = []
        flags = set(req.flags)
        replace = {normalize(r) for r in req.strings("replace")}
        mux = {normalize(r) for r in req.strings("rtcp mux")}
        for flag in list(flags):
            for prefix, target in (("replace ", replace), ("rtcp mux ", mux)):
                if flag.startswith(prefix):
                    target.add(flag[len(prefix) :])
                    flags.discard(flag)
        direction = req.strings("direction")
        if direction:
            if len(direction) != 2:
                raise _BadRequest("Invalid value for 'direction'")
            o.direction = (direction[0], direction[1])
        received = req.strings("received from")
        if received:
            if len(received) != 2 or not is_ip_literal(received[1]):
                raise _BadRequest("Invalid value for 'received-from'")
            o.received_from = received[1]
        media_address = req.string("media address")
        if media_address is not None:
            if not is_ip_literal(media_address):
                raise _BadRequest("Invalid value for 'media-address'")
            o.media_address = media_address
        o.sip_source_address = "sip source address" in flags and "trust address" not in flags
        o.asymmetric = "asymmetric" in flags and "symmetric" not in flags
        o.strict_source = "strict source" in flags
        o.media_handover = "media handover" in flags
        o.full_rtcp_attribute = "full rtcp attribute" in flags
        o.no_rtcp_attribute = "no rtcp attribute" in flags
        o.replace_origin = "origin" in replace
        o.replace_session_connection = "session connection" in replace
        o.replace_zero_address = "zero address" in replace
        o.rtcp_mux = frozenset(mux)
        unknown_mux = mux - {"offer", "require", "demux", "accept", "reject"}
        if unknown_mux:
            raise _BadRequest("Invalid value for 'rtcp-mux'")
        ice = req.string("ice")
        if "reject ice" in flags:
            ice = "remove"
        if ice is not None:
            ice = normalize(ice)
            if ice not in ("remove", "default", "force", "force relay", "optional"):
                raise _BadRequest("Invalid value for 'ICE'")
            if ice not in ("remove", "default"):
                warnings.append(f"ICE={ice} is not supported: ICE attributes were removed")
            o.ice = ice
        proto = req.string("transport protocol")
        if proto is not None:
            if proto == "accept" and not offer:
                pass
            elif proto.upper() not in _TRANSPORTS:
                raise _BadRequest("Invalid value for 'transport-protocol'")
            else:
                proto = proto.upper()
            o.transport_protocol = proto
        o.label = req.string("label")
        o.via_branch = req.string("via branch")
        known = {
            "sip source address",
            "trust address",
            "symmetric",
            "asymmetric",
            "strict source",
            "media handover",
            "full rtcp attribute",
            "no rtcp attribute",
            "reject ice",
        }
        for flag in sorted(flags - known - _IGNORED_FLAGS):
            _log.debug("NG: ignoring unknown flag {flag!r}", flag=flag)
        return o, warnings


# --------------------------------------------------------------------------- the server


class NGServerProtocol(DatagramProtocol):
    """The NG server over UDP, with a reply cache keyed by (source, cookie)."""

    noisy = False

    def __init__(
        self,
        commands: NGCommands,
        clock: Any,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.commands = commands
        self.clock = clock
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, bytes], tuple[float, bytes]] = OrderedDict()

    def _purge(self, now: float) -> None:
        cache = self._cache
        while cache:
            key, (stamp, _) = next(iter(cache.items()))
            if now - stamp < self.cache_ttl and len(cache) <= self.cache_size:
                break
            del cache[key]

    def reply_for(self, datagram: bytes, source: Any) -> bytes | None:
        """The reply datagram for ``datagram`` from ``source`` (None: send nothing)."""
        try:
            cookie, request, is_json = decode_message(datagram)
        except ValueError:
            return None  # without a cookie a reply could match nothing
        now = self.clock.seconds()
        self._purge(now)
        key = (source, cookie)
        cached = self._cache.get(key)
        if cached is not None:
            return cached[1]
        if request is None:
            reply = _error("Failed to decode message")
        else:
            reply = self.commands.handle(request)
        data = encode_message(cookie, reply, is_json)
        self._cache[key] = (now, data)
        return data

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        data = self.reply_for(datagram, addr)
        if data is None or self.transport is None:
            return
        try:
            self.transport.write(data, addr)
        except (OSError, MessageLengthError) as e:
            _log.warn("NG: cannot send reply to {addr}: {e}", addr=addr, e=e)


# --------------------------------------------------------------------------- the client


class NGClient(DatagramProtocol):
    """Sends NG commands to ``(host, port)``: ``command({...})`` gives a Deferred of the reply
    dict (str keys), or fails with :class:`NGError` (``result: error``) / :class:`NGTimeout`.

    Start it with ``reactor.listenUDP(0, client, interface=...)`` (or :meth:`start`); a request
    is sent ``tries`` times, ``interval`` seconds apart, with the same cookie.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        *,
        clock: Any = None,
        interval: float = 0.5,
        tries: int = 4,
    ) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.address = (host, port)
        self.interval = interval
        self.tries = tries
        self._prefix = secrets.token_hex(6)
        self._counter = 0
        self._pending: dict[bytes, tuple[defer.Deferred[dict[str, Any]], bytes, IDelayedCall]] = (
            {}
        )
        self._port: Any = None

    def start(self, interface: str = "") -> None:
        # an answer carries a whole SDP: more than Twisted's default 8 KiB read
        self._port = self.reactor.listenUDP(0, self, interface=interface, maxPacketSize=65535)

    def stop(self) -> defer.Deferred[None]:
        for cookie in list(self._pending):
            self._finish(cookie, NGError("client stopped"))
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def command(self, message: Mapping[str, Any]) -> defer.Deferred[dict[str, Any]]:
        self._counter += 1
        cookie = f"{self._prefix}_{self._counter}".encode()
        data = encode_message(cookie, message)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        timer = self.clock.callLater(self.interval, self._retransmit, cookie, 1)
        self._pending[cookie] = (d, data, timer)
        self._send(data)
        return d

    def _send(self, data: bytes) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, self.address)
        except (OSError, MessageLengthError) as e:
            _log.warn("NG client: cannot send to {addr}: {e}", addr=self.address, e=e)

    def _retransmit(self, cookie: bytes, sent: int) -> None:
        entry = self._pending.get(cookie)
        if entry is None:
            return
        d, data, _ = entry
        if sent >= self.tries:
            self._finish(cookie, NGTimeout(f"no reply from {self.address[0]}:{self.address[1]}"))
            return
        timer = self.clock.callLater(self.interval, self._retransmit, cookie, sent + 1)
        self._pending[cookie] = (d, data, timer)
        self._send(data)

    def _finish(self, cookie: bytes, result: dict[str, Any] | Exception) -> None:
        entry = self._pending.pop(cookie, None)
        if entry is None:
            return
        d, _, timer = entry
        if timer.active():
            timer.cancel()
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            cookie, reply, _ = decode_message(datagram)
        except ValueError:
            return
        if cookie not in self._pending:
            return  # a late reply to a retransmission, or not ours
        if reply is None:
            self._finish(cookie, NGError("undecodable reply"))
        elif reply.get("result") == "error":
            self._finish(cookie, NGError(str(reply.get("error-reason", "error"))))
        else:
            self._finish(cookie, reply)
