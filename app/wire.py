"""The JSON shape of a delivered event and of cursors, shared by live delivery and history.

An event is encoded once, at ingest, into the bytes every viewer receives
(docs/protocol.md, "Event object"). History rows read from PostgreSQL are encoded by the same
function so a replayed event has the same fields and values as the live one (only the key order
inside `props` may differ: jsonb does not keep it).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

import orjson

_CURSOR_RE = re.compile(r"^([0-9a-f]{8})-([0-9]{1,18})$")
#: The start of an event as `encode_event` lays it out; a cursor holds no quote or escape.
_EVENT_HEAD = re.compile(rb'\{"cursor":"[^"\\]*","offset":([0-9]{1,18})[,}]').match


def format_cursor(epoch: str, offset: int) -> str:
    return f"{epoch}-{offset}"


def event_offset(payload: bytes) -> int | None:
    """The `offset` of an encoded event; None when the payload is not an event.

    Fast path for the layout `encode_event` writes (`{"cursor":"E-N","offset":N,...`): the
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
    match = _CURSOR_RE.match(value)
    if match is None:
        raise ValueError("a cursor looks like 1a2b3c4d-42 (epoch-offset)")
    return match.group(1), int(match.group(2))


def encode_event(
    *,
    epoch: str,
    offset: int,
    event_id: uuid.UUID,
    site: str,
    name: str,
    url: str,
    path: str,
    referrer: str | None,
    referrer_host: str | None,
    props: dict[str, Any],
    visitor_id: int,
    device: str,
    ts: datetime,
) -> bytes:
    return orjson.dumps(
        {
            "cursor": format_cursor(epoch, offset),
            "offset": offset,
            "id": str(event_id),
            "site": site,
            "name": name,
            "url": url,
            "path": path,
            "referrer": referrer,
            "referrer_host": referrer_host,
            "props": props,
            # Hex of the salted daily hash: lets a dashboard count current visitors.
            "visitor": f"{visitor_id & 0xFFFFFFFFFFFFFFFF:016x}",
            "device": device,
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
    )
