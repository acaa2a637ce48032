"""sipproxy.media.bencode: round trips (hypothesis), the wire examples, malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipproxy.media.bencode import MAX_DEPTH, BencodeError, decode, encode

values = st.recursive(
    st.binary(max_size=40) | st.integers(min_value=-(10**19), max_value=10**19),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.binary(max_size=10), children, max_size=5),
    max_leaves=30,
)


@given(values)
def test_round_trip(value: object) -> None:
    assert decode(encode(value)) == value


@given(values)
def test_encoding_is_canonical(value: object) -> None:
    data = encode(value)
    assert encode(decode(data)) == data


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_bencode_error(data: bytes) -> None:
    try:
        value = decode(data)
    except BencodeError:
        return
    assert encode(value) == data or isinstance(value, dict)  # dict keys may come unsorted


@given(values, st.integers(min_value=0, max_value=400))
def test_truncated_input_is_an_error(value: object, cut: int) -> None:
    data = encode(value)
    if cut < len(data):
        with pytest.raises(BencodeError):
            decode(data[:cut])


def test_wire_examples_from_the_ng_documentation() -> None:
    assert encode({"command": "ping"}) == b"d7:command4:pinge"
    assert decode(b"d6:result4:ponge") == {b"result": b"pong"}


def test_encode_accepts_str_tuple_and_sorts_keys() -> None:
    assert encode({"b": 1, "a": ("x", True)}) == b"d1:al1:xi1ee1:bi1ee"
    assert encode("é") == b"2:\xc3\xa9"


def test_unsorted_keys_are_accepted() -> None:
    # rtpengine itself sends keys in insertion order.
    assert decode(b"d7:command5:offer7:call-id1:xe") == {b"command": b"offer", b"call-id": b"x"}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"i",
        b"ie",
        b"i-e",
        b"i-0e",
        b"i03e",
        b"i1x2e",
        b"i12",
        b"3:ab",
        b"-1:a",
        b"01:a",
        b"1a",
        b"l",
        b"li1e",
        b"d",
        b"d1:a",
        b"di1ei2ee",
        b"d1:ai1e1:ai2ee",
        b"x",
        b"i1ei2e",
        b"4:spamX",
        b"99999999999999999999999:a",
        b"i" + b"9" * 30 + b"e",
        b"l" * (MAX_DEPTH + 1) + b"e" * (MAX_DEPTH + 1),
    ],
)
def test_malformed_input(data: bytes) -> None:
    with pytest.raises(BencodeError):
        decode(data)


def test_deep_nesting_within_the_limit() -> None:
    data = b"l" * MAX_DEPTH + b"e" * MAX_DEPTH
    value = decode(data)
    for _ in range(MAX_DEPTH - 1):
        value = value[0]
    assert value == []


@pytest.mark.parametrize("value", [1.5, None, object(), {1: 2}, {"a": 1, b"a": 2}])
def test_encode_refuses_what_bencode_cannot_say(value: object) -> None:
    with pytest.raises(BencodeError):
        encode(value)
