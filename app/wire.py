"""An event's position on the wire: cursors, the `cursor` and `offset` keys that lead every
encoded event, and reading the offset back without decoding the rest.

An event's fields are encoded once, at ingest (app.schema.encode_body), into the bytes every
viewer receives (docs/protocol.md, "Event object"); the commit prepends the position
(`with_position`). History rows are encoded by the same functions, so a replayed event has the
same fields and values as the live one (only the key order inside `props` may differ: jsonb
does not keep it).
"""

from __future__ import annotations

import re

import orjson

#: An encoded event with its offset: what history reads return and viewers' queues hold.
Event = tuple[int, bytes]

_CURSOR_RE = re.compile(r"([0-9a-f]{8})-([0-9]{1,18})")
#: Numbers in query parameters as docs/protocol.md writes them: ASCII digits, no sign, no
#: underscores (int() and float() take "+5", "1_0", "1e3" and other scripts' digits).
_WHOLE_RE = re.compile(r"[0-9]{1,18}")
_DECIMAL_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,18})?")
#: The start of an event as `with_position` lays it out; a cursor holds no quote or escape.
_EVENT_HEAD = re.compile(rb'\{"cursor":"[^"\\]*","offset":([0-9]{1,18})[,}]').match


def format_cursor(epoch: str, offset: int) -> str:
    return f"{epoch}-{offset}"


def event_offset(payload: bytes) -> int | None:
    """The `offset` of an encoded event; None when the payload is not an event.

    Fast path for the layout `with_position` writes (`{"cursor":"E-N","offset":N,...`): the
    gateway reads one offset per published event and never needs the rest, and decoding the
    whole ~300-byte JSON was most of its per-event cost. Any other layout is decoded."""
    head = _EVENT_HEAD(payload)
    if head is not None:
        return int(head[1])
    try:
        offset = orjson.loads(payload)["offset"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return offset if type(offset) is int else None


def parse_cursor(value: str) -> tuple[str, int]:
    """`epoch-offset` -> (epoch, offset); ValueError when malformed."""
    match = _CURSOR_RE.fullmatch(value)
    if match is None:
        raise ValueError("a cursor looks like 1a2b3c4d-42 (epoch-offset)")
    return match.group(1), int(match.group(2))


def parse_whole(value: str) -> int:
    """A whole number from a query parameter (ASCII digits only); ValueError otherwise."""
    if _WHOLE_RE.fullmatch(value) is None:
        raise ValueError("not a whole number")
    return int(value)


def parse_decimal(value: str) -> float:
    """A decimal number from a query parameter (`30`, `0.5`); ValueError otherwise."""
    if _DECIMAL_RE.fullmatch(value) is None:
        raise ValueError("not a decimal number")
    return float(value)


def with_position(epoch: str, offset: int, body: bytes) -> bytes:
    """The complete event: `{"cursor":...,"offset":...,` then `body` without its opening brace.
    The epoch is 8 hex digits and the offset an int, so neither needs JSON escaping."""
    return b'{"cursor":"%s-%d","offset":%d,%s' % (epoch.encode(), offset, offset, body[1:])


#: The control message the publish script sends on a site's channel when storage handed its
#: offsets out again (app.broker.redis): events after `went_back` up to `through` changed.
_WENT_BACK = re.compile(rb'\{"went_back":(-?\d+),"through":(\d+)\}')


def went_back_message(after: int, through: int) -> bytes:
    return b'{"went_back":%d,"through":%d}' % (after, through)


def went_back(payload: bytes) -> tuple[int, int] | None:
    """(after, through) of a went-back control message; None for anything else."""
    found = _WENT_BACK.fullmatch(payload)
    return None if found is None else (int(found[1]), int(found[2]))
