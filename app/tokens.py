"""Viewer tokens: signed (HS256), expiring, scoped to one site.

A token is a JWT with claims `sub` (the site id), `scope` ("view"), `iat` and `exp`. It is
accepted from `?token=` (browsers cannot set headers on WebSocket or EventSource) or an
`Authorization: Bearer` header, and never logged.

Tokens are issued with PyJWT and verified here, by a check of the one form we accept: a
compact JWS signed with HS256, nothing else. PyJWT's general decoder took ~95 µs a token, 13 %
of a gateway's whole cost of admitting a resuming viewer; this check takes ~15 µs and accepts
no token PyJWT would refuse (tests/test_tokens.py compares the two on mutated tokens;
docs/decisions.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import time
from typing import Any

import jwt
import orjson

ALGORITHM = "HS256"
SCOPE = "view"
DEFAULT_TTL_S = 3600
MAX_TOKEN_CHARS = 2048


class InvalidToken(Exception):
    """The token is missing, malformed, forged, expired or for another site; the message
    says which, and is safe to show the client."""


def issue(secret: str, site: str, ttl_s: int = DEFAULT_TTL_S, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    claims = {"sub": site, "scope": SCOPE, "iat": issued, "exp": issued + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


#: A compact JWS: three base64url segments (unpadded), the last an HS256 signature (32 bytes).
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{43})")
#: Header parameters that change how a token must be read (RFC 7515 `crit`, RFC 7797 `b64`):
#: a token carrying them is refused rather than read some other way.
_UNSUPPORTED_HEADER = ("crit", "b64")
_REQUIRED_CLAIMS = ("sub", "exp", "iat", "scope")


def verify(secret: str, token: str | None, site: str, now: float | None = None) -> None:
    """Raise InvalidToken unless `token` lets its bearer view `site` now.

    Refused: anything but three base64url segments; a signature that is not exactly the
    HS256 MAC of the first two under `secret` (compared in constant time, in its canonical
    encoding); a header or claims segment not in its canonical encoding either; a header whose
    `alg` is not HS256, that has `crit` or `b64`, or a `kid` that is not a string; claims that are
    not an object with `sub`, `exp`, `iat` and `scope`; a time claim that is not a number;
    `exp` passed, `iat` or `nbf` still to come; an `aud` (ours have none), a `jti` that is not
    a string; and `sub` or `scope` that do not match. The message says which kind of refusal,
    never the token."""
    if not token:
        raise InvalidToken("a viewer token is required (?token= or Authorization: Bearer)")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("the token is too long")
    match = _COMPACT.fullmatch(token)
    if match is None:
        raise InvalidToken("the token is invalid")
    header, payload, signature = match.groups()
    signed = token[: len(header) + 1 + len(payload)].encode("ascii")
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(base64.urlsafe_b64encode(mac).rstrip(b"="), signature.encode()):
        raise InvalidToken("the token is invalid")
    fields = _segment(header)
    if fields.get("alg") != ALGORITHM or any(name in fields for name in _UNSUPPORTED_HEADER):
        raise InvalidToken("the token is invalid")
    if not isinstance(fields.get("kid", ""), str):  # as PyJWT checks it
        raise InvalidToken("the token is invalid")
    claims = _segment(payload)
    _check_times(claims, time.time() if now is None else now)
    if claims.get("scope") != SCOPE or claims.get("sub") != site:
        raise InvalidToken("the token is not valid for this site")


def _segment(text: str) -> dict[str, Any]:
    """A JSON object in a base64url segment (signed: only our secret's holder wrote it), in
    its canonical encoding only (spare bits zero), as PyJWT reads it."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != text.encode():
            raise ValueError("not the canonical encoding")
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidToken("the token is invalid") from None
    if not isinstance(value, dict):
        raise InvalidToken("the token is invalid")
    return value


def _check_times(claims: dict[str, Any], now: float) -> None:
    if any(name not in claims for name in _REQUIRED_CLAIMS) or "aud" in claims:
        raise InvalidToken("the token is invalid")
    if not isinstance(claims.get("jti", ""), str):  # RFC 7519: a string, as PyJWT checks
        raise InvalidToken("the token is invalid")
    times = {name: _seconds(claims[name]) for name in ("exp", "iat", "nbf") if name in claims}
    if times["iat"] > now or times.get("nbf", -math.inf) > now:
        raise InvalidToken("the token is invalid")
    if times["exp"] <= now:
        raise InvalidToken("the token has expired")


def _seconds(value: object) -> int:
    """A NumericDate claim as whole seconds, as PyJWT reads it (`int()`): a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken("the token is invalid")
    return int(value)


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
