"""The gateway's own WebSocket protocol (app.websocket), driven by real clients over real
sockets: handshakes, frames before admission, fragmented messages, keepalive, and what an idle
viewer costs."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from picows import WSFrame, WSListener, WSTransport, ws_connect
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app.codes import CloseCode
from tests.processes import AppProcess
from tests.test_gateway import FAST, _rss_kib, token, wait_metric

pytestmark = pytest.mark.slow

TEXT, CONT, CLOSE, PING = 0x1, 0x0, 0x8, 0x9


class RawClient:
    """A WebSocket client written out by hand, so a test controls every frame and sees
    every frame (including pings, which library clients answer on their own)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        first = (0x80 if fin else 0) | opcode
        self.writer.write(bytes((first, 0x80 | len(payload))) + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def message(self) -> dict[str, Any]:
        """The next text frame's JSON (control frames other than close are skipped)."""
        while True:
            opcode, payload = await self.frame()
            assert opcode != CLOSE, f"closed: {payload!r}"
            if opcode == TEXT:
                message: dict[str, Any] = orjson.loads(payload)
                return message

    async def close_code(self) -> int:
        while True:
            opcode, payload = await self.frame()
            if opcode == CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code

    def close(self) -> None:
        self.writer.close()


def stream_path(site: str) -> str:
    return f"/v1/sites/{site}/stream?token={token(site)}"


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
    before = _rss_kib(gateway.proc.pid)
    clients = []
    for _ in range(count // 100):
        clients += await asyncio.gather(
            *(ws_connect(_Quiet, f"{gateway.ws_url}{stream_path(site)}") for _ in range(100))
        )
    await wait_metric(gateway.internal_url, name, float(count + 20), timeout=30)
    per_viewer = (_rss_kib(gateway.proc.pid) - before) / count
    assert per_viewer <= 16, f"{per_viewer:.1f} KiB per idle viewer"
    for transport, _ in warm + clients:
        transport.disconnect()
