"""
Settings declared once: a frozen dataclass per config table, read by one generic reader.

A table's keys are the fields of a frozen dataclass; each field is made with :func:`setting`,
which gives its default and keeps, in the field's metadata, a one-line doc and what the value
may be (bounds, choices, a parser for the text). :func:`read_section` turns a table into an
instance of that dataclass: it refuses unknown keys, checks each value's type (from the field's
annotation), bounds and choices, and raises a one-line :class:`ConfigError` naming
``[section] key`` for the first mistake. The core's tables (:mod:`sipproxy.config`) and every
built-in plugin declare their settings this way, and so can a third-party plugin::

    @dataclass(frozen=True, slots=True)
    class BlocklistSettings:
        prefixes: tuple[str, ...] = setting((), doc="Request-URI user prefixes to refuse.")
        status: int = setting(403, doc="Status code of the refusal.", min=400, max=699)

    settings = read_section(BlocklistSettings, section)

Annotations map to TOML types: ``bool``, ``int``, ``float`` (an integer is accepted), ``str``,
a ``Literal`` of strings (one of them), ``tuple[..., ...]`` (an array of non-empty strings,
each passed through ``parse``), ``Mapping[str, Any]`` (a table), a union of several types
(``str | bool``: ``parse`` judges the value as it is); ``X | None`` with a default of
``None`` makes a key optional. A required key (no default) must come before the keys with a
default, or the dataclass be ``kw_only``. Checks that involve two keys
(``min_expires <= max_expires``) stay in the code that calls :func:`read_section`, with
:meth:`Section.error`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast, overload

__all__ = [
    "REQUIRED",
    "ConfigError",
    "Section",
    "SettingSpec",
    "ip_address",
    "network",
    "no_control_characters",
    "read_section",
    "setting",
    "settings_of",
    "show",
]

T = TypeVar("T")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_METADATA_KEY: Final = "sipproxy.setting"


class ConfigError(Exception):
    """
    A mistake in the configuration: one line, ``<source>: <key path>: <problem>``.

    :ivar source: the file name (or ``"<string>"``), or ``None`` when not known yet.
    :ivar key: the key path, e.g. ``listen[1].port`` or ``nat.keepalive``; ``""`` for the
        whole file.
    :ivar problem: what is wrong, e.g. ``must be an integer from 0 to 65535, got "abc"``.
    """

    def __init__(self, source: str | None, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = one_line(problem)
        super().__init__(str(self))

    @classmethod
    def for_key(cls, key: str, problem: str, source: str | None = None) -> ConfigError:
        """The error for one key, in the same one-line format the core uses."""
        return cls(source, key, problem)

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        parts.append(self.problem)
        return ": ".join(parts)


def one_line(text: str) -> str:
    """``text`` with every run of white space (newlines too) made one space."""
    return " ".join(text.split())


def key_part(key: str) -> str:
    """A key as TOML would spell it in a dotted path: bare if it can be, quoted otherwise."""
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def show(value: object) -> str:
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
        text = "[" + ", ".join(show(v) for v in value) + "]"
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


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()
"""The default of a key that must be given (a getter or :func:`setting` without a default)."""


class Section:
    """
    One table of the configuration, with typed getters that raise :class:`ConfigError` naming
    the key. :func:`read_section` reads a whole table with them; a plugin may also call them
    one by one::

        s = config.section("nat")
        s.check_no_unknown({"keepalive", "force_rport"})
        keepalive = s.get_int("keepalive", 30, min=0, max=3600)

    A getter without a default makes the key required; a default of ``None`` makes it optional
    (the getter then returns ``None`` when the key is absent).

    :ivar name: the key path of this table (``"nat"``, ``"listen[0]"``, ``"nat.stun"``); it
        prefixes every key in error messages.
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
        """The keys the table sets."""
        return self.mapping.keys()

    def path(self, key: str) -> str:
        """The full key path of ``key``, for messages: ``nat.keepalive``, ``listen[0].port``."""
        return f"{self.name}.{key_part(key)}" if self.name else key_part(key)

    def error(self, key: str, problem: str) -> ConfigError:
        """The error for ``key`` of this table: ``raise section.error("x", "must be ...")``."""
        return ConfigError(self.source, self.path(key), problem)

    def item_error(self, key: str, index: int, problem: str) -> ConfigError:
        """The error for element ``index`` of the array ``key``: ``plugins.enabled[2]: ...``."""
        return ConfigError(self.source, f"{self.path(key)}[{index}]", problem)

    def _wrong(self, key: str, expected: str, value: object) -> ConfigError:
        return self.error(key, f"must be {expected}, got {show(value)}")

    def _lookup(self, key: str, default: object) -> tuple[bool, Any]:
        """(found, value); raises if the key is required and absent."""
        if key in self.mapping:
            return True, self.mapping[key]
        if default is REQUIRED:
            raise self.error(key, "is required")
        return False, default

    def check_no_unknown(self, allowed: Iterable[str]) -> None:
        """Refuse keys outside ``allowed``: a typo must not silently become a default."""
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
        self, key: str, default: object = REQUIRED, *, allow_empty: bool = False
    ) -> str | None:
        """A string; empty strings are refused unless ``allow_empty``."""
        found, value = self._lookup(key, default)
        if not found:
            return cast("str | None", value)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        if not value and not allow_empty:
            raise self.error(key, "must not be empty")
        return value

    def get_choice(self, key: str, choices: Iterable[str], default: object = REQUIRED) -> str:
        """One string of ``choices``."""
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
        default: object = REQUIRED,
        *,
        min: int | None = None,
        max: int | None = None,
    ) -> int | None:
        """An integer within [``min``, ``max``] (booleans are not integers here)."""
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
        default: object = REQUIRED,
        *,
        min: float | None = None,
        max: float | None = None,
        min_exclusive: bool = False,
    ) -> float | None:
        """
        A finite number (an integer is accepted) within [``min``, ``max``]; with
        ``min_exclusive``, within (``min``, ``max``].
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
    def get_bool(self, key: str, default: object = REQUIRED) -> bool | None:
        """``true`` or ``false`` (not 0/1, not "yes")."""
        found, value = self._lookup(key, default)
        if not found:
            return cast("bool | None", value)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def get_list_of_str(
        self,
        key: str,
        default: Iterable[str] | _Required = REQUIRED,
        *,
        allow_empty: bool = True,
        unique: bool = False,
    ) -> tuple[str, ...]:
        """
        An array of non-empty strings, as a tuple; ``unique`` refuses repeats,
        ``allow_empty=False`` refuses an empty array.
        """
        found, value = self._lookup(key, default)
        if not found:
            return tuple(cast("Iterable[str]", value))
        if not isinstance(value, list | tuple):
            raise self._wrong(key, "an array of strings", value)
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.item_error(key, i, f"must be a string, got {show(item)}")
            if not item:
                raise self.item_error(key, i, "must not be empty")
            if unique and item in seen:
                first = f"{self.path(key)}[{seen[item]}]"
                raise self.item_error(key, i, f"{show(item)} repeats {first}")
            seen.setdefault(item, i)
        if not value and not allow_empty:
            raise self.error(key, "must not be empty")
        return tuple(value)

    def get_section(self, key: str, default: Mapping[str, Any] | None = None) -> Section:
        """A sub-table as a :class:`Section` whose errors name ``<this>.<key>.<subkey>``."""
        found, value = self._lookup(key, REQUIRED if default is None else default)
        if found and not isinstance(value, Mapping):
            raise self._wrong(key, "a table", value)
        return Section(self.path(key), value, self.source)


# -- declaring settings ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SettingSpec:
    """
    What :func:`setting` keeps in a field's metadata, and :func:`settings_of` gives back.

    :ivar key: the TOML key (the field's name).
    :ivar doc: one line saying what the key does.
    :ivar default: the default value, or :data:`REQUIRED`.
    :ivar kind: the TOML type the annotation calls for (or :func:`setting`'s ``kind``):
        ``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"choice"``, ``"array"``, ``"table"``,
        or ``"any"`` for a union of several types (``str | bool``), whose ``parse`` gets the
        TOML value as it is.
    :ivar optional: the annotation allows ``None`` (the key may be left out, default ``None``).
    :ivar parse: turns a string (each element of an array) into the stored value, raising
        ``ValueError`` whose text is the problem (``must be ..., got ...``).

    The other fields are the arguments of :func:`setting` of the same names.
    """

    key: str
    doc: str
    default: Any
    kind: str = ""
    optional: bool = False
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[str, ...] = ()
    allow_empty: bool | None = None
    unique: bool = False
    parse: Callable[[str], Any] | None = None


def setting(
    default: Any = REQUIRED,
    *,
    doc: str,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    choices: Iterable[str] = (),
    allow_empty: bool | None = None,
    unique: bool = False,
    parse: Callable[[str], Any] | None = None,
    kind: str = "",
) -> Any:
    """
    A dataclass field that is a config key: its default and what :func:`read_section` checks.

    :param default: the value when the key is absent; leave it out to make the key required.
    :param doc: one line for the reference (``examples/sipproxy.toml``, the README).
    :param min: numbers: the lowest value allowed (above it, with ``min_exclusive``).
    :param max: numbers: the highest value allowed.
    :param choices: strings: the values allowed (a ``Literal`` annotation gives them too).
    :param allow_empty: strings: ``""`` is allowed (default no); arrays: ``[]`` is allowed
        (default yes).
    :param unique: arrays: no element may repeat another (after ``parse``).
    :param parse: strings, and each element of an array: returns the value to keep, or raises
        ``ValueError("must be ..., got ...")``; for a field of several types (``str | bool``)
        it gets the TOML value as it is, and is required.
    :param kind: the TOML type, where ``parse`` makes a value of another type than the key's
        (see :class:`SettingSpec`): ``"str"`` for text read into a ``tuple[str, int]``,
        ``"any"`` for a key of several TOML types kept as one (``"on"`` for ``true``).
    :returns: a ``dataclasses.field`` carrying the spec in its metadata.
    """
    spec = SettingSpec(
        key="", doc=doc, default=default, min=min, max=max, min_exclusive=min_exclusive,
        choices=tuple(choices), allow_empty=allow_empty, unique=unique, parse=parse, kind=kind,
    )
    metadata = {_METADATA_KEY: spec}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _kind(hint: Any) -> tuple[str, bool, tuple[str, ...]]:
    """(kind, optional, choices) for a field's resolved annotation."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) > 1:
            return "any", optional, ()
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    if origin is Literal:
        return "choice", optional, tuple(str(a) for a in typing.get_args(hint))
    for kind, python_type in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if origin is python_type:
            return kind, optional, ()
    if origin is tuple:
        return "array", optional, ()
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return "table", optional, ()
    raise TypeError(f"a setting cannot be of type {hint!r}")


def settings_of(cls: type) -> Mapping[str, SettingSpec]:
    """
    The keys a settings dataclass declares, in field order, each with its :class:`SettingSpec`
    (``kind`` and ``optional`` filled in from the annotation). Fields made without
    :func:`setting` are not keys (the reader fills them from its ``extra`` arguments).
    """
    return _specs(cls)


@functools.cache
def _specs(cls: type) -> Mapping[str, SettingSpec]:
    hints = typing.get_type_hints(cls)
    specs: dict[str, SettingSpec] = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_METADATA_KEY)
        if spec is None:
            continue
        kind, optional, choices = _kind(hints[f.name])
        kind = spec.kind or kind
        if kind == "any" and spec.parse is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a setting of several types needs parse")
        specs[f.name] = dataclasses.replace(
            spec, key=f.name, kind=kind, optional=optional, choices=spec.choices or choices
        )
    return MappingProxyType(specs)


def read_section(cls: type[T], section: Section, **extra: Any) -> T:
    """
    Read ``section`` into the settings dataclass ``cls``: unknown keys, types, bounds and
    choices are checked, each mistake a one-line :class:`ConfigError` naming the key.

    :param extra: values for the fields of ``cls`` that are not keys (derived ones).
    """
    specs = settings_of(cls)
    section.check_no_unknown(specs)
    values = {key: _read(section, spec) for key, spec in specs.items()}
    return cls(**values, **extra)


def _read(s: Section, spec: SettingSpec) -> Any:
    key, default = spec.key, spec.default
    if spec.kind == "bool":
        return s.get_bool(key, default)
    if spec.kind == "int":
        return s.get_int(key, default, min=_int_bound(spec.min), max=_int_bound(spec.max))
    if spec.kind == "float":
        return s.get_float(key, default, min=spec.min, max=spec.max,
                           min_exclusive=spec.min_exclusive)
    if spec.kind == "table":
        if key not in s:
            return default
        return s.get_section(key).mapping
    if spec.kind == "array":
        return _read_array(s, spec)
    if spec.kind == "any":
        if key not in s:
            return s.get_str(key, default)  # absent: the default, or "is required"
        try:
            return cast(Callable[[Any], Any], spec.parse)(s.mapping[key])
        except ValueError as e:
            raise s.error(key, str(e)) from None
    if spec.kind == "choice" or spec.choices:
        return s.get_choice(key, spec.choices, default)
    value = s.get_str(key, default, allow_empty=bool(spec.allow_empty))
    if key not in s or spec.parse is None:
        return value
    try:
        return spec.parse(value)
    except ValueError as e:
        raise s.error(key, str(e)) from None


def _int_bound(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def _read_array(s: Section, spec: SettingSpec) -> Any:
    key = spec.key
    if key not in s:
        if spec.default is REQUIRED:
            raise s.error(key, "is required")
        return spec.default
    texts = s.get_list_of_str(key, allow_empty=spec.allow_empty is not False)
    values: list[Any] = []
    for i, text in enumerate(texts):
        try:
            value = spec.parse(text) if spec.parse is not None else text
        except ValueError as e:
            raise s.item_error(key, i, str(e)) from None
        if spec.unique and value in values:
            first = f"{s.path(key)}[{values.index(value)}]"
            raise s.item_error(key, i, f"{show(text)} repeats {first}")
        values.append(value)
    return tuple(values)


# -- parsers shared by several tables ----------------------------------------------------------


def no_control_characters(text: str) -> str:
    """One line of text: no CR, LF, tab or other control character (it goes into a header)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("must not contain control characters (CR, LF, tab...)")
    return text


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address (no brackets), in ``ipaddress``'s compressed form."""
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ValueError(f"must be an IP address (IPv4 or IPv6), got {show(text)}") from None


def network(text: str) -> str:
    """An IP network in CIDR notation, or one address (a /32 or /128), normalized."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(
            f"must be a network like 192.0.2.0/24 or an IP address, got {show(text)}"
        ) from None
