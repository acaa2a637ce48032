"""Tests for sipproxy.config: defaults, every validation message, plugin sections, Section API."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipproxy.config import (
    CORE_SECTIONS,
    AdminConfig,
    Config,
    ConfigError,
    DnsConfig,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    PluginsConfig,
    ProxyConfig,
    RegistrarConfig,
    Section,
    TimerConfig,
    UpstreamConfig,
    load_config,
    parse_config,
)
from sipproxy.settings import settings_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sipproxy.toml"
SRC = "sipproxy.toml"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- defaults


def test_no_file_gives_builtin_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.listen == (
        ListenConfig(side="inside", transport="udp", address="0.0.0.0", port=5060),
        ListenConfig(side="inside", transport="tcp", address="0.0.0.0", port=5060),
    )
    assert config.upstream is None
    assert config.plugins == ()
    assert dict(config.sections) == {}
    assert config.proxy == ProxyConfig()
    assert config.proxy.domains == ()
    assert config.proxy.host_addresses  # every address of the host is our domain
    assert config.proxy.record_route is True
    assert config.proxy.max_forwards == 70
    assert config.proxy.user_agent.startswith("sipproxy/")
    assert config.registrar == RegistrarConfig(60, 3600, 3600)
    assert config.timers == TimerConfig(0.5, 4.0, 5.0)


def test_named_domains_end_the_host_addresses_default() -> None:
    """domains = [] says "no registrar" (a firewall whose provider is the registrar); any
    named domain replaces the host's addresses; a [proxy] without the key keeps them."""
    assert not parse_config('[proxy]\ndomains = []\n').proxy.host_addresses
    assert not parse_config('[proxy]\ndomains = ["lan.example"]\n').proxy.host_addresses
    assert parse_config('[proxy]\nmax_forwards = 20\n').proxy.host_addresses


def test_empty_file_is_the_defaults_with_its_source() -> None:
    config = parse_config("", SRC)
    assert dataclasses.replace(config, source="<defaults>") == Config()
    assert config.source == SRC


def test_listen_defaults_per_entry() -> None:
    config = parse_config('[[listen]]\n[[listen]]\ntransport = "tls"\ncertificate = "c"\nkey = "k"')
    udp, tls = config.listen
    assert udp == ListenConfig()
    assert (tls.side, tls.address, tls.port) == ("inside", "0.0.0.0", 5061)
    assert (tls.certificate, tls.key) == ("c", "k")
    assert udp.advertised_host == "0.0.0.0"


def test_full_values_are_typed_and_normalized() -> None:
    config = parse_config(
        """
        [proxy]
        domains = ["LAN.Example", "192.0.2.1"]
        record_route = false
        max_forwards = 255
        user_agent = ""
        [[listen]]
        side = "outside"
        transport = "tcp"
        address = "2001:DB8:0::1"
        port = 65535
        advertise = "[2001:db8::2]"
        [upstream]
        uri = "sips:provider.example:5061"
        [registrar]
        min_expires = 0
        max_expires = 0
        default_expires = 0
        [timers]
        t1 = 1
        t2 = 1
        t4 = 0.25
        [plugins]
        enabled = ["nat", "media"]
        """
    )
    assert config.proxy == ProxyConfig(("lan.example", "192.0.2.1"), False, 255, "")
    (entry,) = config.listen
    assert entry == ListenConfig("outside", "tcp", "2001:db8::1", 65535, "[2001:db8::2]")
    assert entry.advertised_host == "[2001:db8::2]"
    assert config.upstream == UpstreamConfig("sips:provider.example:5061")
    assert config.registrar == RegistrarConfig(0, 0, 0)
    assert config.timers == TimerConfig(1.0, 1.0, 0.25)
    assert type(config.timers.t1) is float
    assert config.plugins == ("acl", "nat", "media")  # an outside socket: never an open relay


def test_config_is_frozen() -> None:
    config = parse_config("[nat]\nports = [1, 2]\n[nat.inner]\nx = 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.plugins = ("x",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.proxy.max_forwards = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.sections["nat"]["ports"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        config.sections["other"] = {}  # type: ignore[index]
    assert config.sections["nat"]["ports"] == (1, 2)
    with pytest.raises(TypeError):
        config.sections["nat"]["inner"]["x"] = 2


def test_example_file_loads() -> None:
    config = load_config(str(EXAMPLE))
    assert config.source == str(EXAMPLE)
    assert config.proxy.domains == ("lan.example",)
    assert [(entry.side, entry.transport) for entry in config.listen] == [
        ("inside", "udp"),
        ("inside", "tcp"),
        ("outside", "udp"),
    ]
    assert config.listen[2].advertised_host == "203.0.113.10"
    assert config.upstream is not None
    assert config.upstream.uri.startswith("sip:sip.provider.example")


# ---------------------------------------------------------------- plugin sections


def test_other_tables_pass_through_unvalidated() -> None:
    config = parse_config(
        """
        [plugins]
        enabled = ["nat"]
        [nat]
        keepalive = 30
        anything = ["goes", 1, true]
        [media]
        ports = { low = 30000, high = 40000 }
        [myplugin.deep]
        key = "value"
        """
    )
    assert set(config.sections) == {"nat", "media", "myplugin"}
    assert config.sections["nat"] == {"keepalive": 30, "anything": ("goes", 1, True)}
    assert config.sections["media"]["ports"] == {"low": 30000, "high": 40000}
    assert config.sections["myplugin"]["deep"] == {"key": "value"}
    assert isinstance(config.sections, MappingProxyType)
    # Sections are kept whether or not their plugin is enabled: enabling is the pipeline's job.
    assert config.plugins == ("nat",)


def test_config_section_helper() -> None:
    config = parse_config("[nat]\nkeepalive = 30", SRC)
    nat = config.section("nat")
    assert nat.get_int("keepalive", 0, min=0) == 30
    assert nat.source == SRC
    with pytest.raises(ConfigError) as info:
        nat.get_bool("keepalive")
    assert str(info.value) == "sipproxy.toml: nat.keepalive: must be true or false, got 30"
    missing = config.section("media")
    assert missing.get_int("port", 7) == 7
    assert list(missing.keys()) == []


# ---------------------------------------------------------------- every validation message


CASES = [
    # top level
    ("x = 1", "x: unknown key; a plugin's settings go in a table [x]"),
    ('"a b" = 1', '"a b": unknown key; a plugin\'s settings go in a table ["a b"]'),
    # [proxy]
    ("proxy = 1", "proxy: must be a table, got 1"),
    (
        "[proxy]\ndomain = []",
        "proxy.domain: unknown key (expected one of: domains, max_branches, max_forwards,"
        " record_route, user_agent)",
    ),
    ("[proxy]\nmax_branches = 0", "proxy.max_branches: must be an integer from 1 to 1000, got 0"),
    ('[proxy]\ndomains = "lan"', 'proxy.domains: must be an array of strings, got "lan"'),
    ("[proxy]\ndomains = [1]", "proxy.domains[0]: must be a string, got 1"),
    ('[proxy]\ndomains = ["a", ""]', "proxy.domains[1]: must not be empty"),
    ('[proxy]\ndomains = ["a b"]', 'proxy.domains[0]: must be a domain name or IP, got "a b"'),
    (
        '[proxy]\ndomains = ["-a.example"]',
        'proxy.domains[0]: must be a domain name or IP, got "-a.example"',
    ),
    (
        '[proxy]\ndomains = ["A.example", "a.example"]',
        'proxy.domains[1]: "a.example" repeats proxy.domains[0]',
    ),
    ("[proxy]\nrecord_route = 1", "proxy.record_route: must be true or false, got 1"),
    ('[proxy]\nrecord_route = "yes"', 'proxy.record_route: must be true or false, got "yes"'),
    ("[proxy]\nmax_forwards = 0", "proxy.max_forwards: must be an integer from 1 to 255, got 0"),
    (
        "[proxy]\nmax_forwards = 256",
        "proxy.max_forwards: must be an integer from 1 to 255, got 256",
    ),
    (
        '[proxy]\nmax_forwards = "70"',
        'proxy.max_forwards: must be an integer from 1 to 255, got "70"',
    ),
    (
        "[proxy]\nmax_forwards = true",
        "proxy.max_forwards: must be an integer from 1 to 255, got true",
    ),
    (
        "[proxy]\nmax_forwards = 70.0",
        "proxy.max_forwards: must be an integer from 1 to 255, got 70.0",
    ),
    ("[proxy]\nuser_agent = 5", "proxy.user_agent: must be a string, got 5"),
    (
        '[proxy]\nuser_agent = "a\\r\\nX-Injected: 1"',
        "proxy.user_agent: must not contain control characters (CR, LF, tab...)",
    ),
    # [[listen]]
    ("[listen]\nport = 5060", "listen: must be an array of tables ([[listen]]), got a table"),
    ("listen = []", "listen: must have at least one [[listen]] entry"),
    ("listen = [1]", "listen[0]: must be a table, got 1"),
    (
        "[[listen]]\nhost = 1",
        "listen[0].host: unknown key (expected one of: address, advertise, certificate, key, port,"
        " side, transport)",
    ),
    ('[[listen]]\nside = "dmz"', 'listen[0].side: must be "inside" or "outside", got "dmz"'),
    ("[[listen]]\nside = 1", 'listen[0].side: must be "inside" or "outside", got 1'),
    (
        '[[listen]]\ntransport = "UDP"',
        'listen[0].transport: must be "udp" or "tcp" or "tls", got "UDP"',
    ),
    (
        '[[listen]]\naddress = "localhost"',
        'listen[0].address: must be an IP address (IPv4 or IPv6), got "localhost"',
    ),
    (
        '[[listen]]\naddress = "[::1]"',
        'listen[0].address: must be an IP address (IPv4 or IPv6), got "[::1]"',
    ),
    ("[[listen]]\naddress = 127", "listen[0].address: must be a string, got 127"),
    ('[[listen]]\naddress = ""', "listen[0].address: must not be empty"),
    (
        '[[listen]]\n[[listen]]\nport = "abc"',
        'listen[1].port: must be an integer from 0 to 65535, got "abc"',
    ),
    ("[[listen]]\nport = 65536", "listen[0].port: must be an integer from 0 to 65535, got 65536"),
    ("[[listen]]\nport = true", "listen[0].port: must be an integer from 0 to 65535, got true"),
    ('[[listen]]\nadvertise = ""', "listen[0].advertise: must not be empty"),
    (
        '[[listen]]\nadvertise = "bad host!"',
        'listen[0].advertise: must be a host name or IP address, got "bad host!"',
    ),
    ("[[listen]]\nadvertise = [1]", "listen[0].advertise: must be a string, got [1]"),
    (
        '[[listen]]\ntransport = "tls"\nkey = "k"',
        'listen[0].certificate: is required with transport = "tls"',
    ),
    (
        '[[listen]]\ntransport = "tls"\ncertificate = "c"',
        'listen[0].key: is required with transport = "tls"',
    ),
    (
        '[[listen]]\ntransport = "tls"\ncertificate = 1\nkey = "k"',
        "listen[0].certificate: must be a string, got 1",
    ),
    (
        '[[listen]]\ntransport = "tls"\ncertificate = "c"\nkey = false',
        "listen[0].key: must be a string, got false",
    ),
    (
        '[[listen]]\ntransport = "tcp"\ncertificate = "c"',
        'listen[0].certificate: is only valid with transport = "tls"',
    ),
    ('[[listen]]\nkey = "k"', 'listen[0].key: is only valid with transport = "tls"'),
    (
        '[[listen]]\naddress = "127.0.0.1"\n[[listen]]\naddress = "127.0.0.1"',
        "listen[1]: udp 127.0.0.1 port 5060 clashes with listen[0] (udp 127.0.0.1 port 5060)",
    ),
    (
        '[[listen]]\ntransport = "tcp"\n[[listen]]\ntransport = "tls"\ncertificate = "c"\n'
        'key = "k"\nport = 5060',
        "listen[1]: tls 0.0.0.0 port 5060 clashes with listen[0] (tcp 0.0.0.0 port 5060)",
    ),
    (
        '[[listen]]\naddress = "10.0.0.1"\n[[listen]]\naddress = "0.0.0.0"',
        "listen[1]: udp 0.0.0.0 port 5060 clashes with listen[0] (udp 10.0.0.1 port 5060)",
    ),
    (
        '[[listen]]\naddress = "::"\n[[listen]]\naddress = "10.0.0.1"',
        "listen[1]: udp 10.0.0.1 port 5060 clashes with listen[0] (udp :: port 5060)",
    ),
    # [upstream]
    ('upstream = "sip:x"', 'upstream: must be a table, got "sip:x"'),
    ("[upstream]", "upstream.uri: is required"),
    ("[upstream]\nuri = 5", "upstream.uri: must be a string, got 5"),
    (
        '[upstream]\nuri = "http://provider.example"',
        'upstream.uri: must be a sip: or sips: URI, got "http://provider.example"',
    ),
    (
        '[upstream]\nuri = "provider.example"',
        'upstream.uri: must be a sip: or sips: URI, got "provider.example"',
    ),
    (
        '[upstream]\nuri = "sip:;transport=udp"',
        'upstream.uri: must name a host (sip:host[:port][;params]), got "sip:;transport=udp"',
    ),
    (
        '[upstream]\nuri = "sip:user@"',
        'upstream.uri: must name a host (sip:host[:port][;params]), got "sip:user@"',
    ),
    (
        '[upstream]\nuri = "sip:x"\ntransport = "tls"',
        "upstream.transport: unknown key (expected one of: side, uri)",
    ),
    (
        '[upstream]\nuri = "sip:x"\nside = "left"',
        'upstream.side: must be "inside" or "outside", got "left"',
    ),
    (
        '[[listen]]\nside = "outside"\n[upstream]\nuri = "sip:x"\nside = "inside"',
        'upstream.side: no listener has side = "inside"',
    ),
    # [registrar]
    ("[registrar]\nmin_expires = -1", "registrar.min_expires: must be an integer >= 0, got -1"),
    (
        '[registrar]\nmax_expires = "1h"',
        'registrar.max_expires: must be an integer >= 0, got "1h"',
    ),
    (
        "[registrar]\ndefault_expires = 1.5",
        "registrar.default_expires: must be an integer >= 0, got 1.5",
    ),
    (
        "[registrar]\nmin_expires = 100\nmax_expires = 50\ndefault_expires = 60",
        "registrar.min_expires: must not exceed max_expires (50), got 100",
    ),
    (
        "[registrar]\ndefault_expires = 10",
        "registrar.default_expires: must be from min_expires (60) to max_expires (3600), got 10",
    ),
    (
        "[registrar]\ndefault_expires = 7200",
        "registrar.default_expires: must be from min_expires (60) to max_expires (3600), got 7200",
    ),
    (
        "[registrar]\nexpires = 1",
        "registrar.expires: unknown key (expected one of: default_expires, max_contacts,"
        " max_expires, min_expires, store)",
    ),
    ("[registrar]\nmax_contacts = 0",
     "registrar.max_contacts: must be an integer from 1 to 1000, got 0"),
    # [timers]
    ("[timers]\nt1 = 0", "timers.t1: must be a number > 0, got 0"),
    ("[timers]\nt2 = -1.5", "timers.t2: must be a number > 0, got -1.5"),
    ('[timers]\nt4 = "5"', 'timers.t4: must be a number > 0, got "5"'),
    ("[timers]\nt1 = inf", "timers.t1: must be a number > 0, got inf"),
    ("[timers]\nt1 = nan", "timers.t1: must be a number > 0, got nan"),
    ("[timers]\nt1 = true", "timers.t1: must be a number > 0, got true"),
    ("[timers]\nt1 = 5\nt2 = 4", "timers.t2: must not be less than t1 (5.0), got 4.0"),
    ("[timers]\nt3 = 1", "timers.t3: unknown key (expected one of: t1, t2, t4)"),
    # [plugins]
    ('[plugins]\nenabled = "nat"', 'plugins.enabled: must be an array of strings, got "nat"'),
    ("[plugins]\nenabled = [1]", "plugins.enabled[0]: must be a string, got 1"),
    ('[plugins]\nenabled = [""]', "plugins.enabled[0]: must not be empty"),
    (
        '[plugins]\nenabled = ["nat", "media", "nat"]',
        'plugins.enabled[2]: "nat" repeats plugins.enabled[0]',
    ),
    (
        '[plugins]\nenabled = ["timers"]',
        'plugins.enabled[0]: "timers" is a core section name; no plugin may use it',
    ),
    ("[plugins]\npath = []", "plugins.path: unknown key (expected one of: enabled, open_relay)"),
    # TOML syntax: one line, with the position
    ("[proxy\n", "line 1, column 7: invalid TOML: Expected ']' at the end of a table declaration"),
    ("[proxy]\nmax_forwards = ", "end of document: invalid TOML: Invalid value"),
    (
        "[proxy]\nrecord_route = true\nrecord_route = false\n\n[timers]\n",
        "line 3, column 21: invalid TOML: Cannot overwrite a value",
    ),
    (
        "[proxy]\ndomains = [\n  'a',\n  ,\n]\n",
        "line 4, column 3: invalid TOML: Invalid value",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[1][:60] for c in CASES])
def test_validation_message(text: str, expected: str) -> None:
    assert error_of(text) == f"{SRC}: {expected}"


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[[listen]]\nport = -1", SRC)
    assert info.value.source == SRC
    assert info.value.key == "listen[0].port"
    assert info.value.problem == "must be an integer from 0 to 65535, got -1"


def test_upstream_host_forms_accepted() -> None:
    for uri in (
        "sip:provider.example",
        "SIP:provider.example:5060",
        "sips:user:pw@provider.example;transport=tcp",
        "sip:[2001:db8::1]:5060;lr",
        "sip:192.0.2.5?subject=x",
    ):
        config = parse_config(f'[upstream]\nuri = "{uri}"')
        assert config.upstream == UpstreamConfig(uri)


def test_long_values_are_shortened_in_messages() -> None:
    message = error_of(f'[proxy]\nmax_forwards = "{"x" * 500}"')
    assert len(message) < 160
    assert message.endswith('..."')


# ---------------------------------------------------------------- files


def test_load_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[proxy]\nuser_agent = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 25)"


def test_load_names_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "sipproxy.toml"
    path.write_text("[[listen]]\nport = 70000\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}: listen[0].port: must be an integer from 0 to 65535, got 70000"
    )


# ---------------------------------------------------------------- the Section helper API


def section(**values: object) -> Section:
    return Section("myplugin", values, SRC)


def section_error(call: object) -> str:
    assert callable(call)
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_config_error_for_key() -> None:
    assert str(ConfigError.for_key("nat.keepalive", "must be positive")) == (
        "nat.keepalive: must be positive"
    )
    assert str(ConfigError.for_key("nat.x", "bad\nthing", source="f.toml")) == (
        "f.toml: nat.x: bad thing"
    )
    assert str(ConfigError(None, "", "whole file")) == "whole file"
    assert isinstance(ConfigError.for_key("k", "p"), Exception)


def test_section_error_and_paths() -> None:
    s = section()
    assert str(s.error("port", "is wrong")) == "sipproxy.toml: myplugin.port: is wrong"
    assert str(s.item_error("hosts", 2, "is wrong")) == "sipproxy.toml: myplugin.hosts[2]: is wrong"
    assert s.path("a.b") == 'myplugin."a.b"'
    assert Section("", {}).path("top") == "top"


def test_section_get_str() -> None:
    s = section(name="x", empty="", number=1)
    assert s.get_str("name") == "x"
    assert s.get_str("missing", "d") == "d"
    assert s.get_str("missing", None) is None
    assert s.get_str("empty", allow_empty=True) == ""
    assert section_error(lambda: s.get_str("missing")) == (
        "sipproxy.toml: myplugin.missing: is required"
    )
    assert section_error(lambda: s.get_str("empty")) == (
        "sipproxy.toml: myplugin.empty: must not be empty"
    )
    assert section_error(lambda: s.get_str("number", "d")) == (
        "sipproxy.toml: myplugin.number: must be a string, got 1"
    )


def test_section_get_int() -> None:
    s = section(n=5, flag=True, text="5")
    assert s.get_int("n") == 5
    assert s.get_int("n", 0, min=5, max=5) == 5
    assert s.get_int("missing", 9) == 9
    assert s.get_int("missing", None) is None
    assert section_error(lambda: s.get_int("n", min=6)) == (
        "sipproxy.toml: myplugin.n: must be an integer >= 6, got 5"
    )
    assert section_error(lambda: s.get_int("n", max=4)) == (
        "sipproxy.toml: myplugin.n: must be an integer <= 4, got 5"
    )
    assert section_error(lambda: s.get_int("flag")) == (
        "sipproxy.toml: myplugin.flag: must be an integer, got true"
    )
    assert section_error(lambda: s.get_int("text", 1, min=1, max=9)) == (
        'sipproxy.toml: myplugin.text: must be an integer from 1 to 9, got "5"'
    )


def test_section_get_float() -> None:
    s = section(x=2, y=0.5)
    assert s.get_float("x") == 2.0
    assert type(s.get_float("x")) is float
    assert s.get_float("y", min=0, max=1) == 0.5
    assert s.get_float("missing", 1.5) == 1.5
    assert s.get_float("missing", None) is None
    assert section_error(lambda: s.get_float("y", min=1)) == (
        "sipproxy.toml: myplugin.y: must be a number >= 1, got 0.5"
    )
    assert section_error(lambda: s.get_float("x", min=2, max=3, min_exclusive=True)) == (
        "sipproxy.toml: myplugin.x: must be a number > 2 and <= 3, got 2"
    )


def test_section_get_bool() -> None:
    s = section(on=True, one=1)
    assert s.get_bool("on") is True
    assert s.get_bool("missing", False) is False
    assert s.get_bool("missing", None) is None
    assert section_error(lambda: s.get_bool("one", True)) == (
        "sipproxy.toml: myplugin.one: must be true or false, got 1"
    )


def test_section_get_list_of_str() -> None:
    s = section(names=["a", "b", "a"], empty=[], mixed=["a", 2])
    assert s.get_list_of_str("names") == ("a", "b", "a")
    assert s.get_list_of_str("missing", ["x"]) == ("x",)
    assert s.get_list_of_str("empty") == ()
    assert section_error(lambda: s.get_list_of_str("names", unique=True)) == (
        'sipproxy.toml: myplugin.names[2]: "a" repeats myplugin.names[0]'
    )
    assert section_error(lambda: s.get_list_of_str("empty", allow_empty=False)) == (
        "sipproxy.toml: myplugin.empty: must not be empty"
    )
    assert section_error(lambda: s.get_list_of_str("mixed")) == (
        "sipproxy.toml: myplugin.mixed[1]: must be a string, got 2"
    )
    assert section_error(lambda: s.get_list_of_str("missing")) == (
        "sipproxy.toml: myplugin.missing: is required"
    )


def test_section_get_choice() -> None:
    s = section(mode="fast")
    assert s.get_choice("mode", ["fast", "slow"]) == "fast"
    assert s.get_choice("missing", ["fast", "slow"], "slow") == "slow"
    assert section_error(lambda: s.get_choice("mode", ["slow", "off"])) == (
        'sipproxy.toml: myplugin.mode: must be "slow" or "off", got "fast"'
    )


def test_section_check_no_unknown() -> None:
    s = section(a=1, b=2)
    s.check_no_unknown({"a", "b", "c"})
    assert section_error(lambda: s.check_no_unknown(["a"])) == (
        "sipproxy.toml: myplugin.b: unknown key (expected one of: a)"
    )


def test_section_get_section_nests_paths() -> None:
    config = parse_config("[media.ports]\nlow = 1\nhigh = 'x'\n[media]\nmode = 'relay'", SRC)
    media = config.section("media")
    ports = media.get_section("ports")
    assert ports.name == "media.ports"
    assert ports.get_int("low") == 1
    assert section_error(lambda: ports.get_int("high", min=1)) == (
        'sipproxy.toml: media.ports.high: must be an integer >= 1, got "x"'
    )
    assert section_error(lambda: media.get_section("mode")) == (
        'sipproxy.toml: media.mode: must be a table, got "relay"'
    )
    assert media.get_section("absent", {}).get_int("x", 3) == 3
    assert "ports" in media and "absent" not in media


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_config_or_one_line_error(text: str) -> None:
    try:
        parse_config(text, SRC)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert str(e).startswith(f"{SRC}: ")


TOML_VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(f), repr(f))
    ),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=20).map(
        lambda t: json.dumps(t, ensure_ascii=False).replace("\x7f", "\\u007f")
    ),
    st.just("[]"),
    st.just('["a", 1]'),
    st.just("{}"),
)
CORE_KEYS = [
    ("proxy", "domains"),
    ("proxy", "record_route"),
    ("proxy", "max_forwards"),
    ("proxy", "user_agent"),
    ("upstream", "uri"),
    ("upstream", "side"),
    ("registrar", "min_expires"),
    ("registrar", "max_expires"),
    ("registrar", "default_expires"),
    ("timers", "t1"),
    ("timers", "t2"),
    ("timers", "t4"),
    ("plugins", "enabled"),
    *(("limits", key) for key in sorted(LimitsConfig.__dataclass_fields__)),
    *(("admin", key) for key in sorted(AdminConfig.__dataclass_fields__)),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CORE_KEYS), TOML_VALUES)
def test_any_value_of_a_core_key_is_accepted_or_blamed_on_that_key(
    where: tuple[str, str], value: str
) -> None:
    table, key = where
    try:
        parse_config(f"[{table}]\n{key} = {value}\n", SRC)
    except ConfigError as e:
        assert "\n" not in str(e)
        # the offending key itself, or (for cross-key checks) a key of the same table
        assert e.key.startswith(f"{table}.")
        assert e.source == SRC


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["side", "transport", "address", "port", "advertise"]),
    TOML_VALUES,
)
def test_any_listen_value_is_accepted_or_blamed_on_that_key(key: str, value: str) -> None:
    try:
        config = parse_config(f"[[listen]]\n{key} = {value}\n", SRC)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert e.key in (f"listen[0].{key}", "listen[0].certificate")
    else:
        assert len(config.listen) == 1


def test_core_section_names() -> None:
    assert {
        "proxy", "listen", "upstream", "registrar", "timers", "dns", "plugins", "limits", "log",
        "admin",
    } == CORE_SECTIONS


def test_dns_defaults_to_the_system_resolver() -> None:
    config = parse_config("", SRC)
    assert config.dns.servers is None
    assert config.dns.timeout == 5.0


def test_dns_servers_parsed() -> None:
    config = parse_config(
        '[dns]\nservers = ["127.0.0.1", "127.0.0.2:5353", "[::1]:53"]\ntimeout = 2', SRC
    )
    assert config.dns.servers == (("127.0.0.1", 53), ("127.0.0.2", 5353), ("::1", 53))
    assert config.dns.timeout == 2.0


def test_dns_empty_servers_means_no_dns() -> None:
    assert parse_config("[dns]\nservers = []", SRC).dns.servers == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[dns]\nservers = ["dns.example"]',
         'dns.servers[0]: must be an IP address with an optional port, got "dns.example"'),
        ('[dns]\nservers = ["127.0.0.1:x"]', 'dns.servers[0]: bad port in "127.0.0.1:x"'),
        ("[dns]\ntimeout = 0", "dns.timeout: must be a number > 0, got 0"),
        ("[dns]\nserver = []", "dns.server: unknown key (expected one of: servers, timeout)"),
    ],
)
def test_dns_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert str(info.value) == f"{SRC}: {message}"


# ---------------------------------------------------------------- [limits]


def test_limits_defaults() -> None:
    limits = parse_config("", SRC).limits
    assert limits == LimitsConfig()
    assert limits.enabled
    assert limits.exempt == ("127.0.0.0/8", "::1/128")
    assert "friendly-scanner" in limits.blocked_user_agents
    assert (limits.messages_per_second, limits.burst, limits.ban_time) == (100.0, 400, 300.0)


def test_limits_values_typed_and_normalized() -> None:
    limits = parse_config(
        "[limits]\n"
        "messages_per_second = 50\nburst = 80\nban_time = 60\n"
        'exempt = ["192.168.1.7/16", "2001:db8::1", "10.0.0.0/8"]\n'
        'blocked_user_agents = ["Evil-Scanner"]\n'
        "refusal_weight = 0\nmax_transactions_per_source = 0\n"
        "max_connections_per_source = 4\nmax_connections = 100\nmax_dialogs_per_source = 3\n"
        "idle_timeout = 30\nmessage_timeout = 0\nmax_sources = 10\nlog_interval = 5\n"
        "enabled = false\n",
        SRC,
    ).limits
    assert limits == LimitsConfig(
        enabled=False, messages_per_second=50.0, burst=80, ban_time=60.0,
        exempt=("192.168.0.0/16", "2001:db8::1/128", "10.0.0.0/8"),
        blocked_user_agents=("evil-scanner",), refusal_weight=0,
        max_transactions_per_source=0, max_dialogs_per_source=3, max_connections_per_source=4,
        max_connections=100,
        idle_timeout=30.0, message_timeout=0.0, max_sources=10, log_interval=5.0,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("burst = 0", "limits.burst: must be an integer >= 1, got 0"),
        ("messages_per_second = 0", "limits.messages_per_second: must be a number > 0, got 0"),
        ("ban_time = -1", "limits.ban_time: must be a number > 0, got -1"),
        ('exempt = ["10.0.0.0/33"]',
         'limits.exempt[0]: must be a network like 192.0.2.0/24 or an IP address,'
         ' got "10.0.0.0/33"'),
        ('exempt = "10.0.0.0/8"', 'limits.exempt: must be an array of strings, got "10.0.0.0/8"'),
        ('blocked_user_agents = [""]', "limits.blocked_user_agents[0]: must not be empty"),
        ("enabled = 1", "limits.enabled: must be true or false, got 1"),
        ("max_connections_per_source = 0",
         "limits.max_connections_per_source: must be an integer >= 1, got 0"),
        ("bursts = 3", "limits.bursts: unknown key (expected one of: ban_time, "
         "blocked_user_agents, burst, enabled, exempt, idle_timeout, log_interval, "
         "max_connections, max_connections_per_source, max_dialogs, max_dialogs_per_source, "
         "max_sources, max_transactions, max_transactions_per_source, message_timeout, "
         "messages_per_second, refusal_weight)"),
        ("max_transactions = -1", "limits.max_transactions: must be an integer >= 0, got -1"),
        ("max_dialogs = 1.5", "limits.max_dialogs: must be an integer >= 0, got 1.5"),
    ],
)
def test_limits_errors(text: str, expected: str) -> None:
    assert error_of(f"[limits]\n{text}\n") == f"{SRC}: {expected}"


_DOC_TABLE = re.compile(r"^#?\s*\[\[?([a-z_]+)\]\]?\s*(?:#.*)?$")
_DOC_KEY = re.compile(r"^#?\s*([a-z_0-9]+)\s*=\s*\S")


def _documented_keys(text: str) -> dict[str, set[str]]:
    """The keys examples/sipproxy.toml shows per table, set or commented out (# key = ...)."""
    keys: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        header = _DOC_TABLE.match(line)
        if header:
            table = header.group(1)
            keys.setdefault(table, set())
            continue
        key = _DOC_KEY.match(line)
        if key and table:
            keys[table].add(key.group(1))
    return keys


def _accepted_keys() -> dict[str, set[str]]:
    """Every key the loader and the built-in plugins accept, per table, as their own "unknown
    key" errors list them."""
    from sipproxy.plugins import acl, auth, cdr, media, nat, tls

    def expected(error: ConfigError) -> set[str]:
        found = re.search(r"expected one of: (.*)\)$", error.problem)
        assert found, error
        return set(found.group(1).split(", "))

    accepted = {}
    for table in sorted(CORE_SECTIONS):
        with pytest.raises(ConfigError) as info:
            parse_config(f"[{'[listen]' if table == 'listen' else table}]\nnot_a_key = 1\n")
        accepted[table] = expected(info.value)
    for module in (acl, auth, cdr, media, nat, tls):
        factory = module.factory
        with pytest.raises(ConfigError) as info:
            factory.build(None, Section(factory.name, {"not_a_key": 1}))  # type: ignore[arg-type]
        accepted[factory.name] = expected(info.value)
    return accepted


def test_the_reference_file_documents_every_key() -> None:
    """examples/sipproxy.toml shows every key of the core and of every built-in plugin (set, or
    commented out where it needs files or is an alternative), and no key the code refuses."""
    assert _documented_keys(EXAMPLE.read_text()) == _accepted_keys()


CORE_TABLES = {
    "proxy": ProxyConfig, "listen": ListenConfig, "upstream": UpstreamConfig,
    "registrar": RegistrarConfig, "timers": TimerConfig, "dns": DnsConfig,
    "plugins": PluginsConfig, "limits": LimitsConfig, "log": LogConfig, "admin": AdminConfig,
}


def _declared_tables() -> dict[str, type]:
    """Every table whose keys are declared with sipproxy.settings.setting: the core's, and the
    built-in plugins' (a factory's ``settings``)."""
    from sipproxy.plugins import acl, auth, cdr, media, nat, tls

    tables = dict(CORE_TABLES)
    for module in (acl, auth, cdr, media, nat, tls):
        declared = getattr(module.factory, "settings", None)
        if declared is not None:
            tables[module.factory.name] = declared
    return tables


def test_the_declared_keys_are_the_accepted_keys() -> None:
    """The field metadata is the one declaration: what the loaders accept is what it lists."""
    accepted = _accepted_keys()
    declared = _declared_tables()
    assert set(CORE_TABLES) == CORE_SECTIONS
    for table, cls in declared.items():
        assert set(settings_of(cls)) == accepted[table], table


_DOC_DEFAULT = re.compile(r"^#?\s*([a-z_0-9]+\s*=\s*.*?)\s+#\s*default\b")


def test_the_reference_file_shows_the_declared_defaults() -> None:
    """Every line of examples/sipproxy.toml that gives a key's value and says "# default"
    (set, or commented out) gives the default its declaration has, in every declared table."""
    declared = _declared_tables()
    checked, table = 0, ""
    for line in EXAMPLE.read_text().splitlines():
        header = _DOC_TABLE.match(line)
        if header:
            table = header.group(1)
            continue
        found = _DOC_DEFAULT.match(line)
        if not found or table not in declared:
            continue
        try:
            ((key, value),) = tomllib.loads(found.group(1)).items()
        except tomllib.TOMLDecodeError:
            continue  # an array that goes on over several lines
        default = settings_of(declared[table])[key].default
        assert (tuple(value) if isinstance(value, list) else value) == default, (table, key)
        checked += 1
    assert checked >= 40


def test_the_reference_file_shows_the_core_defaults() -> None:
    """Where examples/sipproxy.toml sets a core key and says "default", the value is the
    default: the file gives the same configuration without those lines."""
    text = EXAMPLE.read_text()
    plugin_tables = {"nat", "media", "tls", "auth", "acl", "cdr"}
    kept, table = [], ""
    for line in text.splitlines():
        header = _DOC_TABLE.match(line)
        if header:
            table = header.group(1)
        elif (table not in plugin_tables and not line.startswith("#")
              and re.search(r"#\s*default ", line)):
            continue
        kept.append(line)
    full, without = parse_config(text), parse_config("\n".join(kept))
    assert dataclasses.replace(without, sections=full.sections) == full
    assert without.limits == LimitsConfig()


_OUTSIDE = '[[listen]]\nside = "outside"\naddress = "203.0.113.1"\nport = 5060\n'


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        ("", ("acl",)),
        ('[plugins]\nenabled = ["nat", "media"]\n', ("acl", "nat", "media")),
        ('[plugins]\nenabled = ["nat", "acl"]\n', ("nat", "acl")),  # placed by hand: kept
        ('[plugins]\nenabled = ["nat"]\nopen_relay = true\n', ("nat",)),
    ],
)
def test_an_outside_socket_never_makes_an_open_relay(plugins: str, expected: tuple[str, ...]):
    assert parse_config(_OUTSIDE + plugins).plugins == expected


def test_inside_only_proxies_run_just_their_plugins():
    text = '[[listen]]\naddress = "192.168.1.1"\nport = 5060\n[plugins]\nenabled = ["nat"]\n'
    assert parse_config(text).plugins == ("nat",)
    assert parse_config("").plugins == ()


def test_open_relay_must_be_a_boolean():
    with pytest.raises(ConfigError) as info:
        parse_config(_OUTSIDE + '[plugins]\nopen_relay = "yes"\n', "p.toml")
    assert str(info.value).startswith("p.toml: plugins.open_relay: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", sorted((EXAMPLE.parent).glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_config_builds(path: Path) -> None:
    """Each examples/*.toml loads as written and builds the whole proxy with its plugins."""
    from twisted.internet.task import Clock

    from sipproxy.service import makeService

    config = load_config(str(path))
    service = makeService(config, reactor=Clock())
    assert [p.name for p in service.proxy.pipeline.plugins] == list(config.plugins)


def test_the_firewall_tls_example_is_the_whole_firewall_set_up() -> None:
    """examples/firewall-tls.toml: phones inside over UDP, nat + media + tls, TLS to the
    provider (verified), acl first because a listener faces the outside."""
    config = load_config(str(EXAMPLE.parent / "firewall-tls.toml"))
    assert list(config.plugins) == ["acl", "nat", "media", "tls"]
    assert [(lc.side, lc.transport) for lc in config.listen] == [("inside", "udp"),
                                                                  ("outside", "udp")]
    assert config.upstream is not None and config.upstream.uri.startswith("sips:")
    assert config.section("tls").get_bool("verify", False)
    assert not config.proxy.host_addresses  # the provider is the registrar
