import time

import pytest

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
    import jwt

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
