"""The one definition of a stored event: its fields, their PostgreSQL types, and how each is
sent to viewers. Everything else is derived from `COLUMNS`:

- the wire encoding (`encode_body`, here), the same for live and replayed events;
- storage (app.store.writes): the small commit sends rows as JSON to `sitewire_store_rows`
  (migrations/0004), which fills them into the events table's own row type by column name, so
  its signature never changes; the large commit COPYs by column name;
- reads (app.store.reads): the column list, and rows back to the wire encoding.

Adding a field: a `Column` and the matching `NewEvent` attribute here, one migration adding the
column to `events`, and whatever computes its value at ingest (app.ingest.app). The event's
position (`site_offset`, sent as `cursor` and `offset`) is not a field: only the commit knows
it (app.wire.with_position).
"""

from __future__ import annotations

import functools
import operator
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson


@functools.lru_cache(maxsize=16)
def _iso_ms(ts: datetime) -> str:
    # Cached: every event of a request shares one timestamp (app.ingest.app), and formatting it
    # was a tenth of the per-event encoding cost.
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _visitor_hex(visitor_id: int) -> str:
    # Hex of the salted daily hash (stored as a signed bigint): lets a dashboard count visitors.
    return f"{visitor_id & 0xFFFFFFFFFFFFFFFF:016x}"


def _json_object(value: Any) -> Any:
    # asyncpg returns jsonb as its text unless a codec is set on the connection.
    return orjson.loads(value) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Column:
    #: The events table's column and `NewEvent`'s attribute.
    name: str
    #: Its PostgreSQL type.
    sql: str
    #: Its key in the event's JSON (docs/protocol.md, "Event object").
    wire: str
    #: Its value as JSON, when it is not the value itself.
    to_wire: Callable[[Any], Any] | None = None
    #: A value read from PostgreSQL back to the Python value, when they differ.
    from_sql: Callable[[Any], Any] | None = None


#: In the order of the event's JSON.
COLUMNS: tuple[Column, ...] = (
    Column("event_id", "uuid", "id", to_wire=str),  # asyncpg reads its own UUID type
    Column("site", "text", "site"),
    Column("name", "text", "name"),
    Column("url", "text", "url"),
    Column("path", "text", "path"),
    Column("referrer", "text", "referrer"),
    Column("referrer_host", "text", "referrer_host"),
    Column("props", "jsonb", "props", from_sql=_json_object),
    Column("visitor_id", "bigint", "visitor", to_wire=_visitor_hex),
    Column("device", "text", "device"),
    Column("browser", "text", "browser"),  # family from the User-Agent, or null
    Column("os", "text", "os"),  # family from the User-Agent, or null
    Column("country", "text", "country"),  # ISO 3166-1 alpha-2 from the client IP, or null
    Column("ts", "timestamptz", "ts", to_wire=_iso_ms),
)
NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_WIRE_KEYS = tuple(c.wire for c in COLUMNS)
_TO_WIRE = tuple((i, c.wire, c.to_wire) for i, c in enumerate(COLUMNS) if c.to_wire)
_FROM_SQL = tuple((i, c.from_sql) for i, c in enumerate(COLUMNS) if c.from_sql)
#: Indexes of the columns stored as JSON (their `NewEvent.stored` value is the JSON text).
JSON_COLUMNS = tuple(i for i, c in enumerate(COLUMNS) if c.sql in ("json", "jsonb"))
#: The column values of a `NewEvent`, as a tuple in `COLUMNS` order (one C call).
_values = operator.attrgetter(*NAMES)


# Not frozen: these are built per event on the hot path, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs twice as much. Nothing mutates them after creation.
@dataclass(slots=True)
class NewEvent:
    """A validated, enriched event waiting to be stored: one attribute per `Column`."""

    event_id: uuid.UUID
    site: str
    name: str
    url: str
    path: str
    referrer: str | None
    referrer_host: str | None
    props: dict[str, Any]
    visitor_id: int
    device: str
    browser: str | None
    os: str | None
    country: str | None
    ts: datetime
    #: True when the server minted `event_id` (a fresh UUIDv7): it cannot already be stored,
    #: so the commit skips its duplicate lookup.
    minted: bool = False
    #: The wire bytes without the position, and the column values as stored (JSON columns
    #: as text), in `COLUMNS` order. Both are made when the event is built (while its request
    #: is handled) rather than in the commit, which every waiting request and PostgreSQL wait
    #: on (docs/performance.md).
    body: bytes = field(init=False)
    stored: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        values: tuple[Any, ...] = _values(self)
        self.body = encode_body(values)
        stored = list(values)
        for i in JSON_COLUMNS:
            stored[i] = orjson.dumps(stored[i]).decode()
        self.stored = tuple(stored)


def encode_body(values: Sequence[Any]) -> bytes:
    """The event's JSON without its position, from the column values in `COLUMNS` order.
    Ingest encodes this while handling the request; the commit only prepends the position
    (app.wire.with_position)."""
    body = dict(zip(_WIRE_KEYS, values, strict=True))
    for i, key, to_wire in _TO_WIRE:
        if values[i] is not None:
            body[key] = to_wire(values[i])
    return orjson.dumps(body)


def from_row(values: Sequence[Any]) -> list[Any]:
    """Column values read from PostgreSQL, in `COLUMNS` order, as `encode_body` takes them."""
    decoded = list(values)
    for i, from_sql in _FROM_SQL:
        decoded[i] = from_sql(decoded[i])
    return decoded
