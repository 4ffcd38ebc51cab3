"""The gateway as real processes, with real WebSocket and SSE clients."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from app import tokens
from app.broker.redis import PUBLISH_SCRIPT, script_args, script_keys
from app.codes import CloseCode
from app.names import Names
from app.settings import Settings
from app.store.sites import create_site
from tests.clients import SseViewer, WsViewer, connected, post_events, post_large, response
from tests.processes import AppProcess
from tests.support import (
    FAST,
    SECRET,
    env_for,
    eventually,
    metric,
    rss_kib,
    token,
    wait_metric,
)
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow
WS_CONNECTIONS = 'sitewire_gateway_connections{transport="websocket"}'
SSE_CONNECTIONS = 'sitewire_gateway_connections{transport="sse"}'


async def other_site(pool: asyncpg.Pool) -> str:
    site_id = f"o{secrets.token_hex(4)}.example.org"
    await create_site(pool, site_id)
    return site_id


async def test_events_reach_every_viewer_of_the_site_on_every_gateway_and_no_other(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    other = await other_site(pool)
    ingest = spawn("ingest", **FAST)
    g1, g2 = spawn("gateway", **FAST), spawn("gateway", **FAST)
    viewers = [
        await WsViewer.open(g1.ws_url, site, token(site)),
        await WsViewer.open(g2.ws_url, site, token(site)),
        await SseViewer.open(g2.url, site, token(site)),
    ]
    bystander = await WsViewer.open(g1.ws_url, other, token(other))
    cursors = await post_events(ingest.url, site, 50)
    for v in viewers:
        await v.wait_for(50)
        assert v.offsets == list(range(1, 51))  # per-site order, each once
        assert [e["cursor"] for e in v.events] == cursors
        assert v.notices[0]["type"] == "welcome" and v.notices[0]["site"] == site
    sse = viewers[2]
    assert isinstance(sse, SseViewer) and sse.ids == cursors  # SSE id: is the cursor
    # An event of its own site, published after the 50: on one ordered connection, anything
    # of the other site sent to the bystander would have come before it.
    await post_events(ingest.url, other, 1)
    await bystander.wait_for(1)
    assert [e["site"] for e in bystander.events] == [other]
    for v in [*viewers, bystander]:
        await v.close()
    for process in (g1, g2):  # tokens and client addresses never reach the logs
        assert token(site).split(".")[0] not in process.log()
        assert "127.0.0.1:" not in process.log().replace(f"127.0.0.1:{process.port}", "")


async def test_subscriptions_are_reference_counted(
    spawn: Callable[..., AppProcess], site: str, rclient: aioredis.Redis, names: Names
) -> None:
    # The default linger, not FAST's 0.3 s: "still subscribed while lingering" is checked
    # after the gateway has seen the viewer go, with the whole linger as the margin.
    linger_s = 2.0
    gateway = spawn("gateway", **{**FAST, "SITEWIRE_UNSUBSCRIBE_DELAY_S": str(linger_s)})
    channel = names.channel(site)

    async def numsub() -> int:
        [(_, count)] = await rclient.pubsub_numsub(channel)
        return int(count)

    assert await numsub() == 0
    a = await WsViewer.open(gateway.ws_url, site, token(site))
    await a.wait_notice("welcome")
    assert await numsub() == 1  # subscribed before the viewer got its welcome
    b = await SseViewer.open(gateway.url, site, token(site))
    await b.wait_notice("welcome")
    assert await numsub() == 1  # one subscription per gateway, not per viewer
    await a.close()
    await wait_metric(gateway.internal_url, WS_CONNECTIONS, 0.0)  # a has left the site
    # Deliberately past the linger: an unsubscribe that ignored b would have happened by now.
    await asyncio.sleep(linger_s + 0.5)
    assert await numsub() == 1  # b still watches
    await b.close()
    await wait_metric(gateway.internal_url, SSE_CONNECTIONS, 0.0)  # the last viewer has left
    assert await numsub() == 1  # lingering: a quick reconnect keeps it

    async def unsubscribed() -> bool:
        return await numsub() == 0

    await eventually(unsubscribed, what="unsubscribed once the linger ran out")
    c = await WsViewer.open(gateway.ws_url, site, token(site))
    await c.wait_notice("welcome")
    assert await numsub() == 1
    await c.close()
    patterns = await rclient.execute_command("PUBSUB", "NUMPAT")
    assert patterns == 0  # never a pattern subscription


@pytest.mark.parametrize(
    ("make_token", "code"),
    [
        (lambda site: None, CloseCode.UNAUTHORIZED),
        (lambda site: "not.a.jwt", CloseCode.UNAUTHORIZED),
        (lambda site: tokens.issue("another-secret-" + "y" * 32, site), CloseCode.UNAUTHORIZED),
        (lambda site: tokens.issue(SECRET, site, ttl_s=-60), CloseCode.UNAUTHORIZED),
        (lambda site: tokens.issue(SECRET, "other.example.com"), CloseCode.UNAUTHORIZED),
    ],
    ids=["missing", "malformed", "forged", "expired", "other-site"],
)
async def test_auth_failures(
    spawn: Callable[..., AppProcess],
    site: str,
    make_token: Callable[[str], str | None],
    code: CloseCode,
) -> None:
    gateway = spawn("gateway", **FAST)
    ingest = spawn("ingest", **FAST)
    cursors = await post_events(ingest.url, site, 3)
    # Asking for the stored events: refused before anything is sent, welcome or replay (all
    # the client read before the close is recorded once it is closed).
    ws = await WsViewer.open(gateway.ws_url, site, make_token(site), "&last=3")
    assert await ws.wait_closed() == code
    assert ws.events == [] and ws.notices == []
    resume = {"Last-Event-ID": cursors[0]}
    sse = await SseViewer.open(gateway.url, site, make_token(site), headers=resume)
    assert sse.status == 401 and sse.notices[0]["error"]["code"] == "unauthorized"
    assert sse.events == []
    await sse.close()


async def test_unknown_and_invalid_sites(spawn: Callable[..., AppProcess]) -> None:
    gateway = spawn("gateway", **FAST)
    ws = await WsViewer.open(gateway.ws_url, "nosuch.example.com", token("nosuch.example.com"))
    assert await ws.wait_closed() == CloseCode.UNKNOWN_SITE
    sse = await SseViewer.open(gateway.url, "nosuch.example.com", token("nosuch.example.com"))
    assert sse.status == 404
    await sse.close()
    bad = await SseViewer.open(gateway.url, "Bad%2A", token("Bad*"))
    assert bad.status == 401
    await bad.close()


async def test_header_token_is_accepted(spawn: Callable[..., AppProcess], site: str) -> None:
    gateway = spawn("gateway", **FAST)
    sse = await SseViewer.open(
        gateway.url, site, None, headers={"Authorization": f"Bearer {token(site)}"}
    )
    assert sse.status == 200
    await sse.wait_notice("welcome")
    await sse.close()


async def test_protocol_abuse_closes_with_documented_codes(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    ping = await WsViewer.open(gateway.ws_url, site, token(site))
    await ping.send('{"type":"ping"}')
    assert (await ping.wait_notice("pong"))["type"] == "pong"
    await ping.close()
    for payload, code in (
        ('{"type":"subscribe","site":"other.example.com"}', CloseCode.PROTOCOL),
        ("not json", CloseCode.PROTOCOL),
        ("x" * 10_000, CloseCode.FRAME_TOO_LARGE),
        ("x" * 200_000, 1009),  # over the transport's hard limit: "message too big"
    ):
        v = await WsViewer.open(gateway.ws_url, site, token(site))
        await v.send(payload)
        assert await v.wait_closed() == code


def _stalled_client(port: int, site: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    request = (
        f"GET /v1/sites/{site}/stream?token={token(site)} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    assert b" 101 " in sock.recv(1024)
    return sock


async def _publish(
    rclient: aioredis.Redis, names: Names, site: str, first: int, count: int
) -> None:
    """Publish `count` ~2 KiB events with consecutive offsets, as ingest would."""
    script = rclient.register_script(PUBLISH_SCRIPT)
    pad = "x" * 2000
    args: list[str | int] = []
    for offset in range(first, first + count):
        args += [offset, f'{{"offset":{offset},"cursor":"e-{offset}","pad":"{pad}"}}']
    keys, channel = script_keys(names, site), names.channel(site)
    await script(keys=keys, args=script_args(channel, 100, 3600, args))


async def test_stalled_viewer_is_closed_as_slow_and_others_are_unaffected(
    spawn: Callable[..., AppProcess], site: str, rclient: aioredis.Redis, names: Names
) -> None:
    gateway = spawn(
        "gateway",
        **FAST,
        SITEWIRE_VIEWER_QUEUE_BYTES=str(512 * 1024),
        SITEWIRE_WRITE_TIMEOUT_S="1",
    )
    healthy = await WsViewer.open(gateway.ws_url, site, token(site))
    await healthy.wait_notice("welcome")
    stalled = _stalled_client(gateway.port, site)
    await wait_metric(gateway.internal_url, WS_CONNECTIONS, 2.0)  # the stalled one joined too
    assert gateway.proc is not None
    rss_before = rss_kib(gateway.proc.pid)
    total = 0
    for _ in range(160):  # ~8 MB through the gateway, sustained, in 50 KiB bursts
        await _publish(rclient, names, site, total + 1, 25)
        total += 25
        await asyncio.sleep(0.005)  # the pace of the load, not a wait
    await healthy.wait_for(total, timeout=20)
    assert healthy.close_code is None, healthy.close_reason
    assert healthy.offsets == list(range(1, total + 1))
    slow = await metric(
        gateway.internal_url, 'sitewire_gateway_closes_total{reason="slow_consumer"}'
    )
    timed_out = await metric(
        gateway.internal_url, 'sitewire_gateway_closes_total{reason="write_timeout"}'
    )
    assert slow + timed_out == 1.0
    # The stalled socket cannot even take a close frame; it is dropped within a bound.
    await wait_metric(gateway.internal_url, WS_CONNECTIONS, 1.0)
    growth_kib = rss_kib(gateway.proc.pid) - rss_before
    assert growth_kib < 16 * 1024, f"gateway grew by {growth_kib} KiB with a stalled viewer"
    stalled.close()
    await healthy.close()


async def test_dead_connections_are_removed_within_the_ping_timeout(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn(
        "gateway", **FAST, SITEWIRE_PING_INTERVAL_S="0.3", SITEWIRE_PING_TIMEOUT_S="0.3"
    )
    stalled = _stalled_client(gateway.port, site)  # never answers pings: half-open
    await wait_metric(gateway.internal_url, WS_CONNECTIONS, 1.0)
    started = time.monotonic()
    await wait_metric(gateway.internal_url, WS_CONNECTIONS, 0.0, timeout=5)
    assert time.monotonic() - started < 2.0  # interval + timeout + scheduling slack
    stalled.close()
    stale = 'sitewire_gateway_closes_total{reason="stale"}'
    await wait_metric(gateway.internal_url, stale, 1.0)  # counted: it was not, anywhere


async def test_sigterm_drains_viewers_with_the_reconnect_code(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST, SITEWIRE_DRAIN_TIMEOUT_S="3")
    ws = [await WsViewer.open(gateway.ws_url, site, token(site)) for _ in range(3)]
    sse = await SseViewer.open(gateway.url, site, token(site))
    started = time.monotonic()
    gateway.signal(15)
    for v in ws:
        assert await v.wait_closed() == CloseCode.SHUTTING_DOWN
    await sse.wait_closed()
    assert sse.close_code == CloseCode.SHUTTING_DOWN
    assert gateway.proc is not None
    code = await asyncio.to_thread(gateway.proc.wait, 15)
    assert code == 0
    assert time.monotonic() - started < 8
    await sse.close()


async def test_redis_restart_resubscribes_and_tells_viewers(
    settings: Settings, site: str, tmp_path: Path, private_redis: EmbeddedRedis
) -> None:
    env = env_for(settings.with_(redis_url=private_redis.url), **FAST)
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    try:
        viewer = await WsViewer.open(gateway.ws_url, site, token(site))
        await post_events(ingest.url, site, 5)
        await viewer.wait_for(5)
        private_redis.stop()
        await post_events(ingest.url, site, 5, start=5)  # stored, not published
        # The gateway has noticed (it is trying to reconnect) before Redis comes back.
        reconnects = "sitewire_gateway_redis_reconnect_attempts_total"
        await eventually(lambda: metric(gateway.internal_url, reconnects), what=reconnects)
        private_redis.start()  # empty: its data is lost
        gap = await viewer.wait_notice("gap", timeout=15)
        assert gap["reason"] == "redis_reconnect" and gap["recovered"] is True
        await post_events(ingest.url, site, 5, start=10)
        await viewer.wait_for(15)
        assert viewer.offsets == list(range(1, 16))  # the missed five came from PostgreSQL
        assert viewer.close_code is None
        await viewer.close()
    finally:
        gateway.stop()
        ingest.stop()


async def test_many_sites_subscribing_at_once(
    spawn: Callable[..., AppProcess], pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names
) -> None:
    """First viewers of many sites arriving together: every subscription is confirmed."""
    gateway = spawn("gateway", **FAST)
    sites = [await other_site(pool) for _ in range(12)]
    viewers = await asyncio.gather(
        *(WsViewer.open(gateway.ws_url, s, token(s)) for s in sites for _ in range(2))
    )
    for v in viewers:
        assert (await v.wait_notice("welcome", timeout=10))["type"] == "welcome"
    counts = dict(await rclient.pubsub_numsub(*(names.channel(s) for s in sites)))
    assert all(int(c) == 1 for c in counts.values()), counts
    for v in viewers:
        await v.close()


def _replay_request(site: str, transport: str, last: int) -> str:
    """The raw request of a stream replaying the site's last `last` events (SSE or WebSocket)."""
    path = "events" if transport == "sse" else "stream"
    request = f"GET /v1/sites/{site}/{path}?token={token(site)}&last={last} HTTP/1.1\r\n"
    request += "Host: x\r\n"
    if transport == "websocket":
        request += (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        )
    return request + "\r\n"


def _slow_socket(port: int, request: str) -> socket.socket:
    """A client with a small receive buffer that sends `request` (its reads are paced)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request.encode())
    return sock


def _read_slowly(sock: socket.socket, until: Callable[[bytes], bool], budget_s: float) -> bytes:
    """Read 8 KiB every 10 ms at most until `until(everything so far)`, for at most `budget_s`
    (with a 16 KiB receive buffer, TCP's own pacing makes it a few hundred KB/s)."""
    got = bytearray()
    deadline = time.monotonic() + budget_s
    sock.settimeout(2)
    while not until(bytes(got)) and time.monotonic() < deadline:
        chunk = sock.recv(8192)
        if not chunk:
            break  # closed by the gateway: the failure this test is about
        got += chunk
        time.sleep(0.01)
    return bytes(got)


def _ws_offsets(stream: bytes) -> list[int]:
    """Offsets of the events in a server's WebSocket byte stream (after the handshake)."""
    offsets: list[int] = []
    at = stream.index(b"\r\n\r\n") + 4
    while at + 2 <= len(stream):
        opcode, length = stream[at] & 0x0F, stream[at + 1] & 0x7F
        head = 2
        if length == 126:
            length, head = int.from_bytes(stream[at + 2 : at + 4]), 4
        elif length == 127:
            length, head = int.from_bytes(stream[at + 2 : at + 10]), 10
        if at + head + length > len(stream):
            break  # the rest is still on its way
        payload = stream[at + head : at + head + length]
        if opcode == 1:
            message = orjson.loads(payload)
            if message["type"] == "events":
                offsets += [e["offset"] for e in message["events"]]
        at += head + length
    return offsets


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_slow_reader_of_a_large_replay_is_served_to_the_end(
    spawn: Callable[..., AppProcess], site: str, transport: str
) -> None:
    """A replay's writes are large (up to half the viewer's queue at once), and once the
    kernel's buffers are full a write waits until a third of them is free: to a slow reader
    that takes longer than the write timeout, yet the reader reads, so it must get every event,
    not be closed as slow (docs/protocol.md: "a replay never closes a viewer that reads")."""
    ingest = spawn("ingest", **FAST)
    timeouts = {"SITEWIRE_WRITE_TIMEOUT_S": "0.5", "SITEWIRE_PING_INTERVAL_S": "60"}
    gateway = spawn("gateway", **FAST, **timeouts)
    count = 1000
    await post_large(ingest.url, site, count, 4000)  # ~4 MB to replay: more than fits in buffers
    sock = _slow_socket(gateway.port, _replay_request(site, transport, count))
    last = f'"offset":{count},'.encode()

    def done(got: bytes) -> bool:  # the last event, whole (and its frame, for a WebSocket)
        if last not in got:
            return False
        return transport == "sse" or _ws_offsets(got)[-1:] == [count]

    try:
        stream = await asyncio.to_thread(_read_slowly, sock, done, 60)
    finally:
        sock.close()
    if transport == "sse":
        assert stream.count(b"\nid: ") == count, stream[-300:]
    else:
        assert _ws_offsets(stream) == list(range(1, count + 1))
    timed_out = await metric(
        gateway.internal_url, 'sitewire_gateway_closes_total{reason="write_timeout"}'
    )
    assert timed_out == 0.0


async def test_both_transports_read_one_query_the_same_way(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """An empty filter and a parameter given twice are refused on WebSocket (4502) as on SSE
    (400): one query, one meaning (WebSocket had ignored empty values and taken the first of
    two, SSE the last)."""
    gateway = spawn("gateway", **FAST)
    good = token(site)
    cursor = f"{'0' * 8}-5"
    queries = [
        ("stats=only&page=", "page"),
        (f"since={cursor}&since=garbage", "since"),
        (f"token=forged&token={good}", "token"),
        ("last=3&last=99999", "last"),
        ("last=abc", "last"),  # each start parameter named for what is wrong with it
        ("minutes=0", "minutes"),
    ]
    async with httpx.AsyncClient() as client:
        for query, field in queries:
            url = f"{gateway.url}/v1/sites/{site}/events?{query}"
            r = await client.get(url if "token=" in query else f"{url}&token={good}")
            assert r.status_code == 400, (query, r.text)
            assert r.json()["error"]["field"] == field, r.text
            ws = await WsViewer.open(gateway.ws_url, site, None if "token=" in query else good,
                                     ("&" if "token=" not in query else "") + query)  # fmt: skip
            assert await ws.wait_closed() == CloseCode.BAD_REQUEST, query
            await ws.close()


async def test_a_refused_handshake_answers_in_the_error_shape(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """What websockets itself refuses (a bad version, no key) comes in the documented error
    shape, as every other error of the gateway (it was websockets' plain text)."""
    gateway = spawn("gateway", **FAST)
    path = f"/v1/sites/{site}/stream?token={token(site)}"
    upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    for request in (
        f"GET {path} HTTP/1.1\r\nHost: x\r\n{upgrade}{key}Sec-WebSocket-Version: 8\r\n\r\n",
        f"GET {path} HTTP/1.1\r\nHost: x\r\n{upgrade}Sec-WebSocket-Version: 13\r\n\r\n",
    ):
        async with connected(gateway.port) as (reader, writer):
            writer.write(request.encode())
            status, headers, body = await response(reader)
        assert status == 400 and headers["content-type"] == "application/json", body
        error = orjson.loads(body)["error"]
        assert error["code"] == "invalid_request" and "Sec-WebSocket" in error["message"]


async def test_handshakes_read_once_accept_and_refuse_as_websockets_would(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """The upgrade request reaches the WebSocket protocol as uvicorn parsed it, not re-parsed
    by websockets (app.web.http.TakesUpgrade): what websockets' parser accepted still opens
    (odd header case, spaces around a value, HTTP/1.0), and a request with a body is refused,
    now in the error shape (websockets' parser closed without an answer)."""
    gateway = spawn("gateway", **FAST)
    path = f"/v1/sites/{site}/stream?token={token(site)}"
    fields = (
        "uPgRaDe: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    )
    key = "Sec-WebSocket-Key:   dGhlIHNhbXBsZSBub25jZQ==  \r\n"
    for version in ("HTTP/1.1", "HTTP/1.0"):
        async with connected(gateway.port) as (reader, writer):
            writer.write(f"GET {path} {version}\r\nHost: x\r\n{fields}{key}\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's example key, accepted
    for body in ("Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n"):
        async with connected(gateway.port) as (reader, writer):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{fields}{key}{body}\r\n".encode())
            status, headers, answer = await response(reader)
        assert status == 400 and headers["content-type"] == "application/json", answer
        assert orjson.loads(answer)["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_viewer_that_reads_in_bursts_stays_and_one_that_stops_is_closed(
    spawn: Callable[..., AppProcess], site: str, transport: str
) -> None:
    """With a replay waiting on a full socket: a reader taking 64 KiB every 1.7 s (under the
    2 s write timeout) keeps its stream; once it stops taking anything, it is closed within
    the timeout and a little more (4001, counted as `write_timeout`)."""
    ingest = spawn("ingest", **FAST)
    timeouts = {"SITEWIRE_WRITE_TIMEOUT_S": "2", "SITEWIRE_PING_INTERVAL_S": "60"}
    gateway = spawn("gateway", **FAST, **timeouts)
    await post_large(ingest.url, site, 1000, 4000)
    sock = _slow_socket(gateway.port, _replay_request(site, transport, 1000))
    timed_out = 'sitewire_gateway_closes_total{reason="write_timeout"}'

    def bursts() -> int:
        time.sleep(1.0)  # the replay fills the socket's buffers meanwhile
        sock.settimeout(2)
        taken = 0
        for _ in range(4):
            got = 0
            while got < 64 * 1024:
                chunk = sock.recv(64 * 1024 - got)
                assert chunk, "closed while it was reading"
                got += len(chunk)
            taken += got
            time.sleep(1.7)
        return taken

    try:
        assert await asyncio.to_thread(bursts) == 4 * 64 * 1024
        assert await metric(gateway.internal_url, timed_out) == 0.0
        stopped = time.monotonic()
        await wait_metric(gateway.internal_url, timed_out, 1.0, timeout=15)
        assert time.monotonic() - stopped < 2 + 3  # the timeout, a look or a sweep, and slack
    finally:
        sock.close()


async def test_a_gateway_that_stalls_shows_it_in_its_latency(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """An outside test stopped a gateway 2 s in every 2.5 s: its viewers got events up to 2 s
    late, and its publish-to-send histogram (what SitewireViewersLagging reads) stayed under
    50 ms, because each burst was sampled by its newest event. It is sampled by its oldest."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site))
    try:
        await viewer.wait_notice("welcome")
        gateway.signal(signal.SIGSTOP)
        try:
            await post_events(ingest.url, site, 10)  # they wait in the gateway's socket
            await asyncio.sleep(1.5)
        finally:
            gateway.signal(signal.SIGCONT)
        await viewer.wait_for(10)
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"{gateway.internal_url}/metrics")).text
        buckets = {
            line.split('le="')[1].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("sitewire_gateway_publish_to_send_seconds_bucket")
        }
        assert buckets["+Inf"] >= 1
        assert buckets["1.0"] < buckets["+Inf"]  # a write whose event waited over a second
    finally:
        await viewer.close()
