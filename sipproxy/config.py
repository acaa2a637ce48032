"""
The proxy's configuration: a TOML file turned into typed, frozen dataclasses.

Every mistake is a L{ConfigError} whose C{str()} is one line naming the file, the key path and the
problem, so an operator sees exactly what to fix and nothing else.

The core validates only its own sections (C{proxy}, C{listen}, C{upstream}, C{registrar},
C{timers}, C{plugins}). Any other top-level table belongs to the plugin of that name: it is kept,
read-only, in L{Config.sections}, and the plugin validates it with L{Section}
(C{config.section("nat").get_int("keepalive", 30, min=0)}), so adding a plugin never means editing
this module.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, cast, overload

__all__ = [
    "CORE_SECTIONS",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "ListenConfig",
    "ProxyConfig",
    "RegistrarConfig",
    "Section",
    "TimerConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

Side = Literal["inside", "outside"]
Transport = Literal["udp", "tcp", "tls"]

CORE_SECTIONS: Final = frozenset(
    {"proxy", "listen", "upstream", "registrar", "timers", "dns", "plugins", "limits"}
)
"""Top-level names the core validates; no plugin may own a section with one of these names."""

_SIDES: Final = ("inside", "outside")
_TRANSPORTS: Final = ("udp", "tcp", "tls")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_TOML_POSITION = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)\s*\Z")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sipproxy")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


_DEFAULT_USER_AGENT: Final = f"sipproxy/{_package_version()}"


class ConfigError(Exception):
    """
    A mistake in the configuration: one line, C{<source>: <key path>: <problem>}.

    @ivar source: the file name (or C{"<string>"}), or C{None} when not known yet.
    @ivar key: the key path, e.g. C{listen[1].port} or C{nat.keepalive}; C{""} for the whole file.
    @ivar problem: what is wrong, e.g. C{must be an integer from 0 to 65535, got "abc"}.
    """

    def __init__(self, source: str | None, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = _one_line(problem)
        super().__init__(str(self))

    @classmethod
    def for_key(cls, key: str, problem: str, source: str | None = None) -> ConfigError:
        """The error for one key, in the same one-line format the core uses."""
        return cls(source, key, problem)

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        parts.append(self.problem)
        return ": ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _key_part(key: str) -> str:
    """A key as TOML would spell it in a dotted path: bare if it can be, quoted otherwise."""
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _show(value: object) -> str:
    """A value as TOML would spell it, short and on one line, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
        return text if len(text) <= 60 else "an array"
    if hasattr(value, "isoformat"):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_host(text: str) -> bool:
    """A host as it may appear in a SIP URI or Via: name, IPv4, or IPv6 (bare or bracketed)."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return False
        return True
    return _is_ip(text) or _is_hostname(text)


def _freeze(value: Any) -> Any:
    """Make a parsed TOML value read-only all the way down: tables to mappings, arrays to tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


_REQUIRED: Final = _Required()


class Section:
    """
    One table of the configuration, with typed getters that raise L{ConfigError} naming the key.

    Plugins use it to validate their own section::

        s = config.section("nat")
        s.check_no_unknown({"keepalive", "force_rport"})
        keepalive = s.get_int("keepalive", 30, min=0, max=3600)
        force_rport = s.get_bool("force_rport", True)

    A getter without a default makes the key required; a default of C{None} makes it optional
    (the getter then returns C{None} when the key is absent).

    @ivar name: the key path of this table (C{"nat"}, C{"listen[0]"}, C{"nat.stun"}); it prefixes
        every key in error messages.
    """

    def __init__(
        self, name: str, mapping: Mapping[str, Any] | None = None, source: str | None = None
    ) -> None:
        self.name = name
        self.mapping: Mapping[str, Any] = mapping if mapping is not None else MappingProxyType({})
        self.source = source

    def __repr__(self) -> str:
        return f"Section({self.name!r}, {dict(self.mapping)!r})"

    def __contains__(self, key: object) -> bool:
        return key in self.mapping

    def keys(self) -> Iterable[str]:
        return self.mapping.keys()

    def path(self, key: str) -> str:
        """The full key path of C{key}, for messages: C{nat.keepalive}, C{listen[0].port}."""
        return f"{self.name}.{_key_part(key)}" if self.name else _key_part(key)

    def error(self, key: str, problem: str) -> ConfigError:
        """The error for C{key} of this table; C{raise section.error("x", "must be ...")}."""
        return ConfigError(self.source, self.path(key), problem)

    def item_error(self, key: str, index: int, problem: str) -> ConfigError:
        """The error for element C{index} of the array C{key}: C{plugins.enabled[2]: ...}."""
        return ConfigError(self.source, f"{self.path(key)}[{index}]", problem)

    def _wrong(self, key: str, expected: str, value: object) -> ConfigError:
        return self.error(key, f"must be {expected}, got {_show(value)}")

    def _lookup(self, key: str, default: object) -> tuple[bool, Any]:
        """(found, value); raises if the key is required and absent."""
        if key in self.mapping:
            return True, self.mapping[key]
        if default is _REQUIRED:
            raise self.error(key, "is required")
        return False, default

    def check_no_unknown(self, allowed: Iterable[str]) -> None:
        """Refuse keys outside C{allowed}: a typo must not silently become a default."""
        allowed = set(allowed)
        for key in self.mapping:
            if key not in allowed:
                expected = ", ".join(sorted(allowed))
                raise self.error(key, f"unknown key (expected one of: {expected})")

    @overload
    def get_str(self, key: str, *, allow_empty: bool = ...) -> str: ...
    @overload
    def get_str(self, key: str, default: str, *, allow_empty: bool = ...) -> str: ...
    @overload
    def get_str(self, key: str, default: None, *, allow_empty: bool = ...) -> str | None: ...
    def get_str(
        self, key: str, default: object = _REQUIRED, *, allow_empty: bool = False
    ) -> str | None:
        """A string; empty strings are refused unless C{allow_empty}."""
        found, value = self._lookup(key, default)
        if not found:
            return cast("str | None", value)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        if not value and not allow_empty:
            raise self.error(key, "must not be empty")
        return value

    def get_choice(self, key: str, choices: Iterable[str], default: object = _REQUIRED) -> str:
        """One string of C{choices}."""
        options = tuple(choices)
        found, value = self._lookup(key, default)
        if not found:
            return cast(str, value)
        if not isinstance(value, str) or value not in options:
            spelled = " or ".join(json.dumps(c) for c in options)
            raise self._wrong(key, spelled, value)
        return value

    @overload
    def get_int(self, key: str, *, min: int | None = ..., max: int | None = ...) -> int: ...
    @overload
    def get_int(
        self, key: str, default: int, *, min: int | None = ..., max: int | None = ...
    ) -> int: ...
    @overload
    def get_int(
        self, key: str, default: None, *, min: int | None = ..., max: int | None = ...
    ) -> int | None: ...
    def get_int(
        self,
        key: str,
        default: object = _REQUIRED,
        *,
        min: int | None = None,
        max: int | None = None,
    ) -> int | None:
        """An integer within [C{min}, C{max}] (booleans are not integers here)."""
        found, value = self._lookup(key, default)
        if not found:
            return cast("int | None", value)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (min is not None and value < min)
            or (max is not None and value > max)
        ):
            raise self._wrong(key, "an integer" + _range_text(min, max), value)
        return value

    @overload
    def get_float(
        self,
        key: str,
        *,
        min: float | None = ...,
        max: float | None = ...,
        min_exclusive: bool = ...,
    ) -> float: ...
    @overload
    def get_float(
        self,
        key: str,
        default: float,
        *,
        min: float | None = ...,
        max: float | None = ...,
        min_exclusive: bool = ...,
    ) -> float: ...
    @overload
    def get_float(
        self,
        key: str,
        default: None,
        *,
        min: float | None = ...,
        max: float | None = ...,
        min_exclusive: bool = ...,
    ) -> float | None: ...
    def get_float(
        self,
        key: str,
        default: object = _REQUIRED,
        *,
        min: float | None = None,
        max: float | None = None,
        min_exclusive: bool = False,
    ) -> float | None:
        """
        A finite number (an integer is accepted) within [C{min}, C{max}]; with C{min_exclusive},
        within (C{min}, C{max}].
        """
        found, value = self._lookup(key, default)
        if not found:
            return cast("float | None", value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if ok and min is not None:
            ok = value > min if min_exclusive else value >= min
        if ok and max is not None:
            ok = value <= max
        if not ok:
            if min_exclusive and min is not None:
                bounds = f" > {min}" + ("" if max is None else f" and <= {max}")
            else:
                bounds = _range_text(min, max)
            raise self._wrong(key, "a number" + bounds, value)
        return float(value)

    @overload
    def get_bool(self, key: str) -> bool: ...
    @overload
    def get_bool(self, key: str, default: bool) -> bool: ...
    @overload
    def get_bool(self, key: str, default: None) -> bool | None: ...
    def get_bool(self, key: str, default: object = _REQUIRED) -> bool | None:
        """C{true} or C{false} (not 0/1, not "yes")."""
        found, value = self._lookup(key, default)
        if not found:
            return cast("bool | None", value)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def get_list_of_str(
        self,
        key: str,
        default: Iterable[str] | _Required = _REQUIRED,
        *,
        allow_empty: bool = True,
        unique: bool = False,
    ) -> tuple[str, ...]:
        """
        An array of non-empty strings, as a tuple; C{unique} refuses repeats, C{allow_empty=False}
        refuses an empty array.
        """
        found, value = self._lookup(key, default)
        if not found:
            return tuple(cast("Iterable[str]", value))
        if not isinstance(value, list | tuple):
            raise self._wrong(key, "an array of strings", value)
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.item_error(key, i, f"must be a string, got {_show(item)}")
            if not item:
                raise self.item_error(key, i, "must not be empty")
            if unique and item in seen:
                first = f"{self.path(key)}[{seen[item]}]"
                raise self.item_error(key, i, f"{_show(item)} repeats {first}")
            seen.setdefault(item, i)
        if not value and not allow_empty:
            raise self.error(key, "must not be empty")
        return tuple(value)

    def get_section(self, key: str, default: Mapping[str, Any] | None = None) -> Section:
        """A sub-table as a L{Section} whose errors name C{<this>.<key>.<subkey>}."""
        found, value = self._lookup(key, _REQUIRED if default is None else default)
        if found and not isinstance(value, Mapping):
            raise self._wrong(key, "a table", value)
        return Section(self.path(key), value, self.source)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """C{[proxy]}: what the proxy is and how it marks the messages it forwards."""

    domains: tuple[str, ...] = ()
    """Domains we are the registrar for (lower-cased); empty: we are no one's registrar
    (unless L{host_addresses})."""
    record_route: bool = True
    max_forwards: int = 70
    """Max-Forwards for requests that arrive without one."""
    user_agent: str = _DEFAULT_USER_AGENT
    """User-Agent/Server value; empty: send none."""
    host_addresses: bool | None = None
    """Every address of this host is our domain, all of them one (the user part alone names
    a user): when the config names no C{domains} (no config at all, or no such key). None:
    True exactly when C{domains} is empty."""

    max_branches: int = 10
    """Branches a request to a local user forks into at most (the highest-q bindings); the
    others are left out, with a log line (one request must not become hundreds). Also the
    dialogs one INVITE sets up at most (a 2xx with yet another To tag is dropped)."""

    def __post_init__(self) -> None:
        if self.host_addresses is None:
            object.__setattr__(self, "host_addresses", not self.domains)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """One C{[[listen]]}: a socket the proxy listens on, and which side of the edge it faces."""

    side: Side = "inside"
    transport: Transport = "udp"
    address: str = "0.0.0.0"
    """IP literal to bind (normalized: C{ipaddress} compressed form, no brackets)."""
    port: int = 5060
    advertise: str | None = None
    """Host to put in Via/Record-Route instead of C{address}."""
    certificate: str | None = None
    """TLS only: path of the PEM certificate (chain)."""
    key: str | None = None
    """TLS only: path of the PEM private key."""

    @property
    def advertised_host(self) -> str:
        """The host others should use to reach this socket."""
        return self.advertise if self.advertise is not None else self.address


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """C{[upstream]}: the provider (or next proxy) that requests for other domains go to."""

    uri: str


@dataclass(frozen=True, slots=True)
class RegistrarConfig:
    """C{[registrar]}: expiry limits for REGISTER (seconds); the store is in memory."""

    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    max_contacts: int = 10
    """Bindings one address-of-record may have; a REGISTER that would make more gets
    C{403 Too Many Registered Contacts} (refreshes and removals always pass)."""


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """C{[timers]}: RFC 3261 section 17 timer bases, in seconds."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """C{[dns]}: where RFC 3263 lookups go. C{servers=None}: the system's resolv.conf and
    /etc/hosts; an empty tuple: no DNS at all (only IP literals and [upstream] are routable)."""

    servers: tuple[tuple[str, int], ...] | None = None
    timeout: float = 5.0


_DEFAULT_BLOCKED_USER_AGENTS: Final = (
    "friendly-scanner", "sipvicious", "sipcli", "sip-scan", "sipscan", "sundayddr", "iwar",
    "vaxsipuseragent", "pplsip", "siparmyknife",
)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """C{[limits]}: flood protection and bounds on what one source may hold open
    (L{sipproxy.flood.FloodGuard}, the transports' timeouts)."""

    enabled: bool = True
    """False: no rate limit, ban, User-Agent block list, per-source limit or total at all (and
    the auth plugin's failures ban no one)."""
    messages_per_second: float = 100.0
    """Per source IP: messages (datagrams or framed stream messages, requests and responses)
    per second, sustained."""
    burst: int = 400
    """Per source IP: messages it may send at once above the sustained rate."""
    ban_time: float = 300.0
    """Seconds a source that went over the rate is ignored."""
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """CIDRs (normalized) that no per-source check applies to: the proxy's host by default; add
    the inside networks or the provider."""
    blocked_user_agents: tuple[str, ...] = _DEFAULT_BLOCKED_USER_AGENTS
    """Lower-case substrings: a request whose User-Agent contains one is dropped silently."""
    refusal_weight: int = 10
    """A refused request (blocked User-Agent, over a limit, unparsable) counts as this many
    messages toward the rate limit."""
    max_transactions_per_source: int = 500
    """Open server transactions per source IP (0: no limit); over it requests get 503."""
    max_dialogs_per_source: int = 200
    """Dialogs (calls) a source IP may have set up and not ended (0: no limit); over it new
    INVITEs from it get 503."""
    max_connections_per_source: int = 32
    """Incoming TCP/TLS connections per source IP; more are refused at accept."""
    max_connections: int = 1000
    """Incoming TCP/TLS connections in all; when they are all open, the oldest idle one that
    carries no registration or dialog is closed to make room for a new one."""
    max_transactions: int = 10_000
    """Open server transactions from sources that are not C{exempt}, in all (0: no limit);
    over it their requests get 503 (spoofed UDP sources cannot fill memory)."""
    max_dialogs: int = 5_000
    """Dialogs set up by sources that are not C{exempt}, in all (0: no limit); over it their
    new INVITEs get 503."""
    idle_timeout: float = 600.0
    """Seconds without traffic after which a TCP/TLS connection is closed (CRLF keepalives
    count as traffic only on a connection that carries a registration or a dialog)."""
    message_timeout: float = 30.0
    """Seconds a TCP/TLS peer has to finish a message it started (slow-loris); 0: no limit."""
    max_sources: int = 100_000
    """Sources tracked (and banned) at most: bounds memory under a spoofed-source flood."""
    log_interval: float = 60.0
    """Refusals are logged at most once per source per this many seconds (all are counted)."""


def _default_listen() -> tuple[ListenConfig, ...]:
    return (ListenConfig(transport="udp"), ListenConfig(transport="tcp"))


def _empty_sections() -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; C{Config()} is the built-in default."""

    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    listen: tuple[ListenConfig, ...] = field(default_factory=_default_listen)
    upstream: UpstreamConfig | None = None
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    timers: TimerConfig = field(default_factory=TimerConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    plugins: tuple[str, ...] = ()
    """Names of the enabled plugins, in pipeline order."""
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty_sections, hash=False)
    """Every top-level table the core does not own, read-only, by name: each plugin's own."""
    source: str = "<defaults>"

    def section(self, name: str) -> Section:
        """The plugin section C{name} (empty if the file has none), ready to validate."""
        return Section(name, self.sections.get(name), self.source)


def load_config(path: str | None) -> Config:
    """Read and validate the file at C{path}; C{None} gives the built-in defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read config file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, "", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    return parse_config(text, path)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML C{text}; C{source} names it in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        where = _TOML_POSITION.search(message)
        if where:
            message = message[: where.start()]
            raise ConfigError(source, where.group(1), f"invalid TOML: {message}") from None
        raise ConfigError(source, "", f"invalid TOML: {message}") from None
    return _build(doc, source)


def _build(doc: dict[str, Any], source: str) -> Config:
    root = Section("", doc, source)
    sections: dict[str, Mapping[str, Any]] = {}
    for name, value in doc.items():
        if name in CORE_SECTIONS:
            continue
        if not isinstance(value, dict):
            raise root.error(
                name, f"unknown key; a plugin's settings go in a table [{_key_part(name)}]"
            )
        sections[name] = _freeze(value)

    proxy = _proxy(_table(root, "proxy"))
    listen = _listens(root)
    upstream = _upstream(root)
    registrar = _registrar(_table(root, "registrar"))
    timers = _timers(_table(root, "timers"))
    dns = _dns(_table(root, "dns"))
    plugins = _plugins(_table(root, "plugins"), listen)
    limits = _limits(_table(root, "limits"))
    return Config(
        proxy=proxy,
        listen=listen,
        upstream=upstream,
        registrar=registrar,
        timers=timers,
        dns=dns,
        limits=limits,
        plugins=plugins,
        sections=MappingProxyType(sections),
        source=source,
    )


def _table(root: Section, name: str) -> Section:
    return root.get_section(name, {})


def _proxy(s: Section) -> ProxyConfig:
    s.check_no_unknown({"domains", "record_route", "max_forwards", "user_agent",
                        "max_branches"})
    domains = s.get_list_of_str("domains", ())
    seen: dict[str, int] = {}
    for i, domain in enumerate(domains):
        if not _is_host(domain):
            raise s.item_error("domains", i, f"must be a domain name or IP, got {_show(domain)}")
        folded = domain.lower()
        if folded in seen:
            first = f"proxy.domains[{seen[folded]}]"
            raise s.item_error("domains", i, f"{_show(domain)} repeats {first}")
        seen[folded] = i
    user_agent = s.get_str("user_agent", _DEFAULT_USER_AGENT, allow_empty=True)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user_agent):
        raise s.error("user_agent", "must not contain control characters (CR, LF, tab...)")
    return ProxyConfig(
        domains=tuple(seen),
        host_addresses="domains" not in s,
        record_route=s.get_bool("record_route", True),
        max_forwards=s.get_int("max_forwards", 70, min=1, max=255),
        max_branches=s.get_int("max_branches", 10, min=1, max=1000),
        user_agent=user_agent,
    )


def _listens(root: Section) -> tuple[ListenConfig, ...]:
    if "listen" not in root:
        return _default_listen()
    value = root.mapping["listen"]
    if not isinstance(value, list):
        raise root.error("listen", f"must be an array of tables ([[listen]]), got {_show(value)}")
    if not value:
        raise root.error("listen", "must have at least one [[listen]] entry")
    result: list[ListenConfig] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise root.item_error("listen", i, f"must be a table, got {_show(item)}")
        entry = _listen(Section(f"listen[{i}]", item, root.source))
        for j, earlier in enumerate(result):
            if _sockets_clash(earlier, entry):
                raise root.item_error(
                    "listen",
                    i,
                    f"{entry.transport} {entry.address} port {entry.port} clashes with"
                    f" listen[{j}] ({earlier.transport} {earlier.address} port {earlier.port})",
                )
        result.append(entry)
    return tuple(result)


def _sockets_clash(a: ListenConfig, b: ListenConfig) -> bool:
    """
    Whether binding both would fail: same port and socket type (TCP and TLS are both stream
    sockets), and the same address or a wildcard covering the other (C{::} is dual-stack).
    """
    if a.port != b.port or (a.transport == "udp") != (b.transport == "udp"):
        return False
    if a.address == b.address:
        return True
    ip_a, ip_b = ipaddress.ip_address(a.address), ipaddress.ip_address(b.address)
    for wild, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if wild.is_unspecified and (wild.version == other.version or wild.version == 6):
            return True
    return False


def _listen(s: Section) -> ListenConfig:
    s.check_no_unknown({"side", "transport", "address", "port", "advertise", "certificate", "key"})
    side = cast(Side, s.get_choice("side", _SIDES, "inside"))
    transport = cast(Transport, s.get_choice("transport", _TRANSPORTS, "udp"))
    address = s.get_str("address", "0.0.0.0")
    try:
        address = ipaddress.ip_address(address).compressed
    except ValueError:
        raise s.error("address", f"must be an IPv4 or IPv6 address, got {_show(address)}") from None
    # 0 = any free port (tests, embedding); the bound port is on the listener after start
    port = s.get_int("port", 5061 if transport == "tls" else 5060, min=0, max=65535)
    advertise = s.get_str("advertise", None)
    if advertise is not None and not _is_host(advertise):
        raise s.error("advertise", f"must be a host name or IP address, got {_show(advertise)}")
    certificate = s.get_str("certificate", None)
    key = s.get_str("key", None)
    if transport == "tls":
        if certificate is None:
            raise s.error("certificate", 'is required with transport = "tls"')
        if key is None:
            raise s.error("key", 'is required with transport = "tls"')
    else:
        for name in ("certificate", "key"):
            if name in s:
                raise s.error(name, 'is only valid with transport = "tls"')
    return ListenConfig(
        side=side,
        transport=transport,
        address=address,
        port=port,
        advertise=advertise,
        certificate=certificate,
        key=key,
    )


def _upstream(root: Section) -> UpstreamConfig | None:
    if "upstream" not in root:
        return None
    s = root.get_section("upstream")
    s.check_no_unknown({"uri"})
    uri = s.get_str("uri")
    problem = _uri_problem(uri)
    if problem:
        raise s.error("uri", f"{problem}, got {_show(uri)}")
    return UpstreamConfig(uri=uri)


def _uri_problem(uri: str) -> str | None:
    """Why C{uri} is no usable SIP URI, or C{None}; uses sipproxy.uri when it is there."""
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        return "must be a sip: or sips: URI"
    hostport = rest.rpartition("@")[2]
    hostport = re.split(r"[;?]", hostport, maxsplit=1)[0]
    if hostport.startswith("["):
        host = hostport[: hostport.find("]") + 1]
    else:
        host = hostport.partition(":")[0]
    if not host or not _is_host(host):
        return "must name a host (sip:host[:port][;params])"
    try:
        from importlib import import_module

        parse_uri = import_module("sipproxy.uri").parse_uri
    except (ImportError, AttributeError):
        return None
    try:
        parsed = parse_uri(uri)
    except Exception as e:
        return f"is not a valid SIP URI ({_one_line(str(e)) or type(e).__name__})"
    transport = parsed.get_param("transport")
    if transport is not None and transport.lower() not in _TRANSPORTS:
        return "must have ;transport=udp, tcp or tls (or none)"
    return None


def _registrar(s: Section) -> RegistrarConfig:
    s.check_no_unknown({"min_expires", "max_expires", "default_expires", "max_contacts"})
    lo = s.get_int("min_expires", 60, min=0)
    hi = s.get_int("max_expires", 3600, min=0)
    default = s.get_int("default_expires", 3600, min=0)
    if lo > hi:
        raise s.error("min_expires", f"must not exceed max_expires ({hi}), got {lo}")
    if not lo <= default <= hi:
        raise s.error(
            "default_expires",
            f"must be from min_expires ({lo}) to max_expires ({hi}), got {default}",
        )
    return RegistrarConfig(min_expires=lo, max_expires=hi, default_expires=default,
                           max_contacts=s.get_int("max_contacts", 10, min=1, max=1000))


def _timers(s: Section) -> TimerConfig:
    s.check_no_unknown({"t1", "t2", "t4"})
    t1 = s.get_float("t1", 0.5, min=0, min_exclusive=True)
    t2 = s.get_float("t2", 4.0, min=0, min_exclusive=True)
    t4 = s.get_float("t4", 5.0, min=0, min_exclusive=True)
    if t2 < t1:
        raise s.error("t2", f"must not be less than t1 ({t1}), got {t2}")
    return TimerConfig(t1=t1, t2=t2, t4=t4)


def _dns(s: Section) -> DnsConfig:
    s.check_no_unknown({"servers", "timeout"})
    timeout = s.get_float("timeout", 5.0, min=0, min_exclusive=True)
    if "servers" not in s.mapping:
        return DnsConfig(None, timeout)
    servers = []
    for i, text in enumerate(s.get_list_of_str("servers", ())):
        host, port = text, 53
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise s.item_error("servers", i, f"bad port in {_show(text)}")
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            if not port_text.isdigit():
                raise s.item_error("servers", i, f"bad port in {_show(text)}")
            port = int(port_text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise s.item_error(
                "servers", i, f"must be an IP address with an optional port, got {_show(text)}"
            ) from None
        if not 0 < port < 65536:
            raise s.item_error("servers", i, f"port must be from 1 to 65535, got {port}")
        servers.append((host, port))
    return DnsConfig(tuple(servers), timeout)


def _plugins(s: Section, listen: tuple[ListenConfig, ...]) -> tuple[str, ...]:
    """The pipeline. A proxy with a socket on the outside is never an open relay: ``acl``
    (requests from the outside reach only local users and known dialogs) runs first unless the
    list places it itself, or ``open_relay = true`` says the operator wants none."""
    s.check_no_unknown({"enabled", "open_relay"})
    names = s.get_list_of_str("enabled", (), unique=True)
    for i, name in enumerate(names):
        if name in CORE_SECTIONS:
            raise s.item_error(
                "enabled", i, f"{_show(name)} is a core section name; no plugin may use it"
            )
    open_relay = s.get_bool("open_relay", False)
    if not open_relay and "acl" not in names and any(lc.side == "outside" for lc in listen):
        names = ("acl", *names)
    return names


_LIMIT_KEYS: Final = frozenset(LimitsConfig.__dataclass_fields__)


def _limits(s: Section) -> LimitsConfig:
    s.check_no_unknown(_LIMIT_KEYS)
    d = LimitsConfig()
    exempt = []
    for i, text in enumerate(s.get_list_of_str("exempt", d.exempt)):
        try:
            exempt.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise s.item_error(
                "exempt", i, f"must be an IP address or network (CIDR), got {_show(text)}"
            ) from None
    agents = tuple(a.lower() for a in s.get_list_of_str("blocked_user_agents",
                                                         d.blocked_user_agents))
    return LimitsConfig(
        enabled=s.get_bool("enabled", d.enabled),
        messages_per_second=s.get_float("messages_per_second", d.messages_per_second, min=0,
                                        min_exclusive=True),
        burst=s.get_int("burst", d.burst, min=1),
        ban_time=s.get_float("ban_time", d.ban_time, min=0, min_exclusive=True),
        exempt=tuple(exempt),
        blocked_user_agents=agents,
        refusal_weight=s.get_int("refusal_weight", d.refusal_weight, min=0),
        max_transactions_per_source=s.get_int(
            "max_transactions_per_source", d.max_transactions_per_source, min=0),
        max_dialogs_per_source=s.get_int(
            "max_dialogs_per_source", d.max_dialogs_per_source, min=0),
        max_connections_per_source=s.get_int(
            "max_connections_per_source", d.max_connections_per_source, min=1),
        max_connections=s.get_int("max_connections", d.max_connections, min=1),
        max_transactions=s.get_int("max_transactions", d.max_transactions, min=0),
        max_dialogs=s.get_int("max_dialogs", d.max_dialogs, min=0),
        idle_timeout=s.get_float("idle_timeout", d.idle_timeout, min=0, min_exclusive=True),
        message_timeout=s.get_float("message_timeout", d.message_timeout, min=0),
        max_sources=s.get_int("max_sources", d.max_sources, min=1),
        log_interval=s.get_float("log_interval", d.log_interval, min=0),
    )
