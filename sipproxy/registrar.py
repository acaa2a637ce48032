"""The registrar: RFC 3261 section 10.3 REGISTER processing on top of the location service.

It answers one REGISTER with one final response and never forwards anything: whether a REGISTER
is ours to handle (``is_local_host`` on the Request-URI) is the caller's decision. Every change
a REGISTER asks for is checked first and committed only if all of it is valid (10.3 step 8), so
a request never leaves half its contacts updated.

An address-of-record holds at most ``max_contacts`` bindings: a REGISTER that would leave more
is refused whole with ``403 Too Many Registered Contacts`` (refreshing or removing bindings
always passes). RFC 3261 sets no limit; Kamailio and OpenSIPS answer ``503`` with that phrase,
Asterisk ``403``. We answer 403: the condition does not pass by waiting, and a 503 would make
a phone retry or fail over to another registrar. Each Contact is matched against the stored
ones through an index on the parts RFC 3261 19.1.4 always compares (``_uri_key``), so a
REGISTER costs time linear in its Contacts and the AOR's bindings, not their product.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sipproxy.errors import ParseError
from sipproxy.location import Binding, LocationService, RemovalReason
from sipproxy.message import new_tag
from sipproxy.uri import URI, NameAddr, format_host, parse_uri, unescape

if TYPE_CHECKING:
    from sipproxy.message import Request, Response

__all__ = ["HOST_DOMAIN", "SUPPORTED_EXTENSIONS", "Registrar", "aor_of", "uri_equal"]

#: The domain every address of this host stands for when the registrar serves them all
#: (``own_host``): bindings are stored as ``sip:user@localhost``.
HOST_DOMAIN = "localhost"

#: Option tags a REGISTER may Require of us.
SUPPORTED_EXTENSIONS = frozenset({"path"})

_MAX_DELTA = 2**32 - 1  # RFC 3261 20.19/25.1: larger delta-seconds mean this much
# RFC 3261 19.1.4: these URI parameters must match even when only one side has them.
_MUST_MATCH_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def aor_of(uri: URI | str) -> str:
    """The canonical address-of-record of a URI, the key bindings are stored under.

    RFC 3261 10.3 step 5: ``sip:user@host`` with every parameter removed and escapes decoded;
    we also lower-case the host, drop the port, and fold ``sips:`` into ``sip:`` so a user
    registered over TLS is found by a plain ``sip:`` Request-URI and vice versa.
    Raises ParseError for text that is not a URI.
    """
    if isinstance(uri, str):
        uri = parse_uri(uri.strip())
    aor = uri.aor()
    if uri.scheme.lower() == "sips":
        return "sip:" + aor[5:]
    return aor


def _aor_host(aor: str) -> str | None:
    """The host of a canonical address-of-record string; None when it is no SIP AOR."""
    scheme, _, rest = aor.partition(":")
    if scheme.lower() not in ("sip", "sips"):
        return None
    host = rest.rpartition("@")[2]
    if not host.startswith("["):
        host = host.partition(":")[0]
    return host


def _unescaped(text: str | None) -> str | None:
    return None if text is None else unescape(text)


def _param_map(uri: URI) -> dict[str, str | None]:
    return {
        name.lower(): (None if value is None else unescape(value).lower())
        for name, value in uri.params
    }


def _header_set(uri: URI) -> set[tuple[str, str]]:
    if not uri.headers:
        return set()
    out: set[tuple[str, str]] = set()
    for item in uri.headers.split("&"):
        name, _, value = item.partition("=")
        out.add((unescape(name).lower(), unescape(value)))
    return out


def uri_equal(a: URI, b: URI) -> bool:
    """RFC 3261 19.1.4 URI equivalence, which decides whether a Contact refreshes a binding."""
    if a.scheme.lower() != b.scheme.lower():
        return False
    if not a.is_sip:
        return str(a) == str(b)
    if _unescaped(a.user) != _unescaped(b.user) or _unescaped(a.password) != _unescaped(
        b.password
    ):
        return False
    if a.host.lower() != b.host.lower() or a.port != b.port:
        return False
    pa, pb = _param_map(a), _param_map(b)
    for name in _MUST_MATCH_PARAMS:
        if (name in pa) != (name in pb) or pa.get(name) != pb.get(name):
            return False
    if any(pa[name] != pb[name] for name in pa.keys() & pb.keys()):
        return False
    return _header_set(a) == _header_set(b)


_UriKey = tuple[object, ...]


def _uri_key(uri: URI) -> _UriKey:
    """What every URI equal to ``uri`` under `uri_equal` shares: a dict key that finds the
    candidates in O(1); `uri_equal` then decides among them (parameters present on one side
    only may still differ)."""
    if not uri.is_sip:
        return (uri.scheme.lower(), str(uri))
    params = _param_map(uri)
    return (
        uri.scheme.lower(), _unescaped(uri.user), _unescaped(uri.password), uri.host.lower(),
        uri.port, tuple((name, name in params, params.get(name)) for name in _MUST_MATCH_PARAMS),
        frozenset(_header_set(uri)),
    )


class _ContactIndex:
    """URIs by `_uri_key`, each with what the caller keeps for it."""

    def __init__(self) -> None:
        self._by_key: dict[_UriKey, list[tuple[URI, str]]] = {}

    def add(self, uri: URI, value: str) -> None:
        self._by_key.setdefault(_uri_key(uri), []).append((uri, value))

    def find(self, uri: URI) -> str | None:
        for other, value in self._by_key.get(_uri_key(uri), ()):
            if uri_equal(other, uri):
                return value
        return None


def _delta_seconds(text: str | None) -> int | None:
    """A delta-seconds value, or None when absent or malformed."""
    if text is None:
        return None
    text = text.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    return min(int(text), _MAX_DELTA)


def _qvalue(text: str | None) -> float:
    """RFC 3261 25.1 qvalue: "0" to "1" with up to three decimals; ValueError otherwise."""
    if text is None:
        return 1.0
    whole, dot, frac = text.partition(".")
    if (
        whole not in ("0", "1")
        or len(frac) > 3
        or (frac and not (frac.isascii() and frac.isdigit()))
        or (whole == "1" and frac.strip("0"))
    ):
        raise ValueError(f"bad q value {text!r}")
    return float(whole + dot + frac) if frac else float(whole)


def _format_q(q: float) -> str:
    return f"{q:.3f}".rstrip("0").rstrip(".")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text


class _Refused(Exception):
    """A REGISTER we answer with an error; carries the response to send."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class Registrar:
    """Turns REGISTER requests into binding changes and answers them.

    ``domains`` are the domains it serves. ``own_host``, when given, says whether a host is
    an address of this machine: such hosts are served too, and all as one domain
    (:obj:`HOST_DOMAIN`), so a phone registered as ``alice@127.0.0.1`` is found by
    ``sip:alice@192.0.2.2`` when that is another address of the host: the user part is the key.
    """

    log = Logger()

    def __init__(
        self,
        location: LocationService,
        clock: IReactorTime,
        domains: list[str],
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        own_host: Callable[[str], bool] | None = None,
        max_contacts: int = 10,
    ) -> None:
        if not 0 < min_expires <= default_expires <= max_expires:
            raise ValueError(
                "need 0 < min_expires <= default_expires <= max_expires, got "
                f"{min_expires}, {default_expires}, {max_expires}"
            )
        self.location = location
        self.clock = clock
        self.domains = frozenset(format_host(d.strip().strip("[]").lower()) for d in domains)
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = default_expires
        self.own_host = own_host
        self.max_contacts = max_contacts

    # -- domain checks --------------------------------------------------------------------------

    def is_local_host(self, host: str) -> bool:
        """Whether `host` (a URI host, IPv6 with or without brackets) is one of our domains."""
        if format_host(host.strip("[]").lower()) in self.domains:
            return True
        return self._is_host_address(host)

    def _is_host_address(self, host: str) -> bool:
        """An address of this machine, served as :obj:`HOST_DOMAIN` (``own_host`` given)."""
        if self.own_host is None:
            return False
        return self.own_host(host.strip("[]").lower())

    def is_local(self, aor: str | URI) -> bool:
        """Whether an address-of-record (canonical string or URI) belongs to our domains."""
        if isinstance(aor, URI):
            return aor.is_sip and self.is_local_host(aor.host)
        host = _aor_host(aor)
        return host is not None and self.is_local_host(host)

    def aor(self, uri: URI | str) -> str:
        """The key the bindings of ``uri`` are stored under: :obj:`aor_of`, with every address of
        this host folded into :obj:`HOST_DOMAIN` when the registrar serves them (``own_host``)."""
        key = aor_of(uri)
        host = _aor_host(key)
        if host is None or format_host(host.lower()) in self.domains or \
                not self._is_host_address(host):
            return key
        user = key[4:].rpartition("@")[0]
        return f"sip:{user}@{HOST_DOMAIN}" if user else f"sip:{HOST_DOMAIN}"

    # -- REGISTER -------------------------------------------------------------------------------

    def handle_register(self, request: Request) -> Response:
        """Process one REGISTER (RFC 3261 10.3 steps 2, 5-8) and build the response to send."""
        try:
            return self._handle(request)
        except _Refused as refused:
            response = self._response(request, refused.status, refused.reason)
            for name, value in refused.headers:
                response.headers.add(name, value)
            return response
        except ParseError as e:  # a header we need is malformed (e.g. an unvalidated request)
            status = e.status if 400 <= e.status < 500 else 400
            return self._response(request, status, e.reason)

    def _handle(self, request: Request) -> Response:
        unsupported = [
            tag
            for tag in request.headers.get_all("Require")
            if tag and tag.lower() not in SUPPORTED_EXTENSIONS
        ]
        if unsupported:
            raise _Refused(420, "Bad Extension", (("Unsupported", ", ".join(unsupported)),))

        try:
            to_uri = request.to.uri
        except ParseError as e:
            raise _Refused(400, f"Bad To header: {e.reason}") from None
        if not to_uri.is_sip:
            raise _Refused(400, "To is not a SIP URI")
        if not self.is_local(to_uri):
            raise _Refused(404, "Not Found")
        aor = self.aor(to_uri)

        try:
            contacts = request.contacts
        except ParseError as e:
            raise _Refused(400, f"Bad Contact: {e.reason}") from None

        if contacts:
            header_expires = request.headers.get("Expires")
            if any(c.uri.scheme == "*" for c in contacts):
                self._unregister_all(request, aor, contacts, header_expires)
            else:
                self._update(request, aor, contacts, header_expires)
        return self._ok(request, aor)

    def _unregister_all(
        self, request: Request, aor: str, contacts: list[NameAddr], header_expires: str | None
    ) -> None:
        """``Contact: *`` with ``Expires: 0``: remove every binding (10.3 step 6)."""
        if len(contacts) != 1 or len(contacts[0].params):
            raise _Refused(400, "Contact * must be alone")
        if _delta_seconds(header_expires) != 0:
            raise _Refused(400, "Contact * requires Expires: 0")
        call_id, cseq = request.call_id, request.cseq.number
        for binding in self.location.lookup(aor):
            self._check_order(binding, call_id, cseq)
        removed = self.location.remove_all(aor)
        self.log.info("{aor}: all {n} bindings removed", aor=aor, n=len(removed))

    def _update(
        self, request: Request, aor: str, contacts: list[NameAddr], header_expires: str | None
    ) -> None:
        """Add, refresh or remove one binding per Contact (10.3 steps 6-8), all or nothing."""
        now = self.clock.seconds()
        call_id, cseq = request.call_id, request.cseq.number
        default = _delta_seconds(header_expires)
        if default is None:
            default = self.default_expires
        existing = self.location.lookup(aor)
        by_contact = {b.contact: b for b in existing}
        flows: dict[tuple[str | None, int | None], list[Binding]] = {}
        for binding in existing:
            if binding.reg_id is not None:
                flows.setdefault((binding.instance, binding.reg_id), []).append(binding)
        index = _ContactIndex()  # stored contact strings by URI
        for binding in existing:
            try:
                index.add(parse_uri(binding.contact), binding.contact)
            except ParseError:
                continue
        path = tuple(request.headers.get_all("Path"))
        user_agent = request.headers.get("User-Agent")

        # Final state per stored contact string: a new Binding, or None for "remove".
        final: dict[str, Binding | None] = {}
        matched: dict[str, Binding] = {}  # stored contact string -> the binding stored under it
        reasons: dict[str, RemovalReason] = {}
        seen = _ContactIndex()  # Contacts of this request, for duplicates within it

        for contact in contacts:
            uri = contact.uri
            if not uri.is_sip:
                raise _Refused(400, f"Unsupported Contact URI scheme {uri.scheme!r}")
            expires = _delta_seconds(contact.get_param("expires"))
            if expires is None:
                expires = default
            if 0 < expires < self.min_expires:
                raise _Refused(
                    423, "Interval Too Brief", (("Min-Expires", str(self.min_expires)),)
                )
            expires = min(expires, self.max_expires)
            try:
                q = _qvalue(contact.get_param("q"))
            except ValueError:
                raise _Refused(400, "Bad q value in Contact") from None
            instance_param = contact.get_param("+sip.instance")
            instance = _unquote(instance_param) if instance_param else None
            reg_id: int | None = None
            reg_id_param = contact.get_param("reg-id")
            if reg_id_param is not None and instance is not None:
                if not (reg_id_param.isascii() and reg_id_param.isdigit()):
                    raise _Refused(400, "Bad reg-id in Contact")
                reg_id = int(reg_id_param)

            key = seen.find(uri)
            if key is None:
                key = index.find(uri)
                if key is not None:
                    binding = by_contact[key]
                    self._check_order(binding, call_id, cseq)
                    matched[key] = binding
                else:
                    key = str(uri)
                seen.add(uri, key)

            if expires == 0:
                final[key] = None
                reasons[key] = "unregistered"
                continue
            final[key] = Binding(
                aor=aor,
                contact=str(uri),  # the spelling sent now, even if stored differently before
                expires_at=now + expires,
                q=q,
                call_id=call_id,
                cseq=cseq,
                source=request.source,
                path=path,
                instance=instance,
                reg_id=reg_id,
                user_agent=user_agent,
            )
            if reg_id is not None:
                # RFC 5626: same instance and reg-id is the same flow, re-registered elsewhere.
                for binding in flows.get((instance, reg_id), ()):
                    if binding.contact != key and binding.contact not in final:
                        self._check_order(binding, call_id, cseq)
                        final[binding.contact] = None
                        reasons[binding.contact] = "replaced"

        stored = by_contact.keys()
        kept = sum(1 for key in stored if final.get(key, by_contact[key]) is not None)
        added = sum(1 for key, new in final.items() if new is not None and key not in stored)
        if added and kept + added > self.max_contacts:
            self.log.info(
                "{aor}: refused a REGISTER from {source} for {added} new contacts: {kept} "
                "bindings already, at most {limit}", aor=aor, source=request.source,
                added=added, kept=kept, limit=self.max_contacts,
            )
            raise _Refused(403, "Too Many Registered Contacts")
        for key, new in final.items():
            if new is None and key in stored:
                self.location.remove(aor, key, reasons[key])
        for key, new in final.items():
            if new is not None:
                self.location.add_or_update(new, replaces=matched.get(key))

    @staticmethod
    def _check_order(binding: Binding, call_id: str, cseq: int) -> None:
        """10.3 step 7: same Call-ID needs a higher CSeq, or the request is out of order."""
        if binding.call_id == call_id and cseq <= binding.cseq:
            raise _Refused(500, "Out of Order")

    # -- responses ------------------------------------------------------------------------------

    def _response(self, request: Request, status: int, reason: str) -> Response:
        response = request.make_response(status, reason)
        try:
            to = response.to
        except ParseError:
            return response  # nothing to tag: the request's To was unusable
        if to.tag is None:
            to = to.copy()
            to.tag = new_tag()
            response.set_name_addr("To", to)
        return response

    def _ok(self, request: Request, aor: str) -> Response:
        """200 listing every current binding with its remaining time (10.3 step 8)."""
        now = self.clock.seconds()
        response = self._response(request, 200, "OK")
        for binding in self.location.lookup(aor):
            value = f"<{binding.contact}>;expires={max(1, int(binding.remaining(now) + 0.5))}"
            if binding.q != 1.0:
                value += f";q={_format_q(binding.q)}"
            if binding.instance is not None:
                value += f';+sip.instance="{binding.instance}"'
            if binding.reg_id is not None:
                value += f";reg-id={binding.reg_id}"
            response.headers.add("Contact", value)
        supported = {t.lower() for t in request.headers.get_all("Supported")}
        if "path" in supported:
            for hop in request.headers.get_all("Path"):
                response.headers.add("Path", hop)
        response.headers.set("Date", formatdate(now, usegmt=True))
        return response
