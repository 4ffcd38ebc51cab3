"""Every connection a client can hold on either role is bounded (app/web/http.py): time to send
headers and a body, header bytes and count. Tried with raw sockets against real processes,
with short deadlines so the tests stay quick."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import asyncpg
import httpx
import orjson
import pytest

from app.web.http import MAX_HEADERS
from tests.clients import connected, post_large, response
from tests.processes import AppProcess
from tests.support import BROWSER, FAST, eventually, token

pytestmark = pytest.mark.slow

#: Deadlines the processes under test run with (the defaults are 30 s).
SHORT = {**FAST, "SITEWIRE_HEADER_TIMEOUT_S": "1", "SITEWIRE_BODY_TIMEOUT_S": "1"}


async def answer_and_close(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded). Start it before
    writing more: once a write fails on the closed connection, the reader raises that error
    instead of returning what it had buffered."""
    received = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                received += chunk
    return received


def status_and_error(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)["error"]["code"]


@pytest.fixture(params=["ingest", "gateway"])
def server(request: pytest.FixtureRequest, spawn: Callable[..., AppProcess]) -> AppProcess:
    return spawn(request.param, **SHORT)


async def test_a_connection_that_sends_nothing_is_closed(server: AppProcess) -> None:
    async with connected(server.port) as (reader, _):
        began = time.monotonic()
        raw = await answer_and_close(reader)
        assert time.monotonic() - began < 5  # a bound: the deadline is 1 s
        assert status_and_error(raw) == (408, "request_timeout")


async def test_headers_sent_a_byte_at_a_time_are_cut_off(server: AppProcess) -> None:
    """Slowloris: each byte keeps the connection busy, but the headers never complete."""
    async with connected(server.port) as (reader, writer):
        answer = asyncio.create_task(answer_and_close(reader))
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        began = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for byte in request:
                if answer.done() or time.monotonic() - began > 10:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        raw = await answer
        assert time.monotonic() - began < 5
        assert status_and_error(raw) == (408, "request_timeout")


@pytest.mark.parametrize("role", ["ingest", "gateway"])
async def test_a_shorter_deadline_after_a_longer_one_is_kept_on_time(
    spawn: Callable[..., AppProcess], role: str
) -> None:
    """One timer serves a connection's deadlines (app/web/http.py), moved to the body's 20 s
    while a slow body (2 s, past the headers' 1 s) is sent: the next request's headers still
    get their 1 s, not what is left of the 20."""
    server = spawn(role, **{**SHORT, "SITEWIRE_BODY_TIMEOUT_S": "20"})
    async with connected(server.port) as (reader, writer):
        writer.write(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        await asyncio.sleep(2)
        writer.write(b"{}")
        status, _, _ = await response(reader)
        assert status < 500
        answer = asyncio.create_task(answer_and_close(reader))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        began = time.monotonic()
        raw = await answer
    assert time.monotonic() - began < 5
    assert status_and_error(raw) == (408, "request_timeout")


async def test_an_endless_header_is_refused_long_before_it_ends(server: AppProcess) -> None:
    async with connected(server.port) as (reader, writer):
        answer = asyncio.create_task(answer_and_close(reader))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < 64 * 1024 * 1024 and not answer.done():
                writer.write(b"a" * 65536)
                await writer.drain()
                sent += 65536
                await asyncio.sleep(0)  # let the answer be read as soon as it comes
        raw = await answer
        assert sent < 4 * 1024 * 1024  # refused within a read or two of the 32 KiB limit
        assert status_and_error(raw) == (431, "headers_too_large")


async def test_too_many_headers_are_refused(server: AppProcess) -> None:
    async with connected(server.port) as (reader, writer):
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert status_and_error(await answer_and_close(reader)) == (431, "headers_too_large")


async def test_an_unfinished_chunked_body_is_cut_off_and_nothing_stored(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    ingest = spawn("ingest", **SHORT)
    async with connected(ingest.port) as (reader, writer):
        writer.write(
            b"POST /api/event HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"User-Agent: " + BROWSER.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"sit\r\n'
        )
        began = time.monotonic()
        raw = await answer_and_close(reader)
        assert time.monotonic() - began < 5
        assert status_and_error(raw)[0] in (400, 408)  # the app may see the client go first
        async with httpx.AsyncClient() as client:
            history = await client.get(
                f"{spawn('gateway', **SHORT).url}/v1/sites/{site}/history",
                params={"token": token(site)},
            )
        assert history.json()["events"] == []


async def test_well_behaved_clients_are_unaffected(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """Keep-alive requests, each under its own deadline, and a stream that lasts longer than
    every deadline: the limits cover receiving requests, never serving them."""
    ingest = spawn("ingest", **SHORT)
    gateway = spawn("gateway", **SHORT)
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}) as client:
        for i in range(3):  # one connection, kept alive across the deadline
            body = {"site": site, "name": "pageview", "url": f"https://{site}/{i}"}
            r = await client.post(f"{ingest.url}/api/event", json=body)
            assert r.status_code == 202
            await asyncio.sleep(0.7)  # idle on purpose: 2.1 s in all, past the 1 s deadline
        url = f"{gateway.url}/v1/sites/{site}/events"
        async with client.stream("GET", url, params={"token": token(site), "last": "3"}) as r:
            assert r.status_code == 200
            seen = 0
            async with asyncio.timeout(10):
                async for line in r.aiter_lines():
                    seen += line.startswith("id: ")
                    if seen == 3:
                        break
            await asyncio.sleep(1.5)  # on purpose: past both deadlines, the stream is still open
            assert not r.is_closed


def established(port: int) -> int:
    """Server-side TCP connections of `port` still established (the kernel's own count)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


#: Requests that open a stream: SSE, and a WebSocket upgrade.
STREAM_REQUESTS = {
    "sse": "GET /v1/sites/{site}/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n",
    "websocket": (
        "GET /v1/sites/{site}/stream?token={token} HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ),
}


@pytest.mark.parametrize("transport", sorted(STREAM_REQUESTS))
async def test_viewers_that_never_read_lose_their_sockets(
    spawn: Callable[..., AppProcess], site: str, transport: str
) -> None:
    """Closed as slow, a viewer that does not read is dropped: no socket, file descriptor or
    kernel buffer left behind (an SSE close would wait for it to read for ever; a WebSocket
    one is aborted when its close frame is not answered)."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST, SITEWIRE_WRITE_TIMEOUT_S="0.5")
    request = STREAM_REQUESTS[transport].format(site=site, token=token(site)).encode()
    idle = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(request)
        idle.append(sock)  # never read from
    try:
        await eventually(lambda: established(gateway.port) >= 5, 30, 0.05, "5 established")
        # ~9 MB to each: more than the kernel's socket buffers hold, so writes stall.
        await post_large(ingest.url, site, 1500, 6000)
        await eventually(lambda: established(gateway.port) == 0, 30, 0.1, "all 5 dropped")
        closes = await metric_sum(gateway.internal_url, "sitewire_gateway_closes_total")
        assert closes == 5  # each close counted once, whichever way it was found
    finally:
        for sock in idle:
            sock.close()


async def metric_sum(url: str, name: str) -> float:
    """The sum of a Prometheus counter's series."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_a_history_page_is_bounded_in_bytes_and_pages_on(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """300 events of 6 KB asked for in one page: the page stops at 1 MiB with `next`, and
    following `next` gives every event once."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    await post_large(ingest.url, site, 300, 6000)
    offsets: list[int] = []
    params: dict[str, str] = {"token": token(site), "limit": "1000"}
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            r = await client.get(f"{gateway.url}/v1/sites/{site}/history", params=params)
            assert r.status_code == 200 and len(r.content) <= 1024 * 1024 + 100
            page = r.json()
            offsets += [e["offset"] for e in page["events"]]
            if page["next"] is None:
                break
            params["after"] = page["next"]
    assert offsets == list(range(1, 301))


async def test_errors_everywhere_have_the_documented_shape(server: AppProcess) -> None:
    """Unknown paths, wrong methods and unreadable requests answer in the error shape; no
    trailing-slash redirect (it carried the token to a Host-built URL), no OpenAPI schema."""
    async with httpx.AsyncClient() as client:
        for path in ("/nowhere", "/openapi.json", "/docs", "/v1/sites/a.com/history/"):
            r = await client.get(f"{server.url}{path}?token=secret", follow_redirects=False)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == "not_found", path
        r = await client.delete(f"{server.url}/healthz")
        assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
    async with connected(server.port) as (reader, writer):
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        assert status_and_error(await answer_and_close(reader)) == (400, "invalid_request")


async def posting_latencies(url: str, site: str, count: int) -> list[float]:
    """Seconds each of `count` sequential posts took (each on a fresh connection)."""
    latencies = []
    for i in range(count):
        async with httpx.AsyncClient(headers={"User-Agent": BROWSER}) as client:
            began = time.monotonic()
            body = {"site": site, "name": "pageview", "url": f"https://{site}/{i}"}
            r = await client.post(f"{url}/api/event", json=body)
            latencies.append(time.monotonic() - began)
            assert r.status_code == 202
    return sorted(latencies)


async def test_thousands_of_idle_sockets_are_closed_and_cost_others_little(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """5,000 connections that send nothing: served clients are unaffected meanwhile, and
    every idle one is closed once its header deadline passes."""
    ingest = spawn("ingest", **{**SHORT, "SITEWIRE_HEADER_TIMEOUT_S": "3"})
    quiet = await posting_latencies(ingest.url, site, 40)
    idle = []
    try:
        for _ in range(5000):
            idle.append(await asyncio.open_connection("127.0.0.1", ingest.port))
        busy = await posting_latencies(ingest.url, site, 40)
        # The 90th percentile of 40: with 40 samples a "p99" is the slowest one, and one pause
        # of the host (a CI run saw 180 ms against 18 ms quiet) failed the check.
        p90 = busy[int(len(busy) * 0.9)]
        quiet_p90 = quiet[int(len(quiet) * 0.9)]
        print(f"idle sockets: p90 {quiet_p90 * 1000:.1f} ms quiet, {p90 * 1000:.1f} ms with 5,000")
        assert p90 < 3 * quiet_p90 + 0.05  # a ratio within one run, with room for a noisy host
        await eventually(lambda: established(ingest.port) == 0, 20, 0.2, "idle sockets closed")
    finally:
        for _, writer in idle:
            writer.close()


async def flood(url: str, site: str, user_agent: str, stop: asyncio.Event) -> int:
    """Posts as one sender with `user_agent`, 100 a second, until `stop`; returns how many."""
    sent = 0
    async with httpx.AsyncClient(headers={"User-Agent": user_agent}) as client:
        while not stop.is_set():
            body = {"site": site, "name": "pageview", "url": f"https://{site}/flood"}
            await client.post(f"{url}/api/event", json=body)
            sent += 1
            await asyncio.sleep(0.01)  # the pace of the flood, not a wait
    return sent


async def p99_beside(url: str, site: str, user_agent: str) -> float:
    """Normal posts' p99 while two senders flood with `user_agent`."""
    stop = asyncio.Event()
    senders = [asyncio.create_task(flood(url, site, user_agent, stop)) for _ in range(2)]
    try:
        latencies = await posting_latencies(url, site, 60)
    finally:
        stop.set()
        await asyncio.gather(*senders)
    return latencies[int(len(latencies) * 0.99)]


async def test_a_flood_of_crafted_user_agents_costs_what_any_flood_does(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """Two senders of crafted 1,000-character User-Agents (made slow for a backtracking
    matcher; they moved normal p50 from 5 to 296 ms before RE2) cost served clients no more
    than the same flood of browsers does (a ratio within one run)."""
    ingest = spawn("ingest", **SHORT)
    crafted = "".join(random.Random(2).choice("ab") for _ in range(1000))
    browsers = await p99_beside(ingest.url, site, BROWSER)
    attack = await p99_beside(ingest.url, site, crafted)
    quiet_ms, attack_ms = browsers * 1000, attack * 1000
    print(f"normal p99 beside a flood: {quiet_ms:.1f} ms of browsers, {attack_ms:.1f} ms crafted")
    assert attack < 2 * browsers + 0.02


async def test_an_ingest_client_that_never_reads_its_answers_loses_its_connection(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """Batches sent a few at a time (never more than the pipelining bound), their answers
    never read: once the answers fill the socket buffers, the one waiting to be written gets
    the body deadline (1 s here) to drain, then the connection is dropped. uvicorn would wait
    for ever, and hold up a graceful shutdown for its whole grace period."""
    ingest = spawn("ingest", **SHORT)
    batch = orjson.dumps(
        [{"site": site, "name": "pageview", "url": f"https://{site}/{i}"} for i in range(100)]
    )
    request = (
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"User-Agent: " + BROWSER.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(batch)
    ) + batch
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", ingest.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        deadline = time.monotonic() + 40
        while established(ingest.port) and time.monotonic() < deadline:
            writer.write(request * 4)  # buffered here if the server stops reading
            await asyncio.sleep(0.05)
        assert established(ingest.port) == 0
    finally:
        writer.transport.abort()


async def test_a_viewer_that_reads_its_backlog_slowly_is_not_closed_as_stale(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    """A keepalive ping queued behind a backlog reaches a slow reader late: an outside test
    saw every viewer more than a ping timeout behind closed as stale (4003), uncounted, though
    it read. While it takes bytes the ping waits; one that stops answering is still closed."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn(
        "gateway", **FAST, SITEWIRE_PING_INTERVAL_S="0.3", SITEWIRE_PING_TIMEOUT_S="0.3"
    )
    await post_large(ingest.url, site, 60, 6000)  # ~360 KB to replay
    epoch = await pool.fetchval("SELECT epoch FROM sites WHERE id = $1", site)
    request = STREAM_REQUESTS["websocket"].format(site=site, token=token(site))
    request = request.replace("/stream?", f"/stream?since={epoch}-0&")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    sock.sendall(request.encode())
    sock.setblocking(False)
    buffer, events, close_code = b"", 0, None
    more: asyncio.Task[None] | None = None
    try:
        head_done = False
        deadline = time.monotonic() + 20
        while close_code is None and time.monotonic() < deadline:
            if more is None and events >= 20:  # live events, while it is still behind
                more = asyncio.create_task(post_large(ingest.url, site, 20, 6000))
            await asyncio.sleep(0.05)  # ~80 KB/s: the replay takes ~4.5 s, 15 ping timeouts
            with contextlib.suppress(BlockingIOError):
                buffer += sock.recv(4096)
            if not head_done and b"\r\n\r\n" in buffer:
                buffer = buffer.split(b"\r\n\r\n", 1)[1]
                head_done = True
            while head_done and (frame := _server_frame(buffer)) is not None:
                opcode, payload, buffer = frame
                if opcode == 0x1:
                    events += len(orjson.loads(payload).get("events", []))
                elif opcode == 0x8:
                    close_code = int.from_bytes(payload[:2], "big")
        assert events == 80  # the backlog and what came meanwhile, read at its pace
        assert close_code == 4003  # then its pings went unanswered: stale (it never pongs)
    finally:
        sock.close()
        if more is not None:
            await more


def _server_frame(data: bytes) -> tuple[int, bytes, bytes] | None:
    """One unmasked server frame off the front of `data`: (opcode, payload, rest)."""
    if len(data) < 2:
        return None
    length, start = data[1] & 0x7F, 2
    if length == 126:
        if len(data) < 4:
            return None
        length, start = int.from_bytes(data[2:4], "big"), 4
    elif length == 127:
        if len(data) < 10:
            return None
        length, start = int.from_bytes(data[2:10], "big"), 10
    if len(data) < start + length:
        return None
    return data[0] & 0x0F, data[start : start + length], data[start + length :]


async def test_requests_waiting_in_keep_alive_connections_survive_a_stalled_loop(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    """From an outside test: ingest paused past its keep-alive timeout (SIGSTOP, as a long
    stall of its loop would) while clients sent requests on their keep-alive connections;
    on SIGCONT every one of those connections was reset before its request was read."""
    ingest = spawn("ingest", **FAST, SITEWIRE_KEEPALIVE_S="5")
    body = orjson.dumps({"site": site, "name": "pageview", "url": f"https://{site}/"})
    request = (
        f"POST /api/event HTTP/1.1\r\nHost: x\r\nUser-Agent: {BROWSER}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(connected(ingest.port)) for _ in range(8)]
        for reader, writer in conns:  # each a keep-alive connection that served a request
            writer.write(request)
            assert (await response(reader))[0] == 202
        ingest.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(7)  # past the 5 s keep-alive timeout
            for _, writer in conns:
                writer.write(request)
                await writer.drain()
            await asyncio.sleep(1)
        finally:
            ingest.signal(signal.SIGCONT)
        statuses = [(await response(reader))[0] for reader, _ in conns]
    assert statuses == [202] * len(conns)
    stored = await pool.fetchval("SELECT count(*) FROM events WHERE site = $1", site)
    assert stored == 2 * len(conns)
