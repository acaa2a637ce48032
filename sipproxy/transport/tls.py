"""SIP over TLS (RFC 3261 section 26.2, RFC 5922, RFC 5626 keepalives): the transport kind.

TLS is framed like TCP (:class:`SIPTLSStreamProtocol` is a :class:`SIPStreamProtocol` under a
``TLSMemoryBIOProtocol``); what differs is the setup, here:

- A connection counts only once its handshake is complete (:attr:`SIPTLSStreamProtocol.handshake`);
  a handshake that fails fails with a :class:`TLSConnectError` that says why (``TLS to
  provider.test:5061 (127.0.0.1) failed: certificate verify failed: certificate has expired``).
  Nothing is ever sent in clear text instead.
- Outgoing connections are kept alive with RFC 5626 CRLF pings when idle; one that stops
  answering is closed (and opened again by :mod:`sipproxy.transport.tls_connections`, which
  decides which connection a message goes on).
- Certificates, keys and trust roots are loaded here with one-line errors; connection creators
  per server name come from :func:`client_creator_factory`.

Which requests go over TLS, and how the server is verified, is policy: the ``tls`` plugin
decides it and hands the transport a :class:`TLSClientPolicy` (``core.use_tls_client``).
Without one, a TLS target fails at once ("no TLS client configured").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sipproxy.message import DEFAULT_LIMITS, KeepAlive, Limits
from sipproxy.transport.endpoints import ip_address
from sipproxy.transport.tcp import SIPStreamProtocol, StreamOwner, unmapped

__all__ = [
    "PING",
    "TLS_VERSIONS",
    "SIPTLSStreamProtocol",
    "ServerCertificate",
    "TLSClientPolicy",
    "TLSConnectError",
    "client_creator_factory",
    "load_certificates",
    "load_server_certificate",
    "trust_root",
]

PING = KeepAlive.PING.value
TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}

_log = Logger(namespace="sipproxy.transport.tls")

# X509_V_ERR_* texts (OpenSSL's X509_verify_cert_error_string) for the common verify failures
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def _verify_error_text(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib  # the exact OpenSSL text when available

        text = ffi.string(lib.X509_verify_cert_error_string(errno))
        return bytes(text).decode("ascii", "replace")
    except Exception:
        return _VERIFY_ERRORS.get(errno, f"X509 verify error {errno}")


class TLSConnectError(ConnectionError):
    """A TLS connection could not be set up: ``str()`` is the one line the log and the
    caller's ``Warning`` get. ``verification`` is True when the server's certificate was the
    reason (name, expiry, unknown CA). ``logged`` is True once that line is in the log: the
    layers above (the transaction that could not be sent) do not log it again."""

    logged = False

    def __init__(
        self, host: str, port: int, server_name: str, detail: str, *, verification: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.server_name = server_name
        self.detail = detail
        self.verification = verification
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{_show_host(self.server_name)}:{self.port}"
        if self.server_name.lower() != self.host.lower():
            where += f" ({self.host})"
        return f"TLS to {where} failed: {self.detail}"


def _show_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class TLSClientPolicy:
    """How outgoing TLS connections are made (the ``tls`` plugin builds it).

    :ivar creator: the connection creator for a server name (it checks the certificate against
        that name and sends it as SNI), e.g. from :func:`client_creator_factory`.
    :ivar keepalive_interval: seconds of silence on an outgoing connection before a CRLF ping
        (RFC 5626 4.4.1); None: no pings.
    :ivar pong_timeout: seconds a ping may go unanswered before the connection counts as lost.
    :ivar reconnect: reopen an outgoing connection lost without our closing it.
    :ivar max_backoff: the longest wait between reconnect attempts (1, 2, 4 ... seconds).
    :ivar server_minimum: lowest TLS version the TLS listeners accept.
    :ivar on_failure: called with every :class:`TLSConnectError` (before the requests waiting
        for that connection fail), e.g. to tell the caller why.
    """

    creator: Callable[[str], IOpenSSLClientConnectionCreator]
    keepalive_interval: float | None = 30.0
    pong_timeout: float = 10.0
    reconnect: bool = True
    max_backoff: float = 60.0
    server_minimum: Any = TLSVersion.TLSv1_2
    on_failure: Callable[[TLSConnectError], None] | None = None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def _pem_blocks(data: bytes, label: bytes = b"CERTIFICATE") -> list[bytes]:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks = []
    start = data.find(begin)
    while start >= 0:
        stop = data.find(end, start)
        if stop < 0:
            break
        blocks.append(data[start : stop + len(end)] + b"\n")
        start = data.find(begin, stop)
    return blocks


def load_certificates(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    """Every PEM certificate in a file (a chain, a CA bundle); ValueError saying what is wrong."""
    data = _read(path, what)
    blocks = _pem_blocks(data)
    if not blocks:
        raise ValueError(f"{what} {path!r} holds no PEM certificate")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"{what} {path!r} is not a valid PEM certificate: {_brief(e)}") from None


def _brief(error: Exception) -> str:
    """cryptography's error text without its pointer to the FAQ, on one line."""
    text = re.sub(r"\. See https?://\S+ for more details\.", ":", str(error))
    return " ".join(text.split())


def trust_root(certificates: list[x509.Certificate]) -> Any:
    """A trust root (Twisted's ``IOpenSSLTrustRoot``) of exactly these CA certificates, instead
    of the system's trust store."""
    return trustRootFromCertificates(
        [Certificate(X509.from_cryptography(c)) for c in certificates]
    )


@dataclass(frozen=True)
class ServerCertificate:
    """A certificate (with its chain) and its private key, loaded and checked to match.

    The objects are ``cryptography``'s: pyOpenSSL deprecates passing its own ``X509`` and ``PKey``
    to a context."""

    certificate: x509.Certificate
    key: PrivateKeyTypes
    chain: tuple[x509.Certificate, ...] = ()

    def certificate_options(self) -> dict[str, Any]:
        """The ``CertificateOptions`` arguments that present this certificate and its chain."""
        return {
            "privateKey": self.key,
            "certificate": self.certificate,
            "extraCertChain": list(self.chain),
        }

    def options(self, minimum: Any = TLSVersion.TLSv1_2) -> CertificateOptions:
        """Server-side options (also usable as a client certificate)."""
        return CertificateOptions(raiseMinimumTo=minimum, **self.certificate_options())


def load_server_certificate(cert_path: str, key_path: str) -> ServerCertificate:
    """Load a PEM certificate chain and its key; ValueError (one line) when they are unusable."""
    certs = load_certificates(cert_path)
    key_data = _read(key_path, "key file")
    try:
        key = load_pem_private_key(key_data, password=None)
    except Exception:
        raise ValueError(f"key file {key_path!r} is not a valid unencrypted PEM private key"
                         ) from None
    loaded = ServerCertificate(certs[0], key, tuple(certs[1:]))
    try:
        # refuses a key that does not belong to the certificate
        CertificateOptions(**loaded.certificate_options()).getContext()
    except Exception:
        raise ValueError(
            f"key file {key_path!r} does not match the certificate in {cert_path!r}"
        ) from None
    return loaded


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """``verify = false``: TLS without checking the server (SNI still sent). Logged loudly."""

    def __init__(self, options: CertificateOptions, server_name: str) -> None:
        self.options = options
        self.server_name = server_name

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if ip_address(self.server_name) is None:
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        connection.set_connect_state()
        return connection


def client_creator_factory(
    *,
    ca_certificates: list[x509.Certificate] | None = None,
    client_certificate: ServerCertificate | None = None,
    minimum: Any = TLSVersion.TLSv1_2,
    verify: bool = True,
) -> Callable[[str], IOpenSSLClientConnectionCreator]:
    """Connection creators per server name: ``optionsForClientTLS`` (service_identity checks the
    name against the certificate's subjectAltName, SNI is sent) trusting ``ca_certificates``
    (default: the system's trust store), presenting ``client_certificate`` if given, refusing
    anything older than ``minimum``."""
    trust = trust_root(ca_certificates) if ca_certificates else platformTrust()
    extra: dict[str, Any] = {"raiseMinimumTo": minimum}
    if client_certificate is not None:
        extra.update(client_certificate.certificate_options())
    unverified: CertificateOptions | None = None
    if not verify:
        unverified = CertificateOptions(verify=False, **extra)
    cache: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creator(server_name: str) -> IOpenSSLClientConnectionCreator:
        name = server_name.lower()
        found = cache.get(name)
        if found is None:
            if unverified is not None:
                found = _UnverifiedCreator(unverified, name)
            else:
                found = optionsForClientTLS(
                    name, trustRoot=trust, extraCertificateOptions=extra,
                )
            if len(cache) < 1000:
                cache[name] = found
        return found

    return creator


def _verify_result(proto: SIPTLSStreamProtocol | None) -> str:
    """OpenSSL's verify result of the connection ("certificate has expired"), or ""."""
    get_handle = getattr(getattr(proto, "transport", None), "getHandle", None)
    if get_handle is None:
        return ""
    try:
        from OpenSSL._util import lib  # SSL_get_verify_result has no pyOpenSSL wrapper

        code = int(lib.SSL_get_verify_result(get_handle()._ssl))
    except Exception:
        return ""
    return _verify_error_text(code) if code else ""


def describe_failure(reason: Failure, proto: SIPTLSStreamProtocol | None) -> tuple[str, bool]:
    """(what went wrong, whether the certificate was the reason) for a failed TLS setup."""
    value = reason.value
    recorded = _verify_result(proto) if proto is not None else ""
    if proto is not None and recorded:
        proto.verify_error = recorded
    if isinstance(value, VerificationError):
        wanted = proto.server_name if proto is not None else "the server"
        return f"certificate verify failed: certificate is not for {wanted}", True
    if isinstance(value, SSL.Error):
        if recorded:
            return f"certificate verify failed: {recorded}", True
        reasons = []
        for item in value.args[0] if value.args and isinstance(value.args[0], list) else []:
            if isinstance(item, tuple) and item and item[-1]:
                reasons.append(str(item[-1]))
        text = "; ".join(reasons) or str(value) or "TLS error"
        verification = "certificate" in text
        return ("TLS handshake failed: " + text), verification
    if recorded:
        return f"certificate verify failed: {recorded}", True
    return f"connection closed during the TLS handshake ({reason.getErrorMessage()})", False


@implementer(IHandshakeListener)
class SIPTLSStreamProtocol(SIPStreamProtocol):
    """
    One SIP-over-TLS connection: framed as TCP, but it counts (is registered with the owner)
    only once the TLS handshake is done.

    :ivar handshake: fires with the protocol when the handshake completes, fails with a
        :class:`TLSConnectError` when the connection ends before.
    :ivar server_name: for an outgoing connection, the name its certificate was checked for.
    :ivar verify_error: the first certificate verify error OpenSSL reported, if any.
    :ivar established: True once the handshake completed (it stays True).
    :ivar closed_by_us: True when the proxy closed it (idle, stop): no reconnect then.
    """

    kind = "TLS"

    def __init__(
        self,
        owner: StreamOwner,
        clock: IReactorTime,
        side: str,
        *,
        outgoing: bool,
        idle_timeout: float | None,
        limits: Limits = DEFAULT_LIMITS,
        server_name: str = "",
        target: tuple[str, int] = ("", 0),
        keepalive_interval: float | None = None,
        pong_timeout: float = 10.0,
        message_timeout: float | None = None,
    ) -> None:
        super().__init__(owner, clock, side, outgoing=outgoing, idle_timeout=idle_timeout,
                         limits=limits, message_timeout=message_timeout)
        self.server_name = server_name
        self.target = target
        self.keepalive_interval = keepalive_interval
        self.pong_timeout = pong_timeout
        self.handshake: defer.Deferred[SIPTLSStreamProtocol] = defer.Deferred()
        self.handshake_done = False
        self.established = False
        self.verify_error = ""
        self.closed_by_us = False
        self.keepalive_failed = False
        self._ping: IDelayedCall | None = None
        self._pong: IDelayedCall | None = None

    # -- twisted callbacks ------------------------------------------------------------------------
    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        self.peer = (unmapped(getattr(peer, "host", "")), getattr(peer, "port", 0))
        self.local = (unmapped(getattr(host, "host", "")), getattr(host, "port", 0))
        self._arm_idle()  # a handshake that never ends is closed by the idle timer too
        # not registered yet: a connection counts once the handshake is complete

    def handshakeCompleted(self) -> None:
        if getattr(self.transport, "disconnecting", False):
            # the certificate's name did not verify (service_identity aborts the connection
            # from OpenSSL's info callback): connectionLost brings the reason
            return
        self.handshake_done = True
        self.established = True
        self.connected_ = True
        self._arm_ping()
        try:
            self.owner.stream_connected(self)
        finally:
            self.handshake.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self._alive()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_keepalive()
        if not self.handshake_done:
            host, port = self.target if self.target[0] else self.peer
            detail, verification = describe_failure(reason, self)
            error = TLSConnectError(host, port, self.server_name or host, detail,
                                    verification=verification)
            self.handshake_done = True  # no second errback
            self.handshake.errback(Failure(error))
        super().connectionLost(reason)

    # -- API --------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        super().write(data)
        self._arm_ping()

    def close(self) -> None:
        self.closed_by_us = True
        self._cancel_keepalive()
        super().close()

    # -- RFC 5626 keepalive -----------------------------------------------------------------------
    def _arm_ping(self) -> None:
        if not self.outgoing or self.keepalive_interval is None or self.closing:
            return
        if self._pong is not None:
            return  # waiting for an answer already
        if self._ping is not None and self._ping.active():
            self._ping.reset(self.keepalive_interval)
        else:
            self._ping = self.clock.callLater(self.keepalive_interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping = None
        if self.transport is None or self.closing:
            return
        self.transport.write(PING)  # not SIP traffic: the idle timer is not re-armed
        self._pong = self.clock.callLater(self.pong_timeout, self._pong_missing)

    def _alive(self) -> None:
        """Anything received proves the flow alive (a pong is just the quickest answer)."""
        if self._pong is not None:
            if self._pong.active():
                self._pong.cancel()
            self._pong = None
        if self.handshake_done:
            self._arm_ping()

    def _pong_missing(self) -> None:
        self._pong = None
        _log.info("TLS to {name}:{port} ({host}): no answer to a keepalive within {t} s; "
                  "closing the connection", name=self.server_name, port=self.peer[1],
                  host=self.peer[0], t=self.pong_timeout)
        self.keepalive_failed = True
        transport = self.transport
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif transport is not None:
            transport.loseConnection()

    def _cancel_keepalive(self) -> None:
        for call in (self._ping, self._pong):
            if call is not None and call.active():
                call.cancel()
        self._ping = self._pong = None
