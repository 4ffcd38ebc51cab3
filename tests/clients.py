"""Real clients for tests: a WebSocket viewer (the `websockets` library) and an SSE viewer
(httpx), each recording every event, notice and the close code it saw; a resuming viewer
(app.client); a WebSocket client written out frame by frame; posters of events; and a raw TCP
connection with a reader of one HTTP response."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.client import StreamClient
from tests.support import BROWSER, eventually, token


@dataclass
class Viewer:
    events: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)
    frames: int = 0
    close_code: int | None = None
    close_reason: str = ""
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def offsets(self) -> list[int]:
        return [e["offset"] for e in self.events]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            if self.closed.is_set():
                break
            await asyncio.sleep(0.01)
        closed = f"closed {self.close_code} {self.close_reason}"
        assert len(self.events) >= count, f"got {len(self.events)} of {count} events; {closed}"

    async def wait_notice(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.notices:
                if n["type"] == kind:
                    return n
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind!r} notice; got {self.notices}")

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    def record(self, message: dict[str, Any]) -> None:
        if message["type"] == "events":
            self.events.extend(message["events"])
            self.frames += 1
        else:
            self.notices.append(message)


@dataclass
class WsViewer(Viewer):
    ws: ClientConnection | None = None

    @classmethod
    async def open(cls, base: str, site: str, token: str | None, query: str = "") -> WsViewer:
        viewer = cls()
        params = f"?token={token}" if token else "?"
        url = f"{base}/v1/sites/{site}/stream{params}{query}"
        viewer.ws = await connect(url, max_size=None, open_timeout=10)
        viewer.task = asyncio.create_task(viewer._run())
        return viewer

    async def _run(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                self.record(orjson.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            if self.ws.close_code is not None:
                self.close_code = self.ws.close_code
                self.close_reason = self.ws.close_reason or ""
            self.closed.set()

    async def send(self, data: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(data)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class SseViewer(Viewer):
    ids: list[str] = field(default_factory=list)
    #: Comment lines (": ping") received.
    comments: int = 0
    status: int = 0
    client: httpx.AsyncClient | None = None

    @classmethod
    async def open(
        cls,
        base: str,
        site: str,
        token: str | None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> SseViewer:
        viewer = cls()
        viewer.client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
        params = {"token": token} if token else {}
        params.update(query or {})
        ready = asyncio.Event()
        viewer.task = asyncio.create_task(
            viewer._run(f"{base}/v1/sites/{site}/events", params, headers or {}, ready)
        )
        await asyncio.wait_for(ready.wait(), 10)
        return viewer

    async def _run(
        self, url: str, params: dict[str, str], headers: dict[str, str], ready: asyncio.Event
    ) -> None:
        assert self.client is not None
        try:
            async with self.client.stream("GET", url, params=params, headers=headers) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    self.notices.append(orjson.loads(await r.aread()))
                    return
                ready.set()
                kind, data, event_id = "message", b"", None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:].encode()
                    elif line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith(":"):
                        self.comments += 1
                    elif line == "" and data:
                        self._dispatch(kind, data, event_id)
                        kind, data, event_id = "message", b"", None
        except httpx.HTTPError:
            pass
        finally:
            ready.set()
            self.closed.set()

    def _dispatch(self, kind: str, data: bytes, event_id: str | None) -> None:
        body = orjson.loads(data)
        if kind == "message":
            self.events.append(body)
            assert event_id == body["cursor"]
            self.ids.append(event_id)
        else:
            self.notices.append(body)
            if event_id is not None:  # a notice that moves the cursor (`sampled`)
                self.ids.append(event_id)
            if kind == "close":
                self.close_code = body["code"]

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.client is not None:
            await self.client.aclose()


async def post_events(ingest_url: str, site: str, count: int, start: int = 0) -> list[str]:
    """Post `count` events one by one (in order); return their cursors."""
    cursors = []
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=10) as client:
        for i in range(start, start + count):
            body = {"site": site, "name": "pageview", "url": f"https://{site}/p/{i}"}
            r = await client.post(f"{ingest_url}/api/event", json=body)
            assert r.status_code == 202, r.text
            cursors.append(r.json()["cursor"])
    return cursors


async def post_batches(ingest_url: str, site: str, count: int, per_batch: int = 100) -> None:
    """`count` pageviews in batches (fast: a burst for a stream to keep up with)."""
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=30) as client:
        for first in range(0, count, per_batch):
            batch = [
                {"site": site, "name": "pageview", "url": f"https://{site}/b/{i}"}
                for i in range(first, min(count, first + per_batch))
            ]
            r = await client.post(f"{ingest_url}/api/events", json=batch)
            assert r.status_code == 202 and all(x["status"] == 202 for x in r.json()["results"])


async def post_large(ingest_url: str, site: str, count: int, size: int) -> None:
    """`count` events of about `size` bytes each (props of up to 2,000 bytes a value)."""
    values = max(1, size // 2000)
    props = {f"k{i}": "x" * min(2000, size // values) for i in range(values)}
    per_batch = max(1, min(50, 480_000 // size))  # within the 512 KiB batch limit
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=30) as client:
        for first in range(0, count, per_batch):
            batch = [
                {"site": site, "name": "big", "url": f"https://{site}/{i}", "props": props}
                for i in range(first, min(count, first + per_batch))
            ]
            r = await client.post(f"{ingest_url}/api/events", json=batch)
            assert r.status_code == 202 and all(x["status"] == 202 for x in r.json()["results"])


@dataclass
class Steady:
    """Posts events to a site at a steady rate until stopped; remembers every cursor."""

    ingest_url: str
    site: str
    rate: float = 100.0
    cursors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Steady:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                body = {"site": self.site, "name": "pageview", "url": f"https://{self.site}/{i}"}
                r = await client.post(f"{self.ingest_url}/api/event", json=body)
                assert r.status_code == 202, r.text
                self.cursors.append(r.json()["cursor"])
                i += 1
                await asyncio.sleep(1 / self.rate)  # the pace of the load, not a wait

    async def posted(self, count: int, timeout: float = 30.0) -> int:
        """Wait until `count` events were acknowledged in all; return how many were."""
        await eventually(lambda: len(self.cursors) >= count, timeout, what=f"{count} posted")
        return len(self.cursors)

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        await self._task
        return len(self.cursors)


@dataclass
class Watcher:
    """A resuming client (app.client) that records every event and notice."""

    client: StreamClient
    events: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, gateways: list[str], site: str, **start: str) -> Watcher:
        w = cls(StreamClient(gateways, site, token(site), lambda e: None, start=start))
        w.client.on_event = w.events.append
        w.client.on_notice = w.notices.append
        w.client.backoff_base_s = 0.05
        w.task = asyncio.create_task(w.client.run(w.stop))
        return w

    @property
    def offsets(self) -> list[int]:
        return [e["offset"] for e in self.events]

    async def wait_for_offset(self, offset: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while (
            not self.events or self.events[-1]["offset"] < offset
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert self.events and self.events[-1]["offset"] >= offset, (
            f"reached {self.offsets[-1:] or None} of {offset}; notices {self.notices[-3:]}"
        )

    async def wait_welcome(self, count: int = 1) -> None:
        deadline = time.monotonic() + 10
        while sum(n["type"] == "welcome" for n in self.notices) < count:
            assert time.monotonic() < deadline, self.notices
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


# A WebSocket client frame by frame

TEXT, CONT, CLOSE, PING = 0x1, 0x0, 0x8, 0x9


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One frame, bit by bit as RFC 6455 section 5.2 lays it out; `mask=False` and `rsv`
    make frames a client must never send."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    if length < 126:
        head = bytes((first, length))
    elif length < 1 << 16:
        head = bytes((first, 126)) + struct.pack("!H", length)
    else:
        head = bytes((first, 127)) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((head[0], head[1] | 0x80)) + head[2:] + key + masked


def stream_path(site: str) -> str:
    """The WebSocket stream of `site`, with a valid token."""
    return f"/v1/sites/{site}/stream?token={token(site)}"


class RawClient:
    """A WebSocket client written out by hand, so a test controls every frame and sees
    every frame (including pings, which library clients answer on their own)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, extra_headers: str = "") -> RawClient:
        """Connected and upgraded; `extra_headers` ("Name: value\\r\\n" lines) go with the
        upgrade request."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.writer.write(encode_frame(opcode, payload, fin=fin))

    def write(self, data: bytes) -> None:
        """Raw bytes, e.g. several frames in one write (one read on the server's side)."""
        self.writer.write(data)

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
        return (await self.close_frame())[0]

    async def close_frame(self) -> tuple[int, str]:
        """The code and reason of the server's close frame (frames before it are skipped)."""
        while True:
            opcode, payload = await self.frame()
            if opcode == CLOSE:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code, payload[2:].decode()

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the TCP connection (after whatever it still sends)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw TCP connection, closed afterwards whatever the server did to it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length framed response: status, headers (lowercase names), body."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body
