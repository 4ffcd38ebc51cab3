"""Viewer tokens: signed (HS256), expiring, scoped to one site.

A token is a JWT with claims `sub` (the site id), `scope` ("view"), `iat` and `exp`. It is
accepted from `?token=` (browsers cannot set headers on WebSocket or EventSource) or an
`Authorization: Bearer` header, and never logged.
"""

from __future__ import annotations

import time

import jwt

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


def verify(secret: str, token: str | None, site: str) -> None:
    """Raise InvalidToken unless `token` lets its bearer view `site` now."""
    if not token:
        raise InvalidToken("a viewer token is required (?token= or Authorization: Bearer)")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("the token is too long")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp", "iat", "scope"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the token has expired") from None
    except jwt.InvalidTokenError:
        raise InvalidToken("the token is invalid") from None
    if claims.get("scope") != SCOPE or claims.get("sub") != site:
        raise InvalidToken("the token is not valid for this site")


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
