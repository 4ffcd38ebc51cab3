import base64
import hashlib
import hmac
import json
import time

import jwt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import tokens

SECRET = "s" * 40


def test_round_trip() -> None:
    tokens.verify(SECRET, tokens.issue(SECRET, "a.com"), "a.com")


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "required"),
        ("", "required"),
        ("x" * 5000, "too long"),
        ("abc.def.ghi", "invalid"),
        (tokens.issue("t" * 40, "a.com"), "invalid"),
        (tokens.issue(SECRET, "a.com", now=time.time() - 7200), "expired"),
        (tokens.issue(SECRET, "b.com"), "not valid for this site"),
    ],
)
def test_refusals(token: str | None, message: str) -> None:
    with pytest.raises(tokens.InvalidToken, match=message):
        tokens.verify(SECRET, token, "a.com")


def test_algorithm_none_is_refused() -> None:
    unsigned = jwt.encode(
        {"sub": "a.com", "scope": "view", "iat": 1, "exp": 2**40}, None, algorithm="none"
    )
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(SECRET, unsigned, "a.com")


def test_bearer_header() -> None:
    assert tokens.bearer("Bearer abc") == "abc"
    assert tokens.bearer("bearer abc ") == "abc"
    assert tokens.bearer("Basic abc") is None
    assert tokens.bearer(None) is None


# -- the verifier against PyJWT --------------------------------------------------------------
#
# app/tokens.py verifies by hand what PyJWT would (docs/decisions.md). It may be stricter,
# never more lenient: every token it accepts, PyJWT's decoder must accept too, with the same
# claims. The tokens below are signed with the right key by hand, so that headers and claims
# PyJWT would never write (other algorithms, odd types, broken JSON) get past the signature.

#: PyJWT reads the clock itself: the time claims below are at least 1,000 s from NOW, so that
#: the seconds this module takes to run cannot change its verdict.
NOW = int(time.time())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: bytes, payload: bytes, key: str = SECRET) -> str:
    signing = f"{_b64(header)}.{_b64(payload)}"
    mac = hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(mac)}"


def _pyjwt_accepts(token: str, site: str) -> bool:
    try:
        claims = jwt.decode(
            token,
            SECRET,
            algorithms=["HS256"],
            options={"require": ["sub", "exp", "iat", "scope"]},
        )
    except jwt.InvalidTokenError:
        return False
    return claims.get("scope") == "view" and claims.get("sub") == site


def _ours_accepts(token: str, site: str) -> bool:
    try:
        tokens.verify(SECRET, token, site, now=NOW)
    except tokens.InvalidToken:
        return False
    return True


_times = st.one_of(
    st.sampled_from([NOW - 5000, NOW - 1000, NOW + 1000, NOW + 5000]),
    st.sampled_from([NOW - 1000.5, NOW + 1000.5, float(NOW + 5000)]),
    st.sampled_from([None, True, False, str(NOW + 1000), float("inf"), float("nan"), 10**30, []]),
)
_REQUIRED = ["sub", "scope", "exp", "iat"]
#: Changes to a valid claim set: a value replaced or added (time claims, or values of the
#: wrong kind), and a required claim dropped, so that most examples are near the line.
_changes = st.dictionaries(
    st.sampled_from([*_REQUIRED, "nbf", "aud", "jti"]),
    st.one_of(_times, st.sampled_from(["a.com", "b.com", "view", "admin", "", None, [], 1])),
    max_size=2,
)
_headers = st.fixed_dictionaries(
    {"alg": st.one_of(st.just("HS256"), st.sampled_from(["hs256", "HS512", "none", "RS256", ""]))},
    optional={
        "typ": st.sampled_from(["JWT", "jwt", 1]),
        "kid": st.one_of(st.text(max_size=3), st.sampled_from([5, None, [], {}])),
        "crit": st.sampled_from([["exp"], [], "b64"]),
        "b64": st.booleans(),
    },
)


@settings(max_examples=600, deadline=None)
@given(
    header=_headers,
    changes=_changes,
    dropped=st.sets(st.sampled_from(_REQUIRED), max_size=1),
    key=st.sampled_from([SECRET, SECRET, "t" * 40]),
)
def test_never_more_lenient_than_pyjwt(
    header: dict[str, object], changes: dict[str, object], dropped: set[str], key: str
) -> None:
    claims = {**orjson.loads(_good_claims()), **changes}
    for name in dropped:
        claims.pop(name, None)
    token = _signed(orjson.dumps(header), json.dumps(claims).encode(), key)
    if _ours_accepts(token, "a.com"):
        assert _pyjwt_accepts(token, "a.com"), (header, claims)


@settings(max_examples=400, deadline=None)
@given(
    position=st.integers(0, 200),
    replacement=st.sampled_from([*"AZaz09-_=.+/ \n%", "", "..", "=="]),
    drop=st.integers(0, 2),
)
def test_mangled_tokens(position: int, replacement: str, drop: int) -> None:
    good = _signed(b'{"alg":"HS256","typ":"JWT"}', _good_claims())
    position %= len(good)
    token = good[:position] + replacement + good[position + drop :]
    if _ours_accepts(token, "a.com"):
        assert _pyjwt_accepts(token, "a.com"), token


@pytest.mark.parametrize(
    "payload",
    [b"[1]", b'"text"', b"null", b"{", b"\xff\xfe", b'{"sub": "a.com"', b"{}" + b" " * 3],
)
def test_claims_that_are_not_an_object(payload: bytes) -> None:
    token = _signed(b'{"alg":"HS256"}', payload)
    assert not _ours_accepts(token, "a.com")


def test_algorithms_other_than_hs256_are_refused() -> None:
    for alg in ("HS384", "HS512", "none", "RS256", "ES256", "hs256"):
        token = _signed(orjson.dumps({"alg": alg}), _good_claims())
        assert not _ours_accepts(token, "a.com"), alg
    assert _ours_accepts(_signed(orjson.dumps({"alg": "HS256"}), _good_claims()), "a.com")


def test_signature_in_any_but_its_canonical_encoding_is_refused() -> None:
    good = _signed(b'{"alg":"HS256"}', _good_claims())
    head, _, sig = good.rpartition(".")
    # 32 bytes in 43 characters leave 2 spare bits in the last one: flipping them decodes to
    # the same MAC, and is refused (as PyJWT 2.15 refuses it; nothing of ours writes it).
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1])
    twin = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
    assert not _ours_accepts(f"{head}.{sig[:-1]}{twin}", "a.com")
    assert not _ours_accepts(f"{good}=", "a.com")
    assert _ours_accepts(good, "a.com")


def test_segments_in_any_but_their_canonical_encoding_are_refused() -> None:
    """A review: a header or claims segment whose last character had non-zero spare bits was
    accepted, where PyJWT refuses it."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    header = _b64(b'{"alg":"HS256"}')  # 15 bytes: 20 characters, no spare bits
    claims = _b64(_good_claims() + b" ")  # one more byte, so that spare bits are left
    assert len(claims) % 4 != 0
    twin = claims[:-1] + alphabet[alphabet.index(claims[-1]) ^ 1]
    for segment in (claims, twin):
        signing = f"{header}.{segment}"
        mac = hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest()
        token = f"{signing}.{_b64(mac)}"
        assert _ours_accepts(token, "a.com") is (segment == claims)
        assert _pyjwt_accepts(token, "a.com") is (segment == claims)


def test_time_claims() -> None:
    def verdict(**changes: object) -> str:
        claims = {"sub": "a.com", "scope": "view", "iat": NOW - 5, "exp": NOW + 5, **changes}
        try:
            tokens.verify(SECRET, _signed(b'{"alg":"HS256"}', orjson.dumps(claims)), "a.com", NOW)
        except tokens.InvalidToken as exc:
            return str(exc)
        return "ok"

    assert verdict() == "ok"
    assert verdict(exp=NOW) == "the token has expired"
    assert verdict(exp=NOW - 0.5) == "the token has expired"
    assert verdict(iat=NOW + 1) == "the token is invalid"  # issued in the future
    assert verdict(nbf=NOW + 1) == "the token is invalid"
    assert verdict(nbf=NOW) == "ok"
    assert verdict(exp="1900000005") == "the token is invalid"
    assert verdict(aud="a.com") == "the token is invalid"


def _good_claims() -> bytes:
    return orjson.dumps({"sub": "a.com", "scope": "view", "iat": NOW - 1000, "exp": NOW + 5000})
