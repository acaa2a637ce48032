"""sipproxy.digest: the auth-param parser (with hypothesis), digests (RFC 7616 vectors),
challenges, stateless nonces and nonce-count replay protection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipproxy.digest import (
    Credentials,
    DigestError,
    NonceCounts,
    NonceFactory,
    NonceState,
    authorization,
    challenge,
    check_fields,
    format_params,
    ha1,
    parse_challenge,
    parse_credentials,
    quote,
    response,
    verify_response,
)

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"


# -- parsing ---------------------------------------------------------------------------------------
def test_parse_typical_sip_credentials() -> None:
    c = parse_credentials(
        'Digest username="alice",realm="lan.example", nonce="abc", uri="sip:lan.example",'
        ' response="0123", algorithm=SHA-256, cnonce="x y", qop=auth, nc=00000001'
    )
    assert c.is_digest
    assert c.scheme == "Digest"
    assert c.params["username"] == "alice"
    assert c.params["cnonce"] == "x y"
    assert c.params["nc"] == "00000001"
    assert c.algorithm == "SHA-256"


def test_names_case_insensitive_values_kept() -> None:
    c = parse_credentials('digest UserName="Alice" , REALM = "R"')
    assert c.is_digest
    assert c.params == {"username": "Alice", "realm": "R"}
    assert c.get("Username") == "Alice"


def test_escapes_in_quoted_strings() -> None:
    c = parse_credentials(r'Digest username="a\"b\\c\d", realm="x,y=z"')
    assert c.params["username"] == 'a"b\\cd'
    assert c.params["realm"] == "x,y=z"


def test_algorithm_default_and_spelling() -> None:
    assert parse_credentials('Digest realm="r"').algorithm == "MD5"
    assert parse_credentials('Digest realm="r", algorithm=sha-256').algorithm == "SHA-256"
    assert parse_credentials('Digest realm="r", algorithm=MD5-sess').algorithm == "MD5-sess"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        'Digest username="alice", username="bob"',
        'Digest username="unterminated',
        'Digest username="alice",',
        "Digest username",
        "Digest username=",
        'Digest ="x"',
        'Digest username="a" realm="b"',
        'Digest username="a",,realm="b"',
        'Digest username=a"b"',
        '"Digest"',
        'Digest username="a\\',
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(DigestError):
        parse_credentials(text)


tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)
# any text a quoted-string may carry (quote() escapes " and \); no CR/LF: header values
values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(tokens.map(str.lower), values, max_size=10), tokens)
def test_round_trip(params: dict[str, str], scheme: str) -> None:
    text = format_params(scheme, params.items())
    parsed = parse_credentials(text)
    assert parsed.scheme == scheme
    # format_params writes empty values quoted, tokens unquoted: all come back the same
    assert dict(parsed.params) == params


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(tokens, tokens, max_size=6), st.sampled_from([",", " , ", ",\t"]))
def test_tokens_unquoted_and_separators(params: dict[str, str], sep: str) -> None:
    lowered = {k.lower(): v for k, v in params.items()}
    if len(lowered) != len(params):
        return
    text = "Digest " + sep.join(f"{k}={v}" for k, v in params.items())
    assert dict(parse_credentials(text).params) == lowered


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_never_raises_anything_else(text: str) -> None:
    try:
        c = parse_credentials(text)
    except DigestError:
        return
    assert isinstance(c, Credentials)


def test_quote() -> None:
    assert quote('a"b\\') == '"a\\"b\\\\"'


# -- digests ---------------------------------------------------------------------------------------
# RFC 7616 section 3.9.1
MUFASA = dict(username="Mufasa", realm="http-auth@example.org", password="Circle of Life",
              nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
              cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_vectors(algorithm: str, expected: str) -> None:
    h = ha1(algorithm, MUFASA["username"], MUFASA["realm"], MUFASA["password"])
    assert response(algorithm, h, MUFASA["nonce"], "00000001", MUFASA["cnonce"], "auth", "GET",
                    "/dir/index.html") == expected


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_authorization_verifies(algorithm: str) -> None:
    [chal] = challenge("lan.example", "NONCE", [algorithm])
    value = authorization(chal, "alice", "secret", "REGISTER", "sip:lan.example", nc=3)
    c = parse_credentials(value)
    assert check_fields(c, [algorithm]) is None
    h = ha1(algorithm, "alice", "lan.example", "secret")
    assert verify_response(c, h, "REGISTER")
    assert not verify_response(c, ha1(algorithm, "alice", "lan.example", "wrong"), "REGISTER")
    assert not verify_response(c, h, "INVITE")
    assert 'qop=auth' in value and "nc=00000003" in value


def test_check_fields() -> None:
    good = parse_credentials(authorization(challenge("r", "n", ["MD5"])[0], "u", "p", "M", "sip:x"))
    assert check_fields(good, ["MD5"]) is None
    assert "algorithm" in (check_fields(good, ["SHA-256"]) or "")
    rfc2069 = Credentials("Digest", {k: v for k, v in good.params.items()
                                     if k not in ("qop", "nc", "cnonce")})
    assert "RFC 2069" in (check_fields(rfc2069, ["MD5"]) or "")
    for drop in ("username", "realm", "nonce", "uri", "response", "nc", "cnonce"):
        partial = Credentials("Digest", {k: v for k, v in good.params.items() if k != drop})
        assert check_fields(partial, ["MD5"]) is not None, drop
    for name, value in (("qop", "auth-int"), ("nc", "1"), ("nc", "0000000g"),
                        ("response", "abc"), ("userhash", "true")):
        changed = Credentials("Digest", {**good.params, name: value})
        assert check_fields(changed, ["MD5"]) is not None, (name, value)
    assert check_fields(Credentials("Basic", {}), ["MD5"]) is not None


def test_challenge_one_per_algorithm_in_order() -> None:
    values = challenge("lan.example", "N1", ["SHA-256", "MD5"], stale=True)
    assert len(values) == 2
    first, second = (parse_challenge(v) for v in values)
    assert first.algorithm == "SHA-256" and second.algorithm == "MD5"
    for c in (first, second):
        assert c.params["realm"] == "lan.example"
        assert c.params["nonce"] == "N1"
        assert c.params["qop"] == "auth"
        assert c.params["stale"] == "true"
    assert 'qop="auth"' in values[0] and "algorithm=SHA-256" in values[0]
    assert "stale" not in challenge("r", "n", ["MD5"])[0]
    with pytest.raises(DigestError):
        challenge("r", "n", ["SHA-512"])


# -- nonces ----------------------------------------------------------------------------------------
def test_nonce_fresh_stale_invalid() -> None:
    f = NonceFactory("lan.example", ttl=30)
    n = f.make(1000.0)
    assert f.check(n, 1000.0) == NonceState.FRESH
    assert f.check(n, 1030.0) == NonceState.FRESH
    assert f.check(n, 1030.5) == NonceState.STALE
    assert f.issued_at(n) == 1000.0
    assert f.check(n, 990.0) == NonceState.INVALID  # from the future
    assert NonceFactory("lan.example", 30).check(n, 1000.0) == NonceState.INVALID  # other secret
    assert NonceFactory("other", 30, f._secret).check(n, 1000.0) == NonceState.INVALID
    tampered = ("B" if n[5] != "B" else "C").join((n[:5], n[6:]))
    assert f.check(tampered, 1000.0) == NonceState.INVALID
    for junk in ("", "x" * 48, "!" * 48, n + "A"):
        assert f.check(junk, 1000.0) == NonceState.INVALID
    assert f.make(1000.0) != n  # random part


def test_nonce_counts_replay() -> None:
    counts = NonceCounts(ttl=30)
    assert counts.accept("n", 1, 0.0, 1.0)
    assert not counts.accept("n", 1, 0.0, 1.0)  # replay
    assert not counts.acceptable("n", 1, 0.0)
    assert counts.accept("n", 3, 0.0, 2.0)
    assert not counts.accept("n", 2, 0.0, 2.0)
    assert counts.accept("m", 5, 0.0, 2.0)  # a first use may start above 1
    assert not counts.accept("k", 0, 0.0, 2.0)


def test_nonce_counts_bounded_and_never_reopened() -> None:
    counts = NonceCounts(ttl=1000, max_entries=3)
    for i in range(3):
        assert counts.accept(f"n{i}", 1, float(i), 10.0)
    assert counts.accept("n3", 1, 3.0, 10.0)  # evicts n0 (issued at 0)
    assert len(counts) == 3
    assert not counts.accept("n0", 2, 0.0, 10.0)  # evicted: refused, never replayable
    assert not counts.accept("n0", 1, 0.0, 10.0)
    assert counts.accept("n1", 2, 1.0, 10.0)  # still known


def test_nonce_counts_expire() -> None:
    counts = NonceCounts(ttl=10)
    counts.accept("a", 1, 0.0, 0.0)
    counts.accept("b", 1, 5.0, 5.0)
    assert counts.purge(12.0) == 1
    assert len(counts) == 1
    counts.accept("c", 1, 30.0, 30.0)  # a later accept purges by itself
    assert len(counts) == 1
