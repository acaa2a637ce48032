"""sipproxy.settings: settings declared as dataclass fields, read by one reader."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import pytest
from zope.interface.verify import verifyObject

from sipproxy import pipeline
from sipproxy.config import parse_config
from sipproxy.interfaces import IImpliedPluginFactory, IPluginFactory
from sipproxy.pipeline import implied_plugins, implying_factories
from sipproxy.plugins import acl, auth, nat, tls
from sipproxy.settings import (
    REQUIRED,
    ConfigError,
    Section,
    network,
    read_section,
    setting,
    settings_of,
)


def _switch(value: object) -> str | bool:
    if isinstance(value, bool) or value == "auto":
        return cast("str | bool", value)
    raise ValueError(f'must be "auto", true or false, got {value!r}')


def _even(text: str) -> int:
    if not text.isdigit() or int(text) % 2:
        raise ValueError(f"must be an even number, got {text!r}")
    return int(text)


@dataclass(frozen=True, slots=True)
class Example:
    name: str = setting(doc="Required: no default.")
    count: int = setting(3, min=1, max=9, doc="An integer in bounds.")
    ratio: float = setting(0.5, min=0, min_exclusive=True, doc="A positive number.")
    mode: Literal["fast", "slow"] = setting("fast", doc="One of the Literal's strings.")
    flavour: str = setting("plain", choices=("plain", "salted"), doc="One of choices.")
    on: bool = setting(True, doc="true or false.")
    label: str | None = setting(None, doc="Optional.")
    evens: tuple[int, ...] = setting((), parse=_even, unique=True, doc="Parsed elements.")
    options: Mapping[str, Any] | None = setting(None, doc="A table.")
    switch: str | bool = setting("auto", parse=_switch, doc="Several types: parse judges.")
    derived: int = 0


def read(**values: object) -> Example:
    return read_section(Example, Section("ex", values, "ex.toml"), derived=7)


def problem(**values: object) -> str:
    with pytest.raises(ConfigError) as info:
        read(**values)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_defaults_fill_what_the_table_leaves_out() -> None:
    assert read(name="x") == Example("x", 3, 0.5, "fast", "plain", True, None, (), None, "auto",
                                     7)


def test_values_are_typed_and_parsed() -> None:
    got = read(name="x", count=9, ratio=2, mode="slow", flavour="salted", on=False, label="l",
               evens=["2", "4"], options={"a": 1}, switch=False)
    assert got == Example("x", 9, 2.0, "slow", "salted", False, "l", (2, 4), {"a": 1}, False,
                          7)
    assert type(got.ratio) is float


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "ex.name: is required"),
        ({"name": ""}, "ex.name: must not be empty"),
        ({"name": "x", "cont": 1}, "ex.cont: unknown key (expected one of: count, evens, "
                                   "flavour, label, mode, name, on, options, ratio, switch)"),
        ({"name": "x", "count": 10}, "ex.count: must be an integer from 1 to 9, got 10"),
        ({"name": "x", "count": True}, "ex.count: must be an integer from 1 to 9, got true"),
        ({"name": "x", "ratio": 0}, "ex.ratio: must be a number > 0, got 0"),
        ({"name": "x", "mode": "medium"}, 'ex.mode: must be "fast" or "slow", got "medium"'),
        ({"name": "x", "flavour": 1}, 'ex.flavour: must be "plain" or "salted", got 1'),
        ({"name": "x", "on": "yes"}, 'ex.on: must be true or false, got "yes"'),
        ({"name": "x", "label": 2}, "ex.label: must be a string, got 2"),
        ({"name": "x", "evens": ["2", "3"]}, "ex.evens[1]: must be an even number, got '3'"),
        ({"name": "x", "evens": ["2", "02"]}, 'ex.evens[1]: "02" repeats ex.evens[0]'),
        ({"name": "x", "evens": "2"}, 'ex.evens: must be an array of strings, got "2"'),
        ({"name": "x", "options": 1}, "ex.options: must be a table, got 1"),
        ({"name": "x", "switch": 1}, "ex.switch: must be \"auto\", true or false, got 1"),
        ({"name": "x", "derived": 1}, "ex.derived: unknown key"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(values: dict[str, Any], message: str) -> None:
    assert problem(**values).startswith(f"ex.toml: {message}")


def test_settings_of_lists_the_keys_with_their_docs() -> None:
    specs = settings_of(Example)
    assert list(specs) == ["name", "count", "ratio", "mode", "flavour", "on", "label", "evens",
                           "options", "switch"]  # derived is not a key
    assert specs["name"].default is REQUIRED
    assert (specs["count"].kind, specs["count"].min, specs["count"].max) == ("int", 1, 9)
    assert specs["mode"].choices == ("fast", "slow")
    assert specs["label"].optional and specs["label"].kind == "str"
    assert specs["evens"].kind == "array" and specs["options"].kind == "table"
    assert specs["switch"].kind == "any"
    assert all(spec.doc for spec in specs.values())


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    return host, int(port)


def _on_off(value: object) -> bool:
    if isinstance(value, bool) or value in ("on", "off"):
        return value in (True, "on")
    raise ValueError(f"must be on, off, true or false, got {value!r}")


def test_kind_names_the_toml_type_where_parse_makes_another() -> None:
    @dataclass(frozen=True)
    class Kinds:
        address: tuple[str, int] | None = setting(
            None, kind="str", parse=_host_port, doc="text read into a (host, port)")
        fast: bool = setting(False, kind="any", parse=_on_off, doc="true or \"on\"")

    assert (settings_of(Kinds)["address"].kind, settings_of(Kinds)["fast"].kind) == ("str", "any")
    read = read_section(Kinds, Section("k", {"address": "a.example:5", "fast": "on"}))
    assert (read.address, read.fast) == (("a.example", 5), True)
    assert read_section(Kinds, Section("k", {})) == Kinds()
    with pytest.raises(ConfigError, match=r"^k\.address: must be a string, got \["):
        read_section(Kinds, Section("k", {"address": ["a.example", 5]}))


def test_a_field_type_the_reader_cannot_read_is_refused_at_declaration() -> None:
    @dataclass(frozen=True)
    class Bad:
        when: complex = setting(0j, doc="no TOML type")

    @dataclass(frozen=True)
    class Unjudged:
        mode: str | bool = setting("auto", doc="several types and no parse")

    for cls in (Bad, Unjudged):
        with pytest.raises(TypeError):
            settings_of(cls)


def test_network_normalizes_or_says_what_it_wants() -> None:
    assert network("192.168.1.7/24") == "192.168.1.0/24"
    assert network("2001:DB8::1") == "2001:db8::1/128"
    with pytest.raises(ValueError) as info:
        network("lan")
    assert str(info.value) == 'must be a network like 192.0.2.0/24 or an IP address, got "lan"'


@pytest.mark.parametrize("module", [acl, auth, nat, tls], ids=lambda m: m.__name__)
def test_built_in_plugins_declare_their_settings(module: Any) -> None:
    """Each built-in factory keeps its settings dataclass where tools find it, and its defaults
    are what the plugin reads from an empty table."""
    factory = module.factory
    verifyObject(IPluginFactory, factory)
    assert dataclasses.is_dataclass(factory.settings)
    assert settings_of(factory.settings)
    read_section(factory.settings, Section(factory.name, {}))  # every default passes its checks


def test_acl_is_implied_by_a_listener_on_the_outside() -> None:
    verifyObject(IImpliedPluginFactory, acl.factory)
    outside = '[[listen]]\nside = "outside"\naddress = "203.0.113.1"\n'
    inside = '[[listen]]\naddress = "192.168.1.1"\n'
    assert implied_plugins(parse_config(outside + '[plugins]\nopen_relay = true\n')) == ("acl",)
    assert implied_plugins(parse_config(inside)) == ()
    placed = parse_config(outside + '[plugins]\nenabled = ["nat", "acl"]\n')
    assert implied_plugins(placed) == ()  # named: it runs where the list puts it


def test_acl_is_implied_even_without_installed_entry_points(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """From a source tree that was never installed (no entry points), the outside listener
    still brings acl: the safeguard does not depend on package metadata."""
    monkeypatch.setattr(pipeline, "entry_points", lambda group: [])
    implying_factories.cache_clear()
    try:
        config = parse_config('[[listen]]\nside = "outside"\naddress = "203.0.113.1"\n')
        assert config.plugins == ("acl",)
    finally:
        monkeypatch.undo()
        implying_factories.cache_clear()
