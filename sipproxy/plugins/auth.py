"""Digest authentication of the local users (RFC 3261 section 22, RFC 8760): the ``auth`` plugin.

Who is challenged:

- a REGISTER whose Request-URI is one of our domains (we are the registrar): ``401`` with one
  ``WWW-Authenticate`` per algorithm (``algorithms``, SHA-256 first by default, then MD5);
  the credentials come back in ``Authorization``;
- any other new request (not in a dialog the proxy tracks, ``ctx.dialog`` is None) whose From
  is a user of our domains: ``407`` with ``Proxy-Authenticate``; credentials in
  ``Proxy-Authorization``. A request with a To tag for a dialog the proxy does not know is
  challenged too (a forged "in-dialog" request must not bypass the check).

Never challenged: ACK (it cannot be answered; CANCEL never reaches plugins), requests in a
dialog the proxy tracks, requests from ``exempt_networks``, requests whose From is another
domain (e.g. calls from the provider; in the firewall set-up the provider authenticates its
own users, and their credentials for the provider's realm pass through untouched), and
REGISTERs for other domains.

Checks, in order: credentials for our ``realm`` (others are ignored and left in the
request), Digest with ``qop=auth`` (qop-less RFC 2069 responses are refused: no nonce count,
no replay protection), an offered algorithm, the user's HA1 from the credential store
(``ICredentialStore``; the built-in one reads ``users_file``), the response digest; then, for
a nonce older than ``nonce_ttl`` or not made by this process at all (e.g. before a restart;
nonces are a stateless HMAC, see :mod:`sipproxy.digest`), a new challenge with
``stale=true``; the authenticated user must be the To user (REGISTER) or the From user (other
requests), else ``403``; and the nonce count must be greater than the last accepted for that
nonce, else the request is a replay and gets a new challenge (``stale=true``).

The digest ``uri`` is not compared with the Request-URI: user agents differ (sipp hashes
``sip:<proxy address>:<port>``), the response is verified over the uri the client hashed, and
the nonce count already keeps captured credentials from being used again.

Wrong credentials (unknown user, wrong password) get a new challenge with a fresh nonce, as
RFC 3261 22.3 says: a UA then knows its password is wrong and stops (the caller cannot tell
an unknown user from a wrong password). Failures (wrong credentials, replays, user mismatch,
malformed credentials) are counted in ``plugin.counters`` and logged at most once per source
per ``log_interval`` seconds; plain challenges and stale nonces are counted only. Failures
also spend a budget of the flood guard, like fail2ban: ``max_failures`` of them from one
source within ``window`` seconds ban it through the flood guard's ban list for ``[limits]
ban_time`` (its requests are dropped unparsed, its connections refused at accept; the ban is
logged once). A user who mistypes once is not banned; a challenge (a request without
credentials) and a stale nonce are no failures. Replays count: the nonce count of a correct
answer was used before, so it is a captured request or a broken client, and each would cost
a fresh challenge. Sources the flood guard exempts (``[limits] exempt``, loopback by default)
are never banned, and ``exempt_networks`` are never challenged at all. A request
that passes carries the user name in ``ctx.data[AUTHENTICATED_USER]`` and loses its
credentials for our realm before it is forwarded.

Config ``[auth]``: ``users_file`` (relative to the config file's directory), or ``store``
(``"package.module:callable"``, called with the core and the table ``[auth.store_config]`` as
a ``Section``, returns an ``ICredentialStore``: a database, a directory), ``realm``
(default: the first ``[proxy] domains`` entry), ``algorithms`` (default ``["SHA-256",
"MD5"]``), ``nonce_ttl`` (seconds, default 300), ``exempt_networks`` (CIDRs, default none),
``log_interval`` (seconds, default 60), ``max_failures`` (default 10; 0: no ban) and
``window`` (seconds, default 600).

``python3 -m sipproxy.plugins.auth hash USER REALM`` reads a password from stdin and prints a
line for the users file (see :mod:`sipproxy.credentials`).
"""

from __future__ import annotations

import getpass
import importlib
import ipaddress
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.context import RequestContext
from sipproxy.credentials import CredentialsFileError, FileCredentialStore, format_line
from sipproxy.digest import (
    ALGORITHMS,
    Credentials,
    DigestError,
    NonceCounts,
    NonceFactory,
    NonceState,
    challenge,
    check_fields,
    ha1,
    parse_credentials,
    verify_response,
)
from sipproxy.errors import ParseError
from sipproxy.interfaces import (
    AUTHENTICATED_USER,
    ICredentialStore,
    IPluginFactory,
    IProxyCore,
    IStatusProvider,
)
from sipproxy.message import Request, Response
from sipproxy.pipeline import Plugin
from sipproxy.refusals import RefusalLog, refusal_metrics
from sipproxy.settings import Section, network, no_control_characters, read_section, setting
from sipproxy.uri import URI, unescape

__all__ = ["AuthFactory", "AuthPlugin", "AuthSettings", "factory", "main"]

_log = Logger(namespace="sipproxy.plugins.auth")

DEFAULT_ALGORITHMS: Final = ("SHA-256", "MD5")
_NOT_CHALLENGED: Final = frozenset({"ACK", "CANCEL"})


@dataclass(frozen=True, slots=True)
class _Role:
    status: int
    reason: str
    credentials_header: str
    challenge_header: str


_REGISTRAR: Final = _Role(401, "Unauthorized", "Authorization", "WWW-Authenticate")
_PROXY: Final = _Role(407, "Proxy Authentication Required", "Proxy-Authorization",
                      "Proxy-Authenticate")


def _user_of(uri: URI) -> str | None:
    if not uri.is_sip or uri.user is None:
        return None
    return unescape(uri.user)


#: what the auth plugin counts that is an outcome, not a refusal
OUTCOMES: Final = ("auth.ok", "auth.challenged", "auth.stale")


@implementer(IStatusProvider)
class AuthPlugin(Plugin):
    """The ``auth`` plugin (see the module docstring)."""

    name = "auth"

    def __init__(
        self,
        core: IProxyCore,
        store: ICredentialStore,
        realm: str,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        nonce_ttl: float = 300.0,
        exempt_networks: Iterable[str] = (),
        log_interval: float = 60.0,
        max_nonces: int = 100_000,
        max_failures: int = 10,
        window: float = 600.0,
    ) -> None:
        self.core = core
        self.clock = core.clock
        self.store = store
        self.realm = realm
        self.algorithms = tuple(algorithms)
        self.nonce_ttl = nonce_ttl
        self.exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt_networks)
        self.nonces = NonceFactory(realm, nonce_ttl)
        self.counts = NonceCounts(nonce_ttl, max_nonces)
        self.refusals = RefusalLog(self.clock, _log, log_interval)
        #: refusals and outcomes by reason ("auth.challenged", "auth.wrong_credentials", ...)
        self.counters = self.refusals.counters
        self.max_failures = max_failures
        self.window = window

    # -- IStatusProvider ---------------------------------------------------------------------------
    def metrics(self) -> Iterable[Metric]:
        """Outcomes (ok, challenged, stale nonce) and refusals by reason."""
        outcomes = CounterMetricFamily("sipproxy_auth_outcomes", "Digest checks by outcome"
                                       " (ok, challenged, stale nonce).", labels=["outcome"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome.partition(".")[2]], self.counters.get(outcome, 0))
        refusals = {k: n for k, n in self.counters.items() if k not in OUTCOMES}
        return [outcomes, refusal_metrics(self.name, refusals)]

    def status(self) -> Mapping[str, Any]:
        """The realm, outcomes and refusals by reason."""
        return {"realm": self.realm, "counters": dict(self.counters)}

    # -- which requests ---------------------------------------------------------------------------
    def _is_exempt(self, request: Request) -> bool:
        source = request.source
        if source is None or not self.exempt:
            return False
        try:
            ip = ipaddress.ip_address(source.host.strip("[]"))
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.exempt)

    def _role_for(self, ctx: Any) -> _Role | None:
        request: Request = ctx.request
        if ctx.server_transaction is None or request.method in _NOT_CHALLENGED:
            return None
        if request.method == "REGISTER":
            if self.core.is_local_uri(request.uri):  # the core's registrar answers it
                return _REGISTRAR
            return None
        if ctx.dialog is not None:
            return None
        sender = request.from_.uri
        if sender.is_sip and self.core.is_local_domain(sender.host):
            return _PROXY
        return None

    def request_received(self, ctx: RequestContext) -> Any:
        request: Request = ctx.request
        try:
            role = self._role_for(ctx)
        except ParseError:
            return None  # the core refuses what it cannot parse
        if role is None or self._is_exempt(request):
            return None
        return self._authenticate(ctx, role)

    # -- checking ---------------------------------------------------------------------------------
    def _source_text(self, request: Request) -> str:
        source = request.source
        return f"{source.host}" if source is not None else "?"

    def _challenge(self, request: Request, role: _Role, stale: bool = False) -> Response:
        response = request.make_response(role.status, role.reason)
        nonce = self.nonces.make(self.clock.seconds(), self._source_text(request))
        for value in challenge(self.realm, nonce, self.algorithms, stale=stale):
            response.headers.add(role.challenge_header, value)
        return response

    def _refuse(
        self, request: Request, role: _Role, counter: str, why: str, user: str | None,
        status: int | None = None, reason: str = "", stale: bool = False,
    ) -> Response:
        self.refusals.refused(
            counter, self._source_text(request),
            "auth: refused {method} from {refused_source} (user {user}): {why}",
            method=request.method, user=user or "-", why=why, call_id=request.call_id,
            plugin="auth",
        )
        flood = self.core.flood
        if flood is not None and request.source is not None and flood.failed(
                request.source.host, "digest authentication", self.max_failures, self.window):
            self.counters["auth.banned"] += 1
        if status is not None:
            return request.make_response(status, reason)
        return self._challenge(request, role, stale=stale)

    def _ours(self, request: Request, role: _Role) -> list[Credentials]:
        found = []
        for value in request.headers.get_all(role.credentials_header):
            try:
                credentials = parse_credentials(value)
            except DigestError:
                continue  # not ours to judge: perhaps another realm's scheme
            if credentials.is_digest and credentials.get("realm") == self.realm:
                found.append(credentials)
        return found

    def _authenticate(self, ctx: Any, role: _Role) -> Any:
        request: Request = ctx.request
        candidates = self._ours(request, role)
        if not candidates:
            self.counters["auth.challenged"] += 1
            return self._challenge(request, role)
        offered = [c for c in candidates if c.algorithm in self.algorithms]
        credentials = (offered or candidates)[0]
        user = credentials.get("username")
        problem = check_fields(credentials, self.algorithms)
        if problem is not None:
            return self._refuse(request, role, "auth.bad_credentials", problem, user)
        assert user is not None
        now = self.clock.seconds()
        nonce = credentials.params["nonce"]
        # a nonce that is not ours (e.g. from before a restart) is judged like a stale one:
        # stale=true only if the digest is right, so the UA retries without asking its user
        state = self.nonces.check(nonce, now, self._source_text(request))
        result = self.store.ha1(user, self.realm, credentials.algorithm)
        if isinstance(result, Deferred):
            return result.addCallback(self._verify, ctx, role, credentials, state)
        return self._verify(result, ctx, role, credentials, state)

    def _verify(
        self, ha1_hex: str | None, ctx: Any, role: _Role, credentials: Credentials, state: str
    ) -> Response | None:
        request: Request = ctx.request
        user = credentials.params["username"]
        if ha1_hex is None or not verify_response(credentials, ha1_hex, request.method):
            return self._refuse(request, role, "auth.wrong_credentials",
                                "unknown user or wrong password", user)
        if state != NonceState.FRESH:
            self.counters["auth.stale"] += 1
            return self._challenge(request, role, stale=True)
        claimed = request.to.uri if role is _REGISTRAR else request.from_.uri
        if _user_of(claimed) != user:
            return self._refuse(request, role, "auth.user_mismatch",
                                f"authenticated as {user} but claims {claimed}", user, 403,
                                "Forbidden")
        nonce = credentials.params["nonce"]
        issued = self.nonces.issued_at(nonce, self._source_text(request))
        assert issued is not None
        now = self.clock.seconds()
        if not self.counts.accept(nonce, int(credentials.params["nc"], 16), issued, now):
            return self._refuse(request, role, "auth.replay",
                                f"nonce count {credentials.params['nc']} already used", user,
                                stale=True)
        self.counters["auth.ok"] += 1
        ctx.data[AUTHENTICATED_USER] = user
        if role is _PROXY:
            self._remove_own_credentials(request)
        return None

    def _remove_own_credentials(self, request: Request) -> None:
        """Our realm's credentials end here; another realm's (the provider's) go on."""
        for name in ("Proxy-Authorization", "Authorization"):
            values = request.headers.get_all(name)
            if not values:
                continue
            kept = []
            for value in values:
                try:
                    credentials = parse_credentials(value)
                except DigestError:
                    kept.append(value)
                    continue
                if not (credentials.is_digest and credentials.get("realm") == self.realm):
                    kept.append(value)
            if len(kept) != len(values):
                request.headers.remove(name)
                for value in kept:
                    request.headers.add(name, value)


def _config_relative(section: Section, path: str) -> str:
    source = section.source
    if os.path.isabs(path) or not source or source.startswith("<"):
        return path
    return os.path.join(os.path.dirname(source), path)


def _algorithm(name: str) -> str:
    canonical = next((a for a in ALGORITHMS if a.lower() == name.lower()), None)
    if canonical is None:
        raise ValueError(f'must be "SHA-256" or "MD5", got "{name}"')
    return canonical


def _callable_path(name: str) -> str:
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f'must be "package.module:callable", got "{name}"')
    return name


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``[auth]``: the realm, where the users are, what is offered and when a source is banned."""

    realm: str | None = setting(
        None, parse=no_control_characters,
        doc="Realm of the challenges; default: the first [proxy] domain (required without).")
    users_file: str | None = setting(
        None, doc='"user:realm:md5=HA1:sha-256=HA1" lines (relative to the config file);'
                  " required unless store is given.")
    store: str | None = setting(
        None, parse=_callable_path,
        doc='Another credential store: "package.module:callable" (proxy, store_config) ->'
            " ICredentialStore.")
    store_config: Mapping[str, Any] | None = setting(
        None, doc="The table passed to store: the store's own settings.")
    algorithms: tuple[str, ...] = setting(
        DEFAULT_ALGORITHMS, parse=_algorithm, unique=True, allow_empty=False,
        doc="Algorithms offered, one challenge each, in this order (RFC 8760).")
    nonce_ttl: float = setting(
        300.0, min=1.0, max=86400.0, doc="Seconds a nonce is fresh.")
    exempt_networks: tuple[str, ...] = setting(
        (), parse=network, doc="Sources never challenged (a PBX that cannot answer).")
    log_interval: float = setting(
        60.0, min=0.0, doc="One log line per refused source per this many seconds.")
    max_failures: int = setting(
        10, min=0, max=100_000,
        doc="Wrong answers from one source within window seconds that ban it (0: never).")
    window: float = setting(
        600.0, min=1.0, max=86400.0, doc="Seconds over which max_failures are counted.")


@implementer(IPluginFactory)
class AuthFactory:
    """Builds the ``auth`` plugin from ``[auth]``."""

    name = "auth"
    settings = AuthSettings

    def build(self, core: IProxyCore, section: Section) -> AuthPlugin:
        s = read_section(AuthSettings, section)
        realm = s.realm
        if realm is None:
            domains = core.config.proxy.domains
            if not domains:
                raise section.error("realm", "is required when [proxy] domains is empty")
            realm = domains[0]
        store = self._store(core, section, s, realm)
        return AuthPlugin(core, store, realm, list(s.algorithms), s.nonce_ttl,
                          s.exempt_networks, s.log_interval, max_failures=s.max_failures,
                          window=s.window)

    def _store(self, core: IProxyCore, section: Section, s: AuthSettings, realm: str) -> Any:
        if s.store is not None:
            if s.users_file is not None:
                raise section.error("users_file", "cannot be combined with store")
            module_name, _, attribute = s.store.partition(":")
            try:
                make = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as e:
                raise section.error("store", f"cannot load {s.store!r}: {e}") from None
            store = make(core, section.get_section("store_config", {}))
            if not ICredentialStore.providedBy(store):
                raise section.error("store", f"{s.store!r} returned no ICredentialStore")
            return store
        if s.users_file is None:
            raise section.error("users_file", "is required")
        path = _config_relative(section, s.users_file)
        try:
            store = FileCredentialStore.from_file(path)
        except CredentialsFileError as e:
            raise section.error("users_file", str(e)) from None
        if not any(realm == r for (_, r) in store.entries):
            _log.warn("auth: {path} has no user of realm {realm!r}: nobody can log in",
                      path=path, realm=realm)
        return store


factory: Final = AuthFactory()


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m sipproxy.plugins.auth hash USER REALM``: a users-file line from a password
    read from stdin (without echo on a terminal)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "hash":
        print("usage: python3 -m sipproxy.plugins.auth hash USER REALM  (password on stdin)",
              file=sys.stderr)
        return 2
    _, user, realm = args
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}@{realm}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 1
    try:
        line = format_line(user, realm, {a: ha1(a, user, realm, password) for a in ALGORITHMS})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
