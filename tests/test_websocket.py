"""The gateway's own WebSocket protocol (app.gateway.transports.websocket), driven by real clients
over real sockets: handshakes, frames before admission, fragmented messages, keepalive, what an
idle viewer costs, and what a closed one leaves behind. Malformed frames: test_websocket_frames."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import struct
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from picows import WSFrame, WSListener, WSTransport, ws_connect
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app.codes import CloseCode
from app.gateway import app as gateway_app
from app.gateway.transports.websocket import MAX_CLIENT_FRAME, StreamProtocol, protocol_class
from app.settings import Settings
from app.web import http
from tests.clients import CLOSE, CONT, PING, TEXT, RawClient, encode_frame, stream_path
from tests.processes import AppProcess
from tests.support import FAST, rss_kib, token, wait_metric
from workers.embedded import free_port

pytestmark = pytest.mark.slow


async def test_an_upgrade_on_another_path_is_refused(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    for path in (f"/v1/sites/{site}/other", "/healthz", f"/v1/sites/{site}/stream/x"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{gateway.ws_url}{path}?token={token(site)}", open_timeout=5)
        assert refused.value.response.status_code == 403


async def test_a_ping_sent_before_the_welcome_is_answered_after_it(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    client = await RawClient.open(gateway.port, stream_path(site))
    client.send(TEXT, b'{"type":"ping"}')  # most likely still being admitted
    assert (await client.message())["type"] == "welcome"
    assert (await client.message())["type"] == "pong"
    client.close()


async def test_fragmented_messages_are_put_together(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    client = await RawClient.open(gateway.port, stream_path(site))
    assert (await client.message())["type"] == "welcome"
    client.send(TEXT, b'{"type":', fin=False)
    client.send(CONT, b'"ping"}')
    assert (await client.message())["type"] == "pong"
    for i in range(50):  # 50 x 100 bytes: over MAX_CLIENT_FRAME before the last fragment
        client.send(CONT if i else TEXT, b" " * 100, fin=False)
    assert await client.close_code() == CloseCode.FRAME_TOO_LARGE
    client.close()


async def test_a_peer_that_never_answers_pings_is_closed_as_stale(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn(
        "gateway", **FAST, SITEWIRE_PING_INTERVAL_S="0.2", SITEWIRE_PING_TIMEOUT_S="0.3"
    )
    answers = await RawClient.open(gateway.port, stream_path(site))
    silent = await RawClient.open(gateway.port, stream_path(site))
    for client in (answers, silent):
        assert (await client.message())["type"] == "welcome"
    for _ in range(3):  # several rounds: the keepalive goes on after each pong
        opcode, payload = await answers.frame()
        assert opcode == PING
        answers.send(0xA, payload)  # pong
    assert (await silent.frame())[0] == PING
    assert await silent.close_code() == CloseCode.STALE
    answers.send(TEXT, b'{"type":"ping"}')
    assert (await answers.message())["type"] == "pong"  # still open
    answers.close()
    silent.close()


class _Quiet(WSListener):  # type: ignore[misc]
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        pass


async def test_an_idle_viewer_costs_less_than_16_kib(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """Issue #8's target, on a smaller scale than bench scenario 3: resident memory of the
    gateway per subscribed, idle WebSocket viewer."""
    count = 1000
    gateway = spawn("gateway", **FAST)
    assert gateway.proc is not None
    name = 'sitewire_gateway_connections{transport="websocket"}'
    warm = [await ws_connect(_Quiet, f"{gateway.ws_url}{stream_path(site)}") for _ in range(20)]
    await wait_metric(gateway.internal_url, name, 20.0)
    before = rss_kib(gateway.proc.pid)
    clients = []
    for _ in range(count // 100):
        clients += await asyncio.gather(
            *(ws_connect(_Quiet, f"{gateway.ws_url}{stream_path(site)}") for _ in range(100))
        )
    await wait_metric(gateway.internal_url, name, float(count + 20), timeout=30)
    per_viewer = (rss_kib(gateway.proc.pid) - before) / count
    assert per_viewer <= 16, f"{per_viewer:.1f} KiB per idle viewer"
    for transport, _ in warm + clients:
        transport.disconnect()


@contextlib.asynccontextmanager
async def in_process_gateway(
    settings: Settings,
) -> AsyncIterator[tuple[int, list[weakref.ref[StreamProtocol]]]]:
    """The gateway served by uvicorn in this process, configured as workers.serve does, so a
    test can see its connection objects: yields the port and a weak reference to each
    WebSocket protocol object it made."""
    app = gateway_app.create_app(settings)
    made: list[weakref.ref[StreamProtocol]] = []

    class Tracked(protocol_class(app.websockets)):  # type: ignore[misc]  # no __slots__: weakref-able
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        ws=Tracked,
        ws_max_size=16 * MAX_CLIENT_FRAME,
        ws_per_message_deflate=False,
        http=http.protocol_class(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            assert not task.done(), "the in-process gateway did not start"
            await asyncio.sleep(0.01)
    try:
        yield port, made
    finally:
        server.should_exit = True
        await task


async def released(*refs: weakref.ref[Any]) -> bool:
    """Whether every object is collected within ~1 s: a fifth of CLOSE_TIMEOUT_S, so an abort
    timer left pending (it holds the transport for 5 s) cannot pass, while a collection
    that takes a few loop turns has ample margin."""
    for _ in range(100):
        gc.collect()
        if all(ref() is None for ref in refs):
            return True
        await asyncio.sleep(0.01)
    return False


async def _answer_our_close(client: RawClient) -> None:
    client.send(TEXT, b'{"type":"subscribe"}')  # the server closes: 4503
    assert await client.close_code() == CloseCode.PROTOCOL
    client.send(CLOSE, struct.pack("!H", CloseCode.PROTOCOL))
    assert await client.closed_by_server()


async def _drop_after_our_close(client: RawClient) -> None:
    client.send(TEXT, b'{"type":"subscribe"}')
    assert await client.close_code() == CloseCode.PROTOCOL
    client.writer.transport.abort()  # the transport is lost; the close is never answered


async def _close_first(client: RawClient) -> None:
    client.send(CLOSE, struct.pack("!H", 1000))
    assert await client.close_code() == 1000
    assert await client.closed_by_server()


async def _break_the_protocol(client: RawClient) -> None:
    client.write(encode_frame(TEXT, b'{"type":"ping"}', mask=False))
    assert await client.close_code() == 1002
    assert await client.closed_by_server()


async def test_upgrades_refused_early_leave_no_connection_behind(
    settings: Settings, site: str
) -> None:
    """A review found two ways to leave a connection object in the server's connections for
    good: an upgrade whose headers were refused in the same read (431: it was still handed to
    the WebSocket protocol, which failed), and two Authorization headers (websockets raised
    on reading one). Now the first makes no protocol object, the second is refused (4502;
    SSE 400) and its object released."""
    async with in_process_gateway(settings.with_(ping_interval_s=0)) as (port, made):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        many = "".join(f"X-{i}: {i}\r\n" for i in range(120))
        writer.write(
            f"GET {stream_path(site)} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{many}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 431 "), head
        writer.close()
        assert made == []

        bearer = f"Authorization: Bearer {token(site)}\r\n"
        client = await RawClient.open(port, f"/v1/sites/{site}/stream", bearer * 2)
        assert await client.close_code() == CloseCode.BAD_REQUEST
        client.send(CLOSE, struct.pack("!H", 1000))
        assert await client.closed_by_server()
        client.close()
        assert await released(made[-1])
        async with httpx.AsyncClient(timeout=10) as http_client:
            answer = await http_client.get(
                f"http://127.0.0.1:{port}/v1/sites/{site}/events",
                headers=[("Authorization", f"Bearer {token(site)}")] * 2,
            )
        assert answer.status_code == 400 and answer.json()["error"]["field"] == "authorization"


@pytest.mark.parametrize(
    "ending", [_answer_our_close, _drop_after_our_close, _close_first, _break_the_protocol]
)
async def test_a_closed_connection_is_released_at_once(
    settings: Settings, site: str, ending: Callable[[RawClient], Any]
) -> None:
    """Issue #17: a server-initiated close armed an abort timer that nothing cancelled, so
    the transport of every closed connection stayed in memory for CLOSE_TIMEOUT_S. Once the
    connection is closed, however it ended, the protocol object and its transport go.
    Keepalive is off: its queue holds a connection until its next ping is due, by design."""
    async with in_process_gateway(settings.with_(ping_interval_s=0)) as (port, made):
        client = await RawClient.open(port, stream_path(site))
        assert (await client.message())["type"] == "welcome"
        conn = made[-1]()
        assert conn is not None and conn.transport is not None
        refs = (weakref.ref(conn), weakref.ref(conn.transport))
        del conn
        await ending(client)
        assert await released(*refs)
        client.close()
