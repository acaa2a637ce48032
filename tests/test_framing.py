"""StreamFramer: cutting a TCP/TLS byte stream into messages and CRLF keepalives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipproxy.errors import ParseError
from sipproxy.message import KeepAlive, Limits, Request, StreamFramer, parse_message


def msg(body: bytes = b"", *, cl: str | None = None, call_id: str = "c1",
        cl_name: str = "Content-Length") -> bytes:
    length = str(len(body)) if cl is None else cl
    return (
        b"MESSAGE sip:a@b SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP h;branch=z9hG4bK1\r\n"
        b"To: <sip:a@b>\r\nFrom: <sip:c@d>;tag=1\r\n"
        + f"Call-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\n{cl_name}: {length}\r\n\r\n".encode()
        + body
    )


def test_one_message_in_one_read() -> None:
    data = msg(b"hello")
    framer = StreamFramer()
    assert framer.feed(data) == [data]
    assert framer.buffered == 0
    parsed = parse_message(data)
    assert isinstance(parsed, Request) and parsed.body == b"hello"


def test_message_split_byte_by_byte() -> None:
    data = msg(b"body\r\n\r\nwith blank line inside")
    framer = StreamFramer()
    out: list[bytes | KeepAlive] = []
    for i in range(len(data)):
        got = framer.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert got == []
        out.extend(got)
    assert out == [data]
    assert framer.buffered == 0


@pytest.mark.parametrize("cut", [1, 10, 40, 120, 170])
def test_message_split_at_any_point(cut: int) -> None:
    data = msg(b"0123456789" * 3)
    framer = StreamFramer()
    assert framer.feed(data[:cut]) == []
    assert framer.feed(data[cut:]) == [data]


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=200))
def test_messages_in_chunks_of_any_size(sizes: list[int]) -> None:
    # the framer resumes its search for the blank line where the last read stopped: a blank
    # line cut anywhere across reads, and the message after, must still be found
    stream = msg(b"one\r\n\r\n", call_id="a") + b"\r\n" + msg(b"", call_id="b")
    framer = StreamFramer()
    out: list[bytes | KeepAlive] = []
    i, k = 0, 0
    while i < len(stream):
        size = sizes[k % len(sizes)]
        out.extend(framer.feed(stream[i : i + size]))
        i, k = i + size, k + 1
    assert [o for o in out if isinstance(o, bytes)] == [
        msg(b"one\r\n\r\n", call_id="a"), msg(b"", call_id="b")]
    assert framer.buffered == 0


def test_several_messages_in_one_read() -> None:
    a, b, c = msg(b"one", call_id="a"), msg(b"", call_id="b"), msg(b"three", call_id="c")
    framer = StreamFramer()
    assert framer.feed(a + b + c[:20]) == [a, b]
    assert framer.feed(c[20:]) == [c]
    assert [parse_message(m).call_id for m in (a, b, c)] == ["a", "b", "c"]


def test_compact_content_length() -> None:
    data = msg(b"xyz", cl_name="l")
    assert StreamFramer().feed(data) == [data]
    data = msg(b"xyz", cl_name="content-LENGTH")
    assert StreamFramer().feed(data) == [data]


def test_folded_content_length() -> None:
    data = msg(b"xyz", cl="\r\n 3")
    assert StreamFramer().feed(data) == [data]
    assert parse_message(data).body == b"xyz"


def test_ping_and_pong() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == [KeepAlive.PING]
    assert framer.feed(b"\r\n") == [KeepAlive.PONG]
    data = msg()
    assert framer.feed(b"\r\n\r\n" + data + b"\r\n") == [KeepAlive.PING, data, KeepAlive.PONG]
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == [KeepAlive.PING, KeepAlive.PING]
    assert framer.buffered == 0


def test_partial_ping_waits() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n\r") == []
    assert framer.feed(b"\n") == [KeepAlive.PING]


def test_pong_then_message() -> None:
    data = msg(b"x")
    assert StreamFramer().feed(b"\r\n" + data) == [KeepAlive.PONG, data]


def test_keepalive_inside_body_is_body() -> None:
    data = msg(b"\r\n\r\n")
    assert StreamFramer().feed(data) == [data]


def test_missing_content_length() -> None:
    data = msg().replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(ParseError) as exc:
        StreamFramer().feed(data)
    assert exc.value.status == 400


@pytest.mark.parametrize("value", ["-1", "abc", "1 2", "", "+5", "0x5"])
def test_bad_content_length(value: str) -> None:
    with pytest.raises(ParseError) as exc:
        StreamFramer().feed(msg(cl=value))
    assert exc.value.status == 400


def test_duplicate_content_length() -> None:
    data = msg(b"ab").replace(b"Content-Length: 2\r\n", b"Content-Length: 2\r\nl: 2\r\n")
    with pytest.raises(ParseError) as exc:
        StreamFramer().feed(data)
    assert exc.value.status == 400


def test_content_length_in_body_is_not_a_header() -> None:
    body = b"x\r\nContent-Length: 99\r\n"
    data = msg(body)
    assert StreamFramer().feed(data) == [data]


def test_oversize_header_section_without_end() -> None:
    framer = StreamFramer(Limits(max_message=200))
    framer.feed(b"INVITE sip:a@b SIP/2.0\r\n")
    with pytest.raises(ParseError) as exc:
        for _ in range(50):  # bounded: the limit trips long before
            framer.feed(b"X-Pad: " + b"a" * 20 + b"\r\n")
    assert exc.value.status == 513


def test_oversize_header_section_in_one_read() -> None:
    data = msg()
    with pytest.raises(ParseError) as exc:
        StreamFramer(Limits(max_message=len(data) - 10)).feed(data)
    assert exc.value.status == 513


def test_body_larger_than_max_body() -> None:
    framer = StreamFramer(Limits(max_body=10))
    assert framer.feed(msg(b"x" * 10)) != []
    with pytest.raises(ParseError) as exc:
        framer.feed(msg(b"x" * 11)[:-11])  # refused as soon as the header says so
    assert exc.value.status == 413


def test_huge_content_length_refused_early() -> None:
    with pytest.raises(ParseError) as exc:
        StreamFramer().feed(msg(cl="99999999999999999999999"))
    assert exc.value.status == 413


def test_framed_then_parsed_with_trailing_data_kept_for_next() -> None:
    a = msg(b"abc")
    framer = StreamFramer()
    assert framer.feed(a + b"INV") == [a]
    assert framer.buffered == 3


def test_ping_split_in_two_reads_is_two_pongs() -> None:
    """Deliberate: a lone CRLF is reported at once (a client waiting for its pong must see it),
    so a CRLFCRLF ping cut between its two CRLFs reads as two pongs. RFC 5626 clients send the
    ping in one write; a half-ping is harmless (no message is lost or misframed)."""
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == [KeepAlive.PONG]
    assert framer.feed(b"\r\n") == [KeepAlive.PONG]
    assert framer.buffered == 0


def test_bare_lf_between_messages_ignored() -> None:
    data = msg(b"x")
    assert StreamFramer().feed(b"\n" + data) == [data]
