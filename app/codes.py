"""The one table of error codes (HTTP API) and close codes (WebSocket and SSE).

Clients switch on these; docs/protocol.md documents them. Close codes follow the WebSocket
private range (4000-4999), split in two:

- 4000-4499: **reconnect** (with jittered backoff, to any gateway, resuming from the last cursor);
- 4500-4999: **do not reconnect** until the cause is fixed (a new token, a registered site).

A WebSocket connection can also end with one of RFC 6455's own codes (`StandardCloseCode`): a
client that breaks the WebSocket protocol itself, or a gateway that stops.
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
    NOT_IMPLEMENTED = ("not_implemented", 501)
    STORAGE_UNAVAILABLE = ("storage_unavailable", 503)
    BUSY = ("busy", 503)


class CloseCode(IntEnum):
    """WebSocket close codes; SSE sends the same number in a final `close` event."""

    # 4000-4499: reconnect, resuming from the last cursor.
    SHUTTING_DOWN = 4000  # gateway draining: reconnect elsewhere with jittered backoff
    SLOW_CONSUMER = 4001  # the viewer's queue overflowed; reconnect and resume
    INTERNAL = 4002  # unexpected server error
    STALE = 4003  # no pong within the timeout
    STORAGE_UNAVAILABLE = 4004  # a resume needs storage that does not answer: resume later
    BUSY = 4005  # a bound of this gateway is reached (filtered stats in use): try again later
    STORAGE_BEHIND = 4006  # storage went back (restored): resume; the welcome says what is gone
    # 4500-4999: do not reconnect without fixing the cause.
    UNAUTHORIZED = 4500  # token missing, forged, expired or for another site
    UNKNOWN_SITE = 4501  # no such site
    BAD_REQUEST = 4502  # malformed cursor or parameter
    PROTOCOL = 4503  # unknown message type, invalid JSON
    FRAME_TOO_LARGE = 4504  # a client message over the limit (whole or fragmented)

    @property
    def reconnect(self) -> bool:
        return 4000 <= self.value < 4500


class StandardCloseCode(IntEnum):
    """The RFC 6455 close codes (section 7.4.1) the gateway sends; WebSocket only. Kept apart
    from `CloseCode`, whose codes are all in the private range and also reach SSE viewers."""

    # Do not reconnect: the client broke the WebSocket protocol (RFC 6455 section 7.1.7).
    PROTOCOL_ERROR = 1002  # unmasked frame, control frame over 125 bytes or fragmented,
    # continuation frame out of order, reserved bit or unknown opcode (the parser's checks)
    UNSUPPORTED_DATA = 1003  # a binary frame: the protocol is text JSON only
    INVALID_DATA = 1007  # a text message that is not valid UTF-8 (whole or fragmented)
    POLICY_VIOLATION = 1008  # more than 50 frames (pings, pongs, fragments) in 10 s
    MESSAGE_TOO_BIG = 1009  # a message over 64 KiB, refused by the parser before it is read
    # Reconnect: the gateway stopped before its drain reached this connection.
    SERVICE_RESTART = 1012
