"""The one table of error codes (HTTP API) and close codes (WebSocket and SSE).

Clients switch on these; docs/protocol.md documents them. Close codes follow the WebSocket
private range (4000-4999), split in two:

- 4000-4499: **reconnect** (with jittered backoff, to any gateway, resuming from the last cursor);
- 4500-4999: **do not reconnect** until the cause is fixed (a new token, a registered site).
"""

from __future__ import annotations

from enum import Enum, IntEnum


class ErrorCode(Enum):
    """`{"error": {"code": ...}}` values and the HTTP status each is sent with."""

    def __init__(self, code: str, status: int) -> None:
        self.code = code
        self.status = status

    INVALID_JSON = ("invalid_json", 400)
    INVALID_EVENT = ("invalid_event", 400)
    INVALID_REQUEST = ("invalid_request", 400)
    UNAUTHORIZED = ("unauthorized", 401)
    FORBIDDEN = ("forbidden", 403)
    UNKNOWN_SITE = ("unknown_site", 404)
    NOT_FOUND = ("not_found", 404)
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405)
    REQUEST_TIMEOUT = ("request_timeout", 408)
    TOO_LARGE = ("too_large", 413)
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415)
    RATE_LIMITED = ("rate_limited", 429)
    HEADERS_TOO_LARGE = ("headers_too_large", 431)
    INTERNAL = ("internal", 500)
    STORAGE_UNAVAILABLE = ("storage_unavailable", 503)


class CloseCode(IntEnum):
    """WebSocket close codes; SSE sends the same number in a final `close` event."""

    # 4000-4499: reconnect, resuming from the last cursor.
    SHUTTING_DOWN = 4000  # gateway draining: reconnect elsewhere with jittered backoff
    SLOW_CONSUMER = 4001  # the viewer's queue overflowed; reconnect and resume
    INTERNAL = 4002  # unexpected server error
    STALE = 4003  # no pong within the timeout
    STORAGE_UNAVAILABLE = 4004  # a resume needs storage that does not answer: resume later
    # 4500-4999: do not reconnect without fixing the cause.
    UNAUTHORIZED = 4500  # token missing, forged, expired or for another site
    UNKNOWN_SITE = 4501  # no such site
    BAD_REQUEST = 4502  # malformed cursor or parameter
    PROTOCOL = 4503  # unknown message type, malformed frame
    FRAME_TOO_LARGE = 4504  # a client frame over the limit

    @property
    def reconnect(self) -> bool:
        return 4000 <= self.value < 4500
