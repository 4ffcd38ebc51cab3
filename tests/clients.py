"""Real viewer clients for tests: a WebSocket viewer (the `websockets` library) and an SSE
viewer (httpx), each recording every event, notice and the close code it saw."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.test_ingest import BROWSER


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
    status: int = 0
    client: httpx.AsyncClient | None = None

    @classmethod
    async def open(
        cls, base: str, site: str, token: str | None, headers: dict[str, str] | None = None
    ) -> SseViewer:
        viewer = cls()
        viewer.client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
        params = {"token": token} if token else {}
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
