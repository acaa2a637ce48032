"""Best-response selection (RFC 3261 16.7 step 6) as the pure function the proxy uses."""

from __future__ import annotations

from sipproxy.message import Request, Response, parse_message
from sipproxy.proxy import select_best

INVITE = (
    b"INVITE sip:bob@lan.example SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK-1\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@lan.example>;tag=a1\r\n"
    b"To: <sip:bob@lan.example>\r\n"
    b"Call-ID: select-best@test\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def answer(status: int, challenge: str | None = None) -> Response:
    request = parse_message(INVITE)
    assert isinstance(request, Request)
    response = request.make_response(status)
    if challenge is not None:
        name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        response.headers.add(name, f'Digest realm="{challenge}", nonce="n"')
    return response


def test_nothing_to_choose_from() -> None:
    assert select_best([]) is None


def test_a_6xx_wins_over_the_3xx_and_4xx_classes() -> None:
    best = select_best([answer(486), answer(603), answer(302)])
    assert best is not None and best.status == 603


def test_the_lowest_class_wins_and_a_challenge_beats_other_4xx() -> None:
    best = select_best([answer(500), answer(404), answer(407, "b"), answer(302)])
    assert best is not None and best.status == 302
    best = select_best([answer(500), answer(404), answer(407, "b")])
    assert best is not None and best.status == 407


def test_the_challenges_of_every_branch_are_merged_into_the_one_chosen() -> None:
    best = select_best([answer(401, "a"), answer(407, "b"), answer(404)])
    assert best is not None and best.status in (401, 407)
    realms = [*best.headers.get_all("WWW-Authenticate"),
              *best.headers.get_all("Proxy-Authenticate")]
    assert sorted(r.split('"')[1] for r in realms) == ["a", "b"]
