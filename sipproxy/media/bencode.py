"""Bencode (the BitTorrent encoding rtpengine's NG protocol uses): encode and decode.

Values are ``bytes``, ``int``, ``list`` and ``dict`` with ``bytes`` keys. ``encode`` also takes
``str`` (as UTF-8), ``tuple`` and ``str`` keys, and writes dictionary keys sorted, so the same
value always gives the same bytes. ``decode`` is strict about the grammar (no leading zeros, no
``-0``, no trailing data, no duplicate keys) but, like rtpengine, accepts dictionary keys in any
order. It is bounded: nesting depth and the number of values are limited, and a string can never
claim more bytes than the input holds. Bad input raises :class:`BencodeError` and nothing else.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MAX_DEPTH", "MAX_VALUES", "BencodeError", "decode", "encode"]

#: Deepest nesting of lists and dicts ``decode`` accepts.
MAX_DEPTH: Final = 32
#: Most values (of any kind) one ``decode`` call builds.
MAX_VALUES: Final = 100_000

_DIGITS: Final = frozenset(b"0123456789")


class BencodeError(ValueError):
    """Input that is not bencode (or a value ``encode`` cannot write)."""


def encode(value: Any) -> bytes:
    """The bencoding of ``value``."""
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _key(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8", "surrogateescape")
    raise BencodeError(f"dictionary key must be bytes or str, got {type(key).__name__}")


def _encode(value: Any, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BencodeError("value nested too deeply")
    if isinstance(value, bool):
        out.append(b"i%de" % int(value))
    elif isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogateescape")
        out.append(b"%d:" % len(data))
        out.append(data)
    elif isinstance(value, list | tuple):
        out.append(b"l")
        for item in value:
            _encode(item, out, depth + 1)
        out.append(b"e")
    elif isinstance(value, Mapping):
        items = sorted(((_key(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        for (a, _), (b, _) in itertools.pairwise(items):
            if a == b:
                raise BencodeError(f"duplicate dictionary key {a!r}")
        out.append(b"d")
        for k, v in items:
            out.append(b"%d:" % len(k))
            out.append(k)
            _encode(v, out, depth + 1)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot bencode {type(value).__name__}")


def decode(data: bytes | bytearray | memoryview) -> Any:
    """The value ``data`` encodes; raises :class:`BencodeError` for anything malformed."""
    buf = bytes(data)
    decoder = _Decoder(buf)
    value = decoder.value(0)
    if decoder.pos != len(buf):
        raise BencodeError(f"trailing data at offset {decoder.pos}")
    return value


class _Decoder:
    __slots__ = ("count", "data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.count = 0

    def _fail(self, problem: str) -> BencodeError:
        return BencodeError(f"{problem} at offset {self.pos}")

    def _number(self, end: int) -> int:
        """The decimal digits from pos up to the byte ``end``, with an optional minus."""
        stop = self.data.find(bytes((end,)), self.pos)
        if stop < 0:
            raise self._fail("unterminated number")
        text = self.data[self.pos : stop]
        digits = text[1:] if text.startswith(b"-") else text
        if not digits or any(b not in _DIGITS for b in digits) or len(digits) > 20:
            raise self._fail("malformed number")
        if digits[0] == 0x30 and (len(digits) > 1 or text.startswith(b"-")):
            raise self._fail("number with a leading zero or -0")
        self.pos = stop + 1
        return int(text)

    def string(self) -> bytes:
        start = self.pos
        length = self._number(0x3A)  # ':'
        if self.data[start] == 0x2D:  # '-'
            self.pos = start
            raise self._fail("negative string length")
        end = self.pos + length
        if end > len(self.data):
            raise self._fail("string longer than the input")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def value(self, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self._fail("too many values")
        if self.pos >= len(self.data):
            raise self._fail("unexpected end of input")
        lead = self.data[self.pos]
        if lead in _DIGITS:
            return self.string()
        if lead == 0x69:  # 'i'
            self.pos += 1
            return self._number(0x65)  # 'e'
        if lead not in (0x6C, 0x64):  # 'l', 'd'
            raise self._fail(f"unexpected byte {bytes((lead,))!r}")
        if depth >= MAX_DEPTH:
            raise self._fail("nested too deeply")
        self.pos += 1
        if lead == 0x6C:
            items: list[Any] = []
            while True:
                if self.pos >= len(self.data):
                    raise self._fail("unterminated list")
                if self.data[self.pos] == 0x65:
                    self.pos += 1
                    return items
                items.append(self.value(depth + 1))
        result: dict[bytes, Any] = {}
        while True:
            if self.pos >= len(self.data):
                raise self._fail("unterminated dictionary")
            if self.data[self.pos] == 0x65:
                self.pos += 1
                return result
            if self.data[self.pos] not in _DIGITS:
                raise self._fail("dictionary key is not a string")
            key = self.string()
            if key in result:
                raise self._fail(f"duplicate dictionary key {key!r}")
            result[key] = self.value(depth + 1)
