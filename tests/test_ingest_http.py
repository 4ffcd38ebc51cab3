"""Ingest's event endpoints are served straight from the HTTP protocol, without ASGI
(app.web.http `Direct`). What uvicorn's ASGI path gave them must still hold: pipelining in
order, `Expect: 100-continue`, `Connection: close`, the same answers as the ASGI path, and
nothing on the internal listener. Raw sockets against a real ingest process."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from tests.clients import connected, response
from tests.processes import AppProcess
from tests.support import BROWSER, FAST, event

pytestmark = pytest.mark.slow


def post(path: str, body: Any, *headers: str) -> bytes:
    data = orjson.dumps(body)
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    head += [f"User-Agent: {BROWSER}", f"Content-Length: {len(data)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def offsets_by_url(dsn: str, site: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT url FROM events WHERE site = $1 ORDER BY site_offset", site)
    finally:
        await conn.close()
    return [r["url"] for r in rows]


@pytest.fixture
def ingest(spawn: Callable[..., AppProcess]) -> AppProcess:
    return spawn("ingest", **FAST)


async def test_pipelined_requests_are_answered_in_order_direct_or_not(
    ingest: AppProcess, site: str, database_url: str
) -> None:
    """Four requests in one write: direct, ASGI (a probe), a direct batch, and an event with
    a query string (served through ASGI). Answered in order, stored in order."""
    urls = [f"https://{site}/{i}" for i in range(4)]
    pipeline = b"".join(
        [
            post("/api/event", event(site, url=urls[0])),
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            post("/api/events", [event(site, url=urls[1]), event(site, url=urls[2])]),
            post("/api/event?via=asgi", event(site, url=urls[3])),
        ]
    )
    async with connected(ingest.port) as (reader, writer):
        writer.write(pipeline)
        answers = [await response(reader) for _ in range(4)]
    assert [status for status, _, _ in answers] == [202, 200, 202, 202]
    first, batch, last = (orjson.loads(answers[i][2]) for i in (0, 2, 3))
    assert first["cursor"] < batch["results"][0]["cursor"] < batch["results"][1]["cursor"]
    assert batch["results"][1]["cursor"] < last["cursor"]
    assert await offsets_by_url(database_url, site) == urls


async def test_direct_and_asgi_answers_are_alike(ingest: AppProcess, site: str) -> None:
    origin = f"Origin: https://{site}"
    async with connected(ingest.port) as (reader, writer):
        found = []
        for path in ("/api/event", "/api/event?via=asgi"):
            for body in (event(site), {"site": site}):  # accepted, then refused
                writer.write(post(path, body, origin))
                found.append(await response(reader))
    direct, asgi = found[:2], found[2:]
    for (d_status, d_headers, d_body), (a_status, a_headers, a_body) in zip(
        direct, asgi, strict=True
    ):
        assert d_status == a_status
        for name in ("content-type", "access-control-allow-origin", "vary"):
            assert d_headers[name] == a_headers[name], name
        d, a = orjson.loads(d_body), orjson.loads(a_body)
        assert d.keys() == a.keys()
        if "error" in d:
            assert d == a
    assert direct[0][0] == 202 and direct[1][0] == 400


async def test_expect_100_continue_and_connection_close(ingest: AppProcess, site: str) -> None:
    data = orjson.dumps(event(site))
    head = (
        f"POST /api/event HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    async with connected(ingest.port) as (reader, writer):
        writer.write(head)
        async with asyncio.timeout(10):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(data)
        status, headers, _ = await response(reader)
        assert status == 202 and headers["connection"] == "close"
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # and the server closed the connection


async def test_the_internal_listener_takes_no_events(ingest: AppProcess, site: str) -> None:
    async with connected(ingest.internal_port) as (reader, writer):
        writer.write(post("/api/event", event(site)))
        status, _, _ = await response(reader)
    assert status == 404


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    spawn: Callable[..., AppProcess], site: str, database_url: str, trusted: bool
) -> None:
    """uvicorn believed X-Forwarded-For from 127.0.0.1 whatever SITEWIRE_TRUSTED_PROXIES said;
    the country (8.8.8.8 is in the US) shows which address was used."""
    extra = {"SITEWIRE_TRUSTED_PROXIES": "127.0.0.1/32"} if trusted else {}
    ingest = spawn("ingest", **FAST, **extra)
    async with connected(ingest.port) as (reader, writer):
        writer.write(post("/api/event", event(site), "X-Forwarded-For: 8.8.8.8"))
        status, _, _ = await response(reader)
    assert status == 202
    conn = await asyncpg.connect(database_url)
    try:
        country = await conn.fetchval("SELECT country FROM events WHERE site = $1", site)
    finally:
        await conn.close()
    assert country == ("US" if trusted else None)


#: Deadlines of 1 s, for the refusals below.
SHORT = {**FAST, "SITEWIRE_HEADER_TIMEOUT_S": "1", "SITEWIRE_BODY_TIMEOUT_S": "1"}


@contextlib.asynccontextmanager
async def commits_held(database_url: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Commits wait (a lock on `events` that inserts queue behind) until `release()`."""
    conn = await asyncpg.connect(database_url)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute("LOCK TABLE events IN SHARE MODE")
    released = False

    async def release() -> None:
        nonlocal released
        if not released:
            released = True
            await transaction.rollback()

    try:
        yield release
    finally:
        await release()
        await conn.close()


async def stored_count(database_url: str, site: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM events WHERE site = $1", site)
    finally:
        await conn.close()
    return count


@pytest.mark.parametrize("refusal", ["body_timeout", "headers_too_large"])
async def test_a_refused_pipelined_request_is_answered_after_the_one_before_it(
    spawn: Callable[..., AppProcess], site: str, database_url: str, refusal: str
) -> None:
    """A request refused while the one before it is still being stored: the stored one's 202
    comes first, then the refusal, then the connection closes. Written first, the refusal
    would be taken for the first request's answer, and its retry stored the event twice."""
    ingest = spawn("ingest", **SHORT)
    if refusal == "body_timeout":  # headers, then 5 bytes of a 100-byte body
        second = b'POST /api/event HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"si'
        expected = (408, "request_timeout")
    else:
        second = b"POST /api/event HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\nX: 1\r\n"
        expected = (431, "headers_too_large")
    async with commits_held(database_url) as release, connected(ingest.port) as (reader, writer):
        writer.write(post("/api/event", event(site)) + second)
        await asyncio.sleep(2)  # past the 1 s deadline, the first commit still waiting
        await release()
        first = await response(reader)
        refused = await response(reader)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    assert first[0] == 202 and "cursor" in orjson.loads(first[2])
    assert (refused[0], orjson.loads(refused[2])["error"]["code"]) == expected
    assert await stored_count(database_url, site) == 1


async def test_pipelined_requests_are_bounded(
    spawn: Callable[..., AppProcess], site: str, database_url: str
) -> None:
    """One served and MAX_PIPELINED waiting: the next is refused (429), after their answers."""
    from app.web.http import MAX_PIPELINED

    ingest = spawn("ingest", **FAST)
    count = MAX_PIPELINED + 4
    async with commits_held(database_url) as release, connected(ingest.port) as (reader, writer):
        writer.write(b"".join(post("/api/event", event(site)) for _ in range(count)))
        await asyncio.sleep(0.5)
        await release()
        answers = [await response(reader) for _ in range(MAX_PIPELINED + 2)]
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    statuses = [status for status, _, _ in answers]
    assert statuses == [202] * (MAX_PIPELINED + 1) + [429]
    assert await stored_count(database_url, site) == MAX_PIPELINED + 1


async def test_an_h2c_upgrade_is_refused_plainly(ingest: AppProcess, site: str) -> None:
    """curl --http2 on plain http asks for h2c; the parser stops at an upgrade, so the body
    was lost and the event refused as `invalid_json` ("zero-length document")."""
    upgrade = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABk")
    async with connected(ingest.port) as (reader, writer):
        writer.write(post("/api/event", event(site), *upgrade))
        status, _, body = await response(reader)
    error = orjson.loads(body)["error"]
    assert (status, error["code"]) == (400, "invalid_request")
    assert "upgrade" in error["message"]


async def test_an_h2c_upgrade_pipelined_behind_a_stored_event_is_refused_after_its_answer(
    spawn: Callable[..., AppProcess], site: str, database_url: str
) -> None:
    ingest = spawn("ingest", **FAST)
    upgrade = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABk")
    async with commits_held(database_url) as release, connected(ingest.port) as (reader, writer):
        writer.write(post("/api/event", event(site)) + post("/api/event", event(site), *upgrade))
        await asyncio.sleep(0.5)
        await release()
        first = await response(reader)
        refused = await response(reader)
    assert first[0] == 202 and refused[0] == 400
    assert await stored_count(database_url, site) == 1


async def test_a_compressed_transfer_coding_is_refused_501(
    ingest: AppProcess, site: str, database_url: str
) -> None:
    """From an outside test: `Transfer-Encoding: gzip, chunked` reached validation dechunked
    but still compressed, and was refused as invalid JSON ("surrogates not allowed")."""
    data = gzip.compress(orjson.dumps(event(site)))
    head = ["POST /api/event HTTP/1.1", "Host: x", "Content-Type: application/json"]
    head += [f"User-Agent: {BROWSER}", "Transfer-Encoding: gzip, chunked"]
    chunked = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    async with connected(ingest.port) as (reader, writer):
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + chunked)
        status, _, body = await response(reader)
    error = orjson.loads(body)["error"]
    assert (status, error["code"]) == (501, "not_implemented")
    assert "Transfer-Encoding" in error["message"]
    assert await offsets_by_url(database_url, site) == []
