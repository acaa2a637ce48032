"""
The proxy's configuration: a TOML file turned into typed, frozen dataclasses.

Every mistake is a :class:`ConfigError` whose ``str()`` is one line naming the file, the key
path and the problem, so an operator sees exactly what to fix and nothing else.

Each core table (``proxy``, ``listen``, ``upstream``, ``registrar``, ``timers``, ``dns``,
``plugins``, ``limits``, ``log``) is a frozen dataclass whose fields are declared once, with their
defaults, bounds and docs, by :func:`sipproxy.settings.setting`, and read by
:func:`sipproxy.settings.read_section`; the loaders here add only what involves two keys. Any
other top-level table belongs to the plugin of that name: it is kept, read-only, in
:attr:`Config.sections`, and the plugin reads it the same way
(``read_section(NatSettings, config.section("nat"))``), so adding a plugin never means editing
this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from sipproxy.addressing import is_ip_literal
from sipproxy.flood import LimitsConfig
from sipproxy.settings import (
    ConfigError,
    Section,
    ip_address,
    key_part,
    no_control_characters,
    one_line,
    read_section,
    setting,
    show,
)

__all__ = [
    "CORE_SECTIONS",
    "MEMORY_STORE",
    "SQLITE_STORE",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "PluginsConfig",
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
    {"proxy", "listen", "upstream", "registrar", "timers", "dns", "plugins", "limits", "log",
     "admin"}
)
"""Top-level names the core validates; no plugin may own a section with one of these names."""

_TRANSPORTS: Final = ("udp", "tcp", "tls")
#: ``[registrar] store`` of the default store: nothing survives a restart
MEMORY_STORE: Final = "memory"
#: ``[registrar] store`` prefix of an SQLite file: ``"sqlite:/var/lib/sipproxy/state.db"``
SQLITE_STORE: Final = "sqlite:"
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_TOML_POSITION = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)\s*\Z")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sipproxy")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


_DEFAULT_USER_AGENT: Final = f"sipproxy/{_package_version()}"


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


def _is_host(text: str) -> bool:
    """A host as it may appear in a SIP URI or Via: name, IPv4, or IPv6 (bare or bracketed)."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return False
        return True
    return is_ip_literal(text) or _is_hostname(text)


def _freeze(value: Any) -> Any:
    """Make a parsed TOML value read-only all the way down: tables to mappings, arrays to tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# -- parsers of single values (raise ValueError with the problem) -----------------------------


def _domain(text: str) -> str:
    if not _is_host(text):
        raise ValueError(f"must be a domain name or IP, got {show(text)}")
    return text.lower()


def _host(text: str) -> str:
    if not _is_host(text):
        raise ValueError(f"must be a host name or IP address, got {show(text)}")
    return text


def _sip_uri(uri: str) -> str:
    problem = _uri_problem(uri)
    if problem:
        raise ValueError(f"{problem}, got {show(uri)}")
    return uri


def _uri_problem(uri: str) -> str | None:
    """Why ``uri`` is no usable SIP URI, or ``None``; uses sipproxy.uri when it is there."""
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
        return f"is not a valid SIP URI ({one_line(str(e)) or type(e).__name__})"
    transport = parsed.get_param("transport")
    if transport is not None and transport.lower() not in _TRANSPORTS:
        return "must have ;transport=udp, tcp or tls (or none)"
    return None


def _store(text: str) -> str:
    if text == MEMORY_STORE or (
            text.startswith(SQLITE_STORE) and text[len(SQLITE_STORE):].strip()):
        return text
    raise ValueError(f'must be "memory" or "sqlite:PATH", got {show(text)}')


def _dns_server(text: str) -> tuple[str, int]:
    """``ADDRESS``, ``ADDRESS:PORT`` or ``[IPv6]:PORT`` as (address, port)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"bad port in {show(text)}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port in {show(text)}")
        port = int(port_text)
    if not is_ip_literal(host):
        raise ValueError(f"must be an IP address with an optional port, got {show(text)}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be from 1 to 65535, got {port}")
    return host, port


def _plugin_name(name: str) -> str:
    if name in CORE_SECTIONS:
        raise ValueError(f"{show(name)} is a core section name; no plugin may use it")
    return name


# -- the tables ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """``[proxy]``: what the proxy is and how it marks the messages it forwards."""

    domains: tuple[str, ...] = setting(
        (), unique=True, parse=_domain,
        doc="Domains we are the registrar for (lower-cased); empty: we are no one's registrar"
            " (unless host_addresses).")
    record_route: bool = setting(
        True, doc="Stay in the signalling path of the dialogs we set up.")
    max_forwards: int = setting(
        70, min=1, max=255, doc="Max-Forwards for requests that arrive without one.")
    user_agent: str = setting(
        _DEFAULT_USER_AGENT, allow_empty=True, parse=no_control_characters,
        doc='User-Agent/Server value; "" sends none.')
    host_addresses: bool | None = None
    """Every address of this host is our domain, all of them one (the user part alone names
    a user): when the config names no ``domains`` (no config at all, or no such key). None:
    True exactly when ``domains`` is empty."""
    max_branches: int = setting(
        10, min=1, max=1000,
        doc="Branches a request to a local user forks into at most (the highest-q bindings),"
            " and dialogs one INVITE sets up at most.")

    def __post_init__(self) -> None:
        if self.host_addresses is None:
            object.__setattr__(self, "host_addresses", not self.domains)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """One ``[[listen]]``: a socket the proxy listens on, and which side of the edge it faces."""

    side: Side = setting("inside", doc="Which side of the edge the socket faces.")
    transport: Transport = setting("udp", doc="udp, tcp or tls.")
    address: str = setting(
        "0.0.0.0", parse=ip_address,
        doc="IP literal to bind (kept in ipaddress's compressed form, no brackets).")
    port: int = setting(
        5060, min=0, max=65535, doc="Port to bind: default 5060 (5061 for tls); 0: any free one.")
    advertise: str | None = setting(
        None, parse=_host, doc="Host to put in Via/Record-Route instead of address.")
    certificate: str | None = setting(
        None, doc="TLS only (and required): path of the PEM certificate (chain).")
    key: str | None = setting(None, doc="TLS only (and required): path of the PEM private key.")

    @property
    def advertised_host(self) -> str:
        """The host others should use to reach this socket."""
        return self.advertise if self.advertise is not None else self.address


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``[upstream]``: the provider (or next proxy) that requests for other domains go to."""

    uri: str = setting(parse=_sip_uri, doc="A sip: or sips: URI; ;transport= picks udp, tcp, tls.")
    side: Side | None = setting(
        None, doc="The side whose listener requests to the upstream leave from; default: the"
                  " side whose interface the kernel routes the upstream through.")


@dataclass(frozen=True, slots=True)
class RegistrarConfig:
    """``[registrar]``: expiry limits for REGISTER (seconds), and where state that must
    survive a restart is kept."""

    min_expires: int = setting(60, min=0, doc="Shortest Expires accepted (423 below it).")
    max_expires: int = setting(3600, min=0, doc="Longest Expires granted.")
    default_expires: int = setting(3600, min=0, doc="Expires of a REGISTER that names none.")
    max_contacts: int = setting(
        10, min=1, max=1000,
        doc="Bindings one address-of-record may have; a REGISTER that would make more gets"
            " 403 Too Many Registered Contacts (refreshes and removals always pass).")
    store: str = setting(
        MEMORY_STORE, parse=_store,
        doc='"memory": bindings, nat registration tokens and bans are lost on restart;'
            ' "sqlite:PATH": kept in that SQLite file (created if missing) and restored at'
            ' start.')


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """``[timers]``: RFC 3261 section 17 timer bases, in seconds."""

    t1: float = setting(0.5, min=0, min_exclusive=True, doc="Round-trip time estimate.")
    t2: float = setting(4.0, min=0, min_exclusive=True, doc="Retransmit interval cap; >= t1.")
    t4: float = setting(5.0, min=0, min_exclusive=True, doc="Time a message lives in the network.")


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[dns]``: where RFC 3263 lookups go."""

    servers: tuple[tuple[str, int], ...] | None = setting(
        None, parse=_dns_server,
        doc='"ADDRESS", "ADDRESS:PORT" or "[IPv6]:PORT"; absent: the system\'s resolv.conf and'
            " /etc/hosts; []: no DNS at all (only IP literals and [upstream] are routable).")
    timeout: float = setting(5.0, min=0, min_exclusive=True, doc="Seconds per lookup.")


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """``[plugins]``: which plugins run; :attr:`Config.plugins` is the resulting pipeline."""

    enabled: tuple[str, ...] = setting(
        (), unique=True, parse=_plugin_name,
        doc='Plugins to run, in pipeline order: built-in names, entry points or'
            ' "package.module:factory".')
    open_relay: bool = setting(
        False, doc="No plugin runs by itself (acl, implied by a listener facing the outside):"
                   " only for a proxy meant to relay for anyone.")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the HTTP listener for operators: ``/metrics`` (Prometheus), ``/api/...``
    (JSON) and the status page."""

    enabled: bool = setting(True, doc="Serve the admin listener.")
    address: str = setting(
        "127.0.0.1", parse=ip_address,
        doc="IP literal to bind; any address but a loopback one requires token.")
    port: int = setting(8080, min=0, max=65535, doc="TCP port to bind; 0: any free one.")
    token: str | None = setting(
        None, parse=no_control_characters,
        doc="Secret every request must carry: 'Authorization: Bearer TOKEN', or basic auth"
            " with TOKEN as the password (any user name).")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: how the proxy's log (what ``twistd``/``twist`` writes) is written."""

    format: Literal["text", "json"] = setting(
        "text",
        doc='"text": twistd\'s own lines; "json": one JSON object per line (time, level,'
            " namespace, text, and call_id, source, plugin when the event has them), for jq"
            " and log shippers.")


def _default_listen() -> tuple[ListenConfig, ...]:
    return (ListenConfig(transport="udp"), ListenConfig(transport="tcp"))


def _empty_sections() -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``Config()`` is the built-in default."""

    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    listen: tuple[ListenConfig, ...] = field(default_factory=_default_listen)
    upstream: UpstreamConfig | None = None
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    timers: TimerConfig = field(default_factory=TimerConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: tuple[str, ...] = ()
    """Names of the plugins that run, in pipeline order: the implied ones (see
    :func:`sipproxy.pipeline.implied_plugins`), then ``[plugins] enabled``."""
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty_sections, hash=False)
    """Every top-level table the core does not own, read-only, by name: each plugin's own."""
    source: str = "<defaults>"

    def section(self, name: str) -> Section:
        """The plugin section ``name`` (empty if the file has none), ready to validate."""
        return Section(name, self.sections.get(name), self.source)


def load_config(path: str | None) -> Config:
    """Read and validate the file at ``path``; ``None`` gives the built-in defaults."""
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
    """Validate TOML ``text``; ``source`` names it in error messages."""
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
                name, f"unknown key; a plugin's settings go in a table [{key_part(name)}]"
            )
        sections[name] = _freeze(value)

    proxy = _proxy(_table(root, "proxy"))
    listen = _listens(root)
    upstream = _upstream(root, listen)
    registrar = _registrar(_table(root, "registrar"))
    timers = _timers(_table(root, "timers"))
    dns = read_section(DnsConfig, _table(root, "dns"))
    plugins = read_section(PluginsConfig, _table(root, "plugins"))
    limits = read_section(LimitsConfig, _table(root, "limits"))
    admin = _admin(_table(root, "admin"))
    log = read_section(LogConfig, _table(root, "log"))
    config = Config(
        proxy=proxy,
        listen=listen,
        upstream=upstream,
        registrar=registrar,
        timers=timers,
        dns=dns,
        limits=limits,
        admin=admin,
        log=log,
        plugins=plugins.enabled,
        sections=MappingProxyType(sections),
        source=source,
    )
    if plugins.open_relay:
        return config
    from sipproxy.pipeline import implied_plugins  # the pipeline finds plugins (it imports us)

    implied = implied_plugins(config)
    return dataclasses.replace(config, plugins=(*implied, *plugins.enabled)) if implied else config


def _table(root: Section, name: str) -> Section:
    return root.get_section(name, {})


def _proxy(s: Section) -> ProxyConfig:
    return read_section(ProxyConfig, s, host_addresses="domains" not in s)


def _listens(root: Section) -> tuple[ListenConfig, ...]:
    if "listen" not in root:
        return _default_listen()
    value = root.mapping["listen"]
    if not isinstance(value, list):
        raise root.error("listen", f"must be an array of tables ([[listen]]), got {show(value)}")
    if not value:
        raise root.error("listen", "must have at least one [[listen]] entry")
    result: list[ListenConfig] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise root.item_error("listen", i, f"must be a table, got {show(item)}")
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
    sockets), and the same address or a wildcard covering the other (``::`` is dual-stack).
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
    entry = read_section(ListenConfig, s)
    if entry.transport == "tls":
        for name in ("certificate", "key"):
            if name not in s:
                raise s.error(name, 'is required with transport = "tls"')
        if "port" not in s:
            entry = dataclasses.replace(entry, port=5061)
    else:
        for name in ("certificate", "key"):
            if name in s:
                raise s.error(name, 'is only valid with transport = "tls"')
    return entry


def _upstream(root: Section, listen: tuple[ListenConfig, ...]) -> UpstreamConfig | None:
    if "upstream" not in root:
        return None
    s = root.get_section("upstream")
    upstream = read_section(UpstreamConfig, s)
    if upstream.side is not None and all(lc.side != upstream.side for lc in listen):
        raise s.error("side", f'no listener has side = "{upstream.side}"')
    return upstream


def _registrar(s: Section) -> RegistrarConfig:
    r = read_section(RegistrarConfig, s)
    if r.min_expires > r.max_expires:
        raise s.error("min_expires",
                      f"must not exceed max_expires ({r.max_expires}), got {r.min_expires}")
    if not r.min_expires <= r.default_expires <= r.max_expires:
        raise s.error(
            "default_expires",
            f"must be from min_expires ({r.min_expires}) to max_expires ({r.max_expires}),"
            f" got {r.default_expires}",
        )
    return r


def _admin(s: Section) -> AdminConfig:
    admin = read_section(AdminConfig, s)
    if admin.token == "":
        raise s.error("token", "must not be empty")
    loopback = ipaddress.ip_address(admin.address).is_loopback
    if admin.enabled and admin.token is None and not loopback:
        raise s.error("token", f"is required to listen on {admin.address}, which is not a"
                               " loopback address (anyone who reaches it would see every call)")
    return admin


def _timers(s: Section) -> TimerConfig:
    t = read_section(TimerConfig, s)
    if t.t2 < t.t1:
        raise s.error("t2", f"must not be less than t1 ({t.t1}), got {t.t2}")
    return t
