"""Topology hiding for the ``nat`` plugin's firewall mode (``[nat] hide_topology``): no inside
address and no inside host name in any byte of a message sent on the outside, and the reverse
mapping of what comes back.

The ``nat`` plugin already hides Via, Contact, Record-Route, Route and Path; the ``media``
plugin the SDP. This module does the rest, header by header and body part by body part:

- Call-ID: a Call-ID an inside phone made is replaced by ``th-`` and an HMAC of it (a secret
  of this process): the same inside Call-ID always gets the same outside one (REGISTER
  refreshes, every message of a dialog) and the outside one says nothing about the inside one.
  The way back (in-dialog requests and responses from the outside, ``Replaces``) looks the
  outside Call-ID up in a table that holds at most ``max_mappings`` entries, each forgotten
  ``mapping_ttl`` after its last use (soon after its dialog ended).
- From, To: a URI naming an inside address or name becomes ``sip:user@<outside address>``
  (the user dropped too when it names one); the original URI comes back on the way in (display
  name and parameters, i.e. the tags, as they are).
- Refer-To, Referred-By: a URI naming an inside host becomes a ``nat-`` token of the nat
  plugin's (as a Contact does; an INVITE to it reaches that host), back on the way in; a
  ``?Replaces=`` in Refer-To gets its Call-ID mapped as the Call-ID is. Replaces: the same.
  A Request-URI naming an inside host becomes such a token too.
- User-Agent, Server: pass, unless ``strip_user_agent`` (or they carry an inside address).
- Any other header value carrying an inside address or name is removed (Warning, Call-Info,
  Error-Info, Alert-Info, P-Asserted-Identity, Reply-To, unknown headers...); a value of a list
  header is removed alone. Via, CSeq, Max-Forwards, Content-Type, Content-Length are the
  nat plugin's or pass; so do Authorization and Proxy-Authorization (the digest covers its
  ``uri``, which phones set to the Request-URI; a phone that puts the proxy's inside address
  there shows it).
- Bodies: a plain SDP body passes (the media plugin's); ``message/sipfrag`` gets the header
  mapping above (its request line's URI like Refer-To), both ways; a multipart ``boundary``
  naming an inside address is replaced; any other body carrying an inside
  address is removed; a multipart body is checked part by part (sipfrag parts as above, other
  parts, SDP ones too, removed when they carry one: the media plugin relays only a plain SDP
  body).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from sipproxy.errors import ParseError
from sipproxy.headers import LIST_HEADERS, Field, Headers, canonical
from sipproxy.message import Message, Request
from sipproxy.uri import format_host, parse_uri, split_header_values

__all__ = ["HIDDEN_PREFIX", "HiddenCallId", "Hiding", "TopologyHider", "uri_span"]

#: the start of every outside Call-ID this module makes
HIDDEN_PREFIX = "th-"
#: seconds an outside Call-ID is still mapped back after its dialog ended (late NOTIFYs...)
AFTER_DIALOG = 32.0
#: our own outside addresses remembered at most (one per outside listener, or per local
#: address a wildcard listener sends from)
MAX_OWN = 64

_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Za-z:])")
#: header fields that are never removed: the nat plugin rewrites them, or they pass (a
#: digest's ``uri`` cannot be changed without breaking it: phones put the Request-URI there)
_KEPT = frozenset({"via", "cseq", "max-forwards", "content-length", "content-type",
                   "authorization", "proxy-authorization"})
_AGENT = frozenset({"user-agent", "server"})
_URI_HEADERS = frozenset({"refer-to", "referred-by"})
_CRLF = "\r\n"

#: a URI naming an inside host -> a nat token URI standing for it (None: none could be made)
Tokenize = Callable[[str], "str | None"]


@dataclass(slots=True)
class HiddenCallId:
    """What the outside Call-ID of one inside Call-ID maps back."""

    inside: str
    expires_at: float
    #: From/To URIs: the outside form -> the inside one, and the reverse
    parties: dict[str, str] = field(default_factory=dict)
    outside_of: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Hiding:
    """One message's way out: the address that stands for the inside (``host``), how to
    make a token for an inside URI, and whether its Call-ID is one to hide."""

    host: str
    tokenize: Tokenize
    entry: HiddenCallId | None = None


def uri_span(value: str) -> tuple[int, int]:
    """Where the URI is in a From/To/Refer-To value: inside ``<>``, or the addr-spec up to its
    first ``;`` (the parameters after it are the header's)."""
    start = 0
    stripped = value.lstrip()
    if stripped.startswith('"'):
        i = len(value) - len(stripped) + 1
        while i < len(value) and value[i] != '"':
            i += 2 if value[i] == "\\" else 1
        start = i + 1
    lt = value.find("<", start)
    if lt >= 0:
        gt = value.find(">", lt)
        return lt + 1, gt if gt >= 0 else len(value)
    begin = len(value) - len(stripped)
    semi = value.find(";", begin)
    end = semi if semi >= 0 else len(value)
    while end > begin and value[end - 1].isspace():
        end -= 1
    return begin, end


def _split_lines(text: str) -> list[str]:
    return text.split(_CRLF) if _CRLF in text else text.split("\n")


class TopologyHider:
    """Maps what leaves on the outside and what comes back (see the module docstring).

    :param clock: the reactor time the table's expiry runs on.
    :param is_inside: whether an IP address (text, IPv6 without brackets) is an inside one.
    :param names: inside domain names: a host name equal to one or under it is inside.
    :param ttl: seconds an outside Call-ID maps back after its last use.
    :param max_mappings: outside Call-IDs kept at most (the least recently used go first).
    :param strip_user_agent: remove User-Agent and Server from what leaves.
    """

    def __init__(
        self, clock: IReactorTime, is_inside: Callable[[str], bool], names: Iterable[str] = (),
        ttl: float = 7200.0, max_mappings: int = 20_000, strip_user_agent: bool = False,
    ) -> None:
        self.clock = clock
        self.is_inside = is_inside
        #: the addresses that stand for the inside on the outside (ours): never inside ones,
        #: also where inside_networks covers them (an outside interface on a private network)
        self.own: set[str] = set()
        self.ttl = ttl
        self.max_mappings = max_mappings
        self.strip_user_agent = strip_user_agent
        self._secret = os.urandom(32)
        self._hidden: OrderedDict[str, HiddenCallId] = OrderedDict()
        names = [n.strip(".").lower() for n in names if n.strip(".")]
        self._names = re.compile(
            r"(?<![0-9A-Za-z.-])(?:[0-9A-Za-z-]+\.)*(?:"
            + "|".join(re.escape(n) for n in names) + r")(?![0-9A-Za-z-])",
            re.IGNORECASE) if names else None

    def __len__(self) -> int:
        return len(self._hidden)

    # -- what is inside ----------------------------------------------------------------------
    def _is_inside_ip(self, text: str) -> bool:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return False
        return text not in self.own and self.is_inside(text)

    def leaks(self, text: str) -> bool:
        """Does ``text`` carry an inside address or an inside host name?"""
        if not text:
            return False
        if any(self._is_inside_ip(m.group()) for m in _IPV4.finditer(text)):
            return True
        if ":" in text and any(self._is_inside_ip(m.group()) for m in _IPV6.finditer(text)):
            return True
        return self._names is not None and self._names.search(text) is not None

    # -- Call-ID ----------------------------------------------------------------------------
    def outside_call_id(self, call_id: str) -> str:
        """The outside Call-ID of an inside one (always the same for the same one)."""
        digest = hmac.new(self._secret, call_id.encode("utf-8", "surrogateescape"),
                          hashlib.sha256).hexdigest()
        return HIDDEN_PREFIX + digest[:32]

    def hide_call_id(self, call_id: str, ttl: float | None = None) -> HiddenCallId:
        """Hide ``call_id``: its entry (made, or found and kept ``ttl`` longer)."""
        hidden = self.outside_call_id(call_id)
        now = self.clock.seconds()
        entry = self._hidden.get(hidden)
        if entry is None:
            while len(self._hidden) >= self.max_mappings:
                self._hidden.popitem(last=False)
            entry = self._hidden[hidden] = HiddenCallId(call_id, 0.0)
        self._hidden.move_to_end(hidden)
        entry.expires_at = max(entry.expires_at, now + (self.ttl if ttl is None else ttl))
        return entry

    def hidden_entry(self, call_id: str) -> HiddenCallId | None:
        """The entry of an inside Call-ID hidden before (in-dialog requests from the inside)."""
        return self._live(self.outside_call_id(call_id))

    def _live(self, hidden: str) -> HiddenCallId | None:
        entry = self._hidden.get(hidden)
        if entry is None:
            return None
        if entry.expires_at < self.clock.seconds():
            del self._hidden[hidden]
            return None
        self._hidden.move_to_end(hidden)
        return entry

    def reveal(self, outside: str) -> HiddenCallId | None:
        """The entry an outside Call-ID of ours stands for (None: not ours, or forgotten)."""
        return self._live(outside) if outside.startswith(HIDDEN_PREFIX) else None

    def should_hide(self, call_id: str) -> bool:
        """A Call-ID found in a header or fragment: hidden when it was, or when it leaks."""
        return self.hidden_entry(call_id) is not None or self.leaks(call_id)

    def dialog_ended(self, call_id: str) -> None:
        """Its dialog ended: the mapping goes soon (a NOTIFY or a BYE may still cross)."""
        entry = self._hidden.get(self.outside_call_id(call_id))
        if entry is not None:
            entry.expires_at = min(entry.expires_at, self.clock.seconds() + AFTER_DIALOG)

    def purge(self) -> int:
        now = self.clock.seconds()
        gone = [k for k, e in self._hidden.items() if e.expires_at < now]
        for key in gone:
            del self._hidden[key]
        return len(gone)

    # -- From / To -------------------------------------------------------------------------
    def hide_party(self, value: str, hiding: Hiding) -> str:
        """A From/To value with its URI's inside host replaced by ``hiding.host``; the
        display name and any parameter that leaks are dropped (the tags stay)."""
        start, end = uri_span(value)
        uri = value[start:end]
        if self.leaks(uri):
            entry = hiding.entry
            outside = entry.outside_of.get(uri) if entry is not None else None
            if outside is None:
                outside = self._outside_uri(uri, hiding.host)
            if entry is not None:
                entry.parties[outside] = uri
                entry.outside_of[uri] = outside
            value = value[:start] + outside + value[end:]
        if not self.leaks(value):
            return value
        start, end = uri_span(value)
        params = [p for p in value[end:].lstrip(">").split(";") if p and not self.leaks(p)]
        return "".join([f"<{value[start:end]}>", *(";" + p for p in params)])

    def reveal_party(self, value: str, entry: HiddenCallId) -> str:
        start, end = uri_span(value)
        inside = entry.parties.get(value[start:end])
        return value if inside is None else value[:start] + inside + value[end:]

    def _outside_uri(self, uri: str, host: str) -> str:
        try:
            parsed = parse_uri(uri)
            scheme, user = parsed.scheme.lower(), parsed.user
        except ParseError:
            scheme, user = "sip", None
        if scheme not in ("sip", "sips"):
            scheme = "sip"
        userinfo = f"{user}@" if user and not self.leaks(user) else ""
        return f"{scheme}:{userinfo}{format_host(host)}"

    # -- Replaces, Refer-To ----------------------------------------------------------------
    def hide_replaces(self, value: str) -> str:
        """``Replaces: callid;to-tag=..;from-tag=..`` (also unescaped from a Refer-To)."""
        call_id, sep, rest = value.partition(";")
        if self._hide_now(call_id.strip()):
            return self.outside_call_id(call_id.strip()) + sep + rest
        return value

    def reveal_replaces(self, value: str) -> str:
        call_id, sep, rest = value.partition(";")
        entry = self.reveal(call_id.strip())
        return value if entry is None else entry.inside + sep + rest

    def _map_refer_headers(self, headers: str, call_id: Callable[[str], str]) -> str:
        """The ``?Replaces=`` of a Refer-To URI, its Call-ID (escaped) mapped by ``call_id``."""
        out = []
        for item in headers.split("&"):
            name, eq, escaped = item.partition("=")
            if eq and name.strip().lower() == "replaces":
                match = re.search(r"%3b|;", escaped, re.IGNORECASE)
                cut = match.start() if match else len(escaped)
                old = _unescape(escaped[:cut])
                new = call_id(old)
                if new != old:
                    item = f"{name}={_escape(new)}{escaped[cut:]}"
            out.append(item)
        return "&".join(out)

    def hide_uri(self, uri: str, hiding: Hiding) -> str | None:
        """A Refer-To/Referred-By URI: its inside host a token, its Replaces' Call-ID
        hidden; None: it cannot go out."""
        base, q, headers = uri.partition("?")
        if q:
            headers = self._map_refer_headers(
                headers, lambda c: self.outside_call_id(c) if self._hide_now(c) else c)
        if self.leaks(base):
            token = hiding.tokenize(base)
            if token is None:
                return None
            base = token
        new = base + q + headers
        return None if self.leaks(new) else new

    def _hide_now(self, call_id: str) -> bool:
        if self.should_hide(call_id):
            self.hide_call_id(call_id)
            return True
        return False

    def reveal_uri(self, uri: str, untokenize: Callable[[str], str | None]) -> str:
        base, q, headers = uri.partition("?")
        if q:
            headers = self._map_refer_headers(
                headers, lambda c: e.inside if (e := self.reveal(c)) is not None else c)
        return (untokenize(base) or base) + q + headers

    # -- any header ------------------------------------------------------------------------
    def hide_field(self, key: str, value: str, hiding: Hiding) -> str | None:
        """One header value on its way out: mapped, passed, or None (removed). Call-ID is
        the caller's to decide (it knows the direction); here a fragment's is hidden as
        :meth:`should_hide` says."""
        if key in _KEPT:
            return value
        if key == "call-id":
            return self.outside_call_id(value.strip()) if self._hide_now(value.strip()) \
                else value
        if key in ("from", "to"):
            return self.hide_party(value, hiding)
        if key in _AGENT and self.strip_user_agent:
            return None
        if key == "replaces":
            value = self.hide_replaces(value)
        elif key in _URI_HEADERS:
            start, end = uri_span(value)
            uri = self.hide_uri(value[start:end], hiding)
            if uri is None:
                return None
            value = value[:start] + uri + value[end:]
        if key in LIST_HEADERS and "," in value:
            kept = [v for v in split_header_values(value) if not self.leaks(v)]
            return ", ".join(kept) if kept else None
        return None if self.leaks(value) else value

    def reveal_field(
        self, key: str, value: str, entry: HiddenCallId | None,
        untokenize: Callable[[str], str | None],
    ) -> str:
        """One header value on its way in (from the outside)."""
        if key in ("from", "to") and entry is not None:
            return self.reveal_party(value, entry)
        if key == "replaces":
            return self.reveal_replaces(value)
        if key in _URI_HEADERS:
            start, end = uri_span(value)
            return value[:start] + self.reveal_uri(value[start:end], untokenize) + value[end:]
        return value

    # -- whole messages --------------------------------------------------------------------
    def reveal_message(
        self, message: Message, untokenize: Callable[[str], str | None]
    ) -> HiddenCallId | None:
        """Map a message from the outside back in place: an outside Call-ID of ours (and
        From/To under it), Replaces, Refer-To, Referred-By. Returns the Call-ID's entry (None:
        the Call-ID is not one of ours)."""
        entry = self.reveal(message.call_id.strip())
        fields = []
        changed = False
        for f in message.headers.fields:
            if f.key == "call-id" and entry is not None:
                new = entry.inside
            else:
                new = self.reveal_field(f.key, f.value, entry, untokenize)
            if new != f.value:
                f, changed = Field(f.name, f.key, new, None), True
            fields.append(f)
        if changed:
            message.headers = Headers(fields)  # no parsed view of the old values left
        if message.body and _kind(message.headers.get("content-type") or "") == \
                "message/sipfrag":
            message.body = self._reveal_sipfrag(message.body, untokenize)
        return entry

    def _reveal_sipfrag(self, body: bytes, untokenize: Callable[[str], str | None]) -> bytes:
        """A fragment from the outside (a NOTIFY for a REFER): its request line's URI, its
        Call-ID (one of ours), From/To under it, Replaces, Refer-To... mapped back."""
        text = body.decode("utf-8", "surrogateescape")
        head, sep, rest = text.partition("\r\n\r\n")
        lines = _split_lines(head)
        call_id = next((v.strip() for n, _, v in (line.partition(":") for line in lines[1:])
                        if canonical(n.strip()) in ("call-id", "i")), "")
        entry = self.reveal(call_id)
        out = []
        for i, line in enumerate(lines):
            if i == 0 and not line.startswith("SIP/"):
                parts = line.split(" ")
                if len(parts) == 3:
                    line = " ".join([parts[0], self.reveal_uri(parts[1], untokenize), parts[2]])
            elif i > 0 and ":" in line:
                name, _, value = line.partition(":")
                key = canonical(name.strip())
                new = entry.inside if key == "call-id" and entry is not None else \
                    self.reveal_field(key, value.strip(), entry, untokenize)
                if new != value.strip():
                    line = f"{name}: {new}"
            out.append(line)
        return (_CRLF.join(out) + sep + rest).encode("utf-8", "surrogateescape")

    def hide_request_uri(self, uri: str, hiding: Hiding) -> str:
        """A Request-URI leaving on the outside that names an inside host (a loose-routed
        request whose next hop is a Route): a token standing for it, as a Contact's (a
        request to it comes back to that host), else ``user@`` our address."""
        if not self.leaks(uri):
            return uri
        token = hiding.tokenize(uri.partition("?")[0])
        return token if token is not None and not self.leaks(token) else \
            self._outside_uri(uri, hiding.host)

    def hide_message(self, message: Message, hiding: Hiding) -> None:
        """Map or remove, in place, every header but Call-ID (the caller decides that one: it
        knows which side made it) and the body of a message about to leave on the outside."""
        if hiding.host not in self.own and len(self.own) < MAX_OWN:
            self.own.add(hiding.host)
        if isinstance(message, Request):
            uri = str(message.uri)
            new_uri = self.hide_request_uri(uri, hiding)
            if new_uri != uri:
                message.uri = parse_uri(new_uri)
        self._hide_boundary(message)
        fields = []
        changed = False
        for f in message.headers.fields:
            new = f.value if f.key == "call-id" else self.hide_field(f.key, f.value, hiding)
            if new is None:
                changed = True
                continue
            if new != f.value:
                f, changed = Field(f.name, f.key, new, None), True
            fields.append(f)
        if changed:
            message.headers = Headers(fields)  # no parsed view of the old values left
        body = message.body
        if body:
            new_body = self.hide_body(message.headers.get("content-type") or "", body, hiding)
            if new_body is None:
                message.body = b""
                for name in ("Content-Type", "Content-Disposition", "Content-Encoding"):
                    message.headers.remove(name)
            elif new_body != body:
                message.body = new_body

    # -- bodies ----------------------------------------------------------------------------
    def _hide_boundary(self, message: Message) -> None:
        """A multipart boundary naming an inside address (phones make them of anything) is
        replaced, in Content-Type and in the body's delimiters, by one telling nothing."""
        content_type = message.headers.get("content-type") or ""
        boundary = _boundary(content_type) if _kind(content_type).startswith("multipart/") \
            else None
        if boundary is None or not self.leaks(boundary.decode("latin-1")):
            return
        new = HIDDEN_PREFIX + hmac.new(self._secret, boundary, hashlib.sha256).hexdigest()[:24]
        message.headers.set("Content-Type", content_type.replace(
            boundary.decode("latin-1"), new))
        message.body = message.body.replace(b"--" + boundary, b"--" + new.encode())

    def hide_body(
        self, content_type: str, body: bytes, hiding: Hiding, part: bool = False
    ) -> bytes | None:
        """A body on its way out: as it is, mapped, or None (removed). A plain SDP body is
        the media plugin's; an SDP part of a multipart body is not (the media plugin relays
        only a plain one): it is removed when it names the inside, as any other part."""
        kind = _kind(content_type)
        if (kind == "application/sdp" and not part) or not body:
            return body
        if kind == "message/sipfrag":
            return self._hide_sipfrag(body, hiding)
        if kind.startswith("multipart/"):
            boundary = _boundary(content_type)
            if boundary is not None:
                return self._hide_multipart(body, boundary, hiding)
        return None if self.leaks(body.decode("latin-1")) else body

    def _hide_sipfrag(self, body: bytes, hiding: Hiding) -> bytes | None:
        text = body.decode("utf-8", "surrogateescape")
        head, sep, rest = text.partition("\r\n\r\n")
        lines = _split_lines(head)
        out: list[str] = []
        for i, line in enumerate(lines):
            if i == 0 and not line.startswith("SIP/"):
                parts = line.split(" ")
                if len(parts) == 3:
                    uri = self.hide_uri(parts[1], hiding)
                    if uri is None:
                        return None
                    line = " ".join([parts[0], uri, parts[2]])
            elif i > 0 and ":" in line:
                name, _, value = line.partition(":")
                new = self.hide_field(canonical(name.strip()), value.strip(), hiding)
                if new is None:
                    continue
                line = f"{name}: {new}"
            out.append(line)
        frag = _CRLF.join(out) + sep + rest
        return None if self.leaks(frag) else frag.encode("utf-8", "surrogateescape")

    def _hide_multipart(self, body: bytes, boundary: bytes, hiding: Hiding) -> bytes | None:
        delimiter = b"--" + boundary
        pieces = body.split(delimiter)
        if len(pieces) < 3:
            return None if self.leaks(body.decode("latin-1")) else body
        kept = []
        for part in pieces[1:-1]:
            head, sep, content = part.partition(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-type:[ \t]*([^\r\n]*)", head)
            ctype = match.group(1).decode("latin-1") if match else "text/plain"
            new = self.hide_body(ctype, content.removesuffix(b"\r\n"), hiding, part=True)
            if new is None or self.leaks(head.decode("latin-1")):
                continue
            if new != content.removesuffix(b"\r\n"):
                head = re.sub(rb"(?im)^content-length:[^\r\n]*\r\n?", b"", head)
                part = head + sep + new + b"\r\n"
            kept.append(part)
        if not kept:
            return None
        return delimiter + delimiter.join([*kept, b"--\r\n"])


def _kind(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).encode("latin-1")


def _unescape(text: str) -> str:
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _escape(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.!~*'()" else f"%{ord(c):02X}" for c in text)
