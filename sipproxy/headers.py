"""The header section of a SIP message: ordered fields, names as sent, values parsed on demand."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from sipproxy.errors import ParseError
from sipproxy.uri import split_header_values

__all__ = ["COMPACT_FORMS", "LIST_HEADERS", "Headers", "canonical"]

#: RFC 3261 7.3.3 and later RFCs: compact form -> full name (lower case).
COMPACT_FORMS: Final[dict[str, str]] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

#: Headers whose values are comma-separated lists (RFC 3261 7.3.1); others are never split.
LIST_HEADERS: Final = frozenset(
    {
        "via", "contact", "route", "record-route", "path", "service-route", "allow",
        "supported", "require", "proxy-require", "unsupported", "accept", "accept-encoding",
        "accept-language", "alert-info", "call-info", "content-encoding", "content-language",
        "error-info", "in-reply-to", "warning", "allow-events", "accept-contact",
        "reject-contact", "request-disposition", "security-client", "security-server",
        "security-verify", "p-associated-uri", "history-info", "reason",
    }
)

_canon_cache: Final[dict[str, str]] = {}
# header names already checked to be tokens -> (that spelling, shared; lookup key)
_valid_names: Final[dict[str, tuple[str, str]]] = {}


def canonical(name: str) -> str:
    """The lookup key of a header name: lower case, compact forms expanded."""
    key = _canon_cache.get(name)
    if key is None:
        low = name.lower()
        key = COMPACT_FORMS.get(low, low)
        if len(_canon_cache) < 4096:
            _canon_cache[name] = key
    return key


class Field:
    """One header line. ``raw`` is the line as received (folding kept) until it is changed."""

    __slots__ = ("key", "name", "raw", "value")

    def __init__(self, name: str, key: str, value: str, raw: str | None) -> None:
        self.name = name
        self.key = key
        self.value = value
        self.raw = raw

    def render(self) -> str:
        raw = self.raw
        return raw if raw is not None else f"{self.name}: {self.value}"

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.value!r})"


class Headers:
    """Ordered, case-insensitive header fields.

    Unchanged fields keep their exact bytes (compact names, folding, odd spacing), so a message a
    proxy only inspects serializes identically; a changed field keeps the name as it was sent.
    """

    __slots__ = ("_cache", "_fields", "_packed", "_packed_eol")

    def __init__(self, fields: list[Field] | None = None) -> None:
        self._fields: list[Field] | None = fields if fields is not None else []
        # parsed values (Via list, CSeq, ...) keyed by canonical name; dropped on change
        self._cache: dict[str, object] = {}
        # the rendered header section while packed (see ``pack``), else None; its line end
        self._packed: str | None = None
        self._packed_eol = "\r\n"

    @property
    def fields(self) -> list[Field]:
        """The fields in order (a packed section is parsed back into fields on first use)."""
        fields = self._fields
        if fields is None:
            fields = self._unpack()
        return fields

    @fields.setter
    def fields(self, fields: list[Field]) -> None:
        self._fields = fields
        self._packed = None

    def _unpack(self) -> list[Field]:
        text = self._packed
        assert text is not None
        eol = self._packed_eol
        self._packed = None
        fields = self._fields = parse_header_lines(text.split(eol), eol)._fields if text else []
        assert fields is not None
        return fields

    def pack(self, eol: str = "\r\n") -> None:
        """Keep the header section as its rendered text, one string, until it is next read or
        changed: for a message kept a while only to be sent again (a transaction's request and
        last response), which then holds no per-line objects for the garbage collector to scan
        and renders at no cost. Reading it parses the text back into the same fields."""
        if self._fields is not None:
            self._packed = self.render(eol)
            self._packed_eol = eol
            self._fields = None
            # a new empty dict, not the old one cleared: CPython's collector tracks a dict only
            # once it holds a container, so a packed message leaves it nothing to scan
            self._cache = {}

    # -- reading -------------------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field's value (whole line value, not split on commas)."""
        key = canonical(name)
        for f in self.fields:
            if f.key == key:
                return f.value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of every field with this name; list headers are split on commas."""
        key = canonical(name)
        out: list[str] = []
        split = key in LIST_HEADERS
        for f in self.fields:
            if f.key == key:
                if split:
                    out.extend(split_header_values(f.value))
                else:
                    out.append(f.value)
        return out

    def count(self, name: str) -> int:
        key = canonical(name)
        return sum(1 for f in self.fields if f.key == key)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = canonical(name)
        return any(f.key == key for f in self.fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(name as sent, value) for every field, in order."""
        return ((f.name, f.value) for f in self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    # -- changing ------------------------------------------------------------------------------
    def _changed(self, key: str) -> None:
        self._cache.pop(key, None)

    def set(self, name: str, value: str) -> None:
        """Replace every field of this name with one (in the first one's place and spelling)."""
        _check_field(name, value)
        key = canonical(name)
        self._changed(key)
        first: Field | None = None
        kept: list[Field] = []
        for f in self.fields:
            if f.key == key:
                if first is None:
                    first = f
                    kept.append(f)
            else:
                kept.append(f)
        if first is None:
            self.fields.append(Field(name, key, value, None))
            return
        first.value = value
        first.raw = None
        self.fields = kept

    def add(self, name: str, value: str, first: bool = False) -> None:
        """Add a field: after the last of its name (or at the end), or before the first one."""
        _check_field(name, value)
        key = canonical(name)
        self._changed(key)
        field = Field(name, key, value, None)
        fields = self.fields
        if first:
            for i, f in enumerate(fields):
                if f.key == key:
                    fields.insert(i, field)
                    return
            fields.insert(0, field)
            return
        for i in range(len(fields) - 1, -1, -1):
            if fields[i].key == key:
                fields.insert(i + 1, field)
                return
        fields.append(field)

    def remove(self, name: str) -> None:
        key = canonical(name)
        self._changed(key)
        self.fields = [f for f in self.fields if f.key != key]

    def remove_first_value(self, name: str) -> str:
        """Remove the first value of a list header, even from a comma-joined line."""
        key = canonical(name)
        self._changed(key)
        for i, f in enumerate(self.fields):
            if f.key == key:
                if "," not in f.value:
                    del self.fields[i]
                    return f.value
                values = split_header_values(f.value)
                if len(values) == 1:
                    del self.fields[i]
                else:
                    f.value = ", ".join(values[1:])
                    f.raw = None
                return values[0]
        raise KeyError(name)

    def copy(self) -> Headers:
        return Headers([Field(f.name, f.key, f.value, f.raw) for f in self.fields])

    def cached(self, key: str) -> object | None:
        return self._cache.get(key)

    def store(self, key: str, value: object) -> None:
        self._cache[key] = value

    def render(self, eol: str = "\r\n") -> str:
        fields = self._fields
        if fields is None:
            packed = self._packed
            assert packed is not None
            if self._packed_eol == eol:
                return packed
            fields = self._unpack()
        return eol.join([f.raw if f.raw is not None else f"{f.name}: {f.value}"
                         for f in fields])


def parse_header_lines(lines: list[str], eol: str) -> Headers:
    """Build fields from header lines, joining folded continuation lines (RFC 3261 7.3.1)."""
    fields: list[Field] = []
    append = fields.append
    known = _valid_names
    last: Field | None = None
    for line in lines:
        prefix, colon, value = line.partition(":")
        hit = known.get(prefix)
        if hit is not None:  # a name seen before: a token, not a continuation line
            last = Field(hit[0], hit[1], value.strip(" \t"), line)
            append(last)
            continue
        if not line:
            raise ParseError("empty header line")
        if line[0] in " \t":
            if last is None:
                raise ParseError("continuation line before any header")
            last.raw = f"{last.raw}{eol}{line}"
            last.value = f"{last.value} {line.strip()}".strip()
            continue
        if not colon:
            raise ParseError("header line without ':'")
        name = prefix.rstrip(" \t")
        if not name or not _is_token(name):
            raise ParseError("bad header name")
        key = canonical(name)
        if len(known) < 4096:
            known[prefix] = (name, key)
        last = Field(name, key, value.strip(" \t"), line)
        append(last)
    return Headers(fields)


_TOKEN_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
)


def _check_field(name: str, value: str) -> None:
    """Refuse what would let a value written by code inject a line into the message."""
    if "\r" in value or "\n" in value or (
        name not in _valid_names and (not name or not _is_token(name))
    ):
        raise ValueError(f"bad header field {name!r}: {value!r}")


def _is_token(text: str) -> bool:
    return all(c in _TOKEN_CHARS for c in text)
