"""The event is defined once (app.schema): the table, `NewEvent`, storage and the wire format
follow it, and a new column needs no change to the store function."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from app.schema import COLUMNS, NAMES, NewEvent
from app.servers.postgres import drop_database
from app.store.migrate import MIGRATIONS_DIR, migrate
from app.store.sites import create_site
from tests.servers import Servers, create_database


async def test_the_schema_is_the_events_table_and_new_event(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        "SELECT column_name, format_type(atttypid, atttypmod) AS type "
        "FROM information_schema.columns c JOIN pg_attribute a "
        "ON a.attrelid = 'events'::regclass AND a.attname = c.column_name "
        "WHERE c.table_name = 'events' AND c.table_schema = current_schema()"
    )
    table = {r["column_name"]: r["type"] for r in rows}
    spelled = {"timestamptz": "timestamp with time zone"}  # as format_type writes it
    expected = {c.name: spelled.get(c.sql, c.sql) for c in COLUMNS}
    assert table == {**expected, "site_offset": "bigint"}
    attributes = [f.name for f in dataclasses.fields(NewEvent) if f.init]
    assert attributes[: len(NAMES)] == list(NAMES)
    assert attributes[len(NAMES) :] == ["minted"]  # not a column: how the id was made


@pytest.fixture
async def with_extra_column(servers: Servers, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated with today's migrations plus one adding a column, as the next field
    would be added."""
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, folder)
    (folder / "9999_test_field.sql").write_text("ALTER TABLE events ADD COLUMN test_field text;")
    dsn = await create_database(servers.admin_dsn, "sw_schema")
    await migrate(dsn, folder)
    yield dsn
    await drop_database(servers.admin_dsn, dsn)


async def test_a_new_column_needs_no_change_to_the_store_function(with_extra_column: str) -> None:
    """sitewire_store_rows fills rows into the table's own type by column name: a column added
    after it was written is stored like the others, and the offsets follow as before."""
    conn = await asyncpg.connect(with_extra_column)
    try:
        await create_site(conn, "example.com")
        event = NewEvent(
            event_id=uuid.uuid4(), site="example.com", name="pageview",
            url="https://example.com/", path="/", referrer=None, referrer_host=None,
            props={"plan": "pro"}, visitor_id=7, device="desktop", browser=None, os=None,
            country=None,
            ts=datetime.now(UTC),
        )  # fmt: skip
        rows = [{**dict(zip(NAMES, event.stored, strict=True)), "test_field": "hello"}]
        rows[0]["props"] = orjson.Fragment(event.stored[NAMES.index("props")])
        out = await conn.fetch(
            "SELECT * FROM sitewire_store_rows($1::jsonb, $2::boolean[])",
            orjson.dumps(rows).decode(),
            [False],
        )
        assert [tuple(r) for r in out] == [(out[0]["epoch"], 1, False)]
        stored = await conn.fetchrow("SELECT * FROM events WHERE site = 'example.com'")
        assert stored["test_field"] == "hello" and stored["site_offset"] == 1
        assert orjson.loads(stored["props"]) == {"plan": "pro"}
    finally:
        await conn.close()
