"""A resuming viewer client, written from docs/protocol.md alone.

It connects to one of several gateways, remembers the cursor of the last event it handled,
and on any disconnect in the reconnect range (or a dropped connection) reconnects, to the next
gateway, with jittered exponential backoff, resuming with `?since=`. `sitewire tail` is built
on it, and so are the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from app.codes import CloseCode

Handler = Callable[[dict[str, Any]], None]


#: Where `sitewire tail` connects when neither --gateway nor SITEWIRE_GATEWAY says.
DEFAULT_GATEWAY = "ws://127.0.0.1:8001"


def gateway_urls(raw: str) -> list[str]:
    """Comma-separated gateway base URLs (SITEWIRE_GATEWAY) as WebSocket URLs."""
    urls = [gateway_url(part) for part in raw.split(",") if part.strip()]
    if not urls:
        raise ValueError("must name at least one gateway URL")
    return urls


def gateway_url(raw: str) -> str:
    """A gateway base URL as a WebSocket URL (http:// and https:// are accepted too)."""
    url = raw.strip().rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            url = ws + url[len(http) :]
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"{raw.strip()!r} is not a ws://, wss://, http:// or https:// URL")
    return url


class HandlerFailed(Exception):
    """`on_event` or `on_notice` raised (its error is the cause). Not a connection problem:
    the client stops instead of reconnecting (a closed stdout must end `sitewire tail`)."""


class StreamClosed(Exception):
    """The server closed the stream with a do-not-reconnect code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"stream closed: {code} {reason}")
        self.code = code
        self.reason = reason


@dataclass
class StreamClient:
    gateways: list[str]  # base URLs, ws:// or wss://
    site: str
    token: str
    on_event: Handler
    on_notice: Handler = lambda notice: None
    #: Where to start the first connection: {"since": cursor} | {"last": "N"} | {"minutes": "T"}.
    start: dict[str, str] = field(default_factory=dict)
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    #: The cursor of the last event handled; reconnects resume after it.
    cursor: str | None = None
    connections: int = 0
    #: Told of each failed connection or lost stream: the gateway URL, why, and the seconds
    #: until the next attempt (so a command can say what it is doing instead of going quiet).
    on_retry: Callable[[str, str, float], None] = lambda url, why, delay: None

    def _url(self, attempt: int) -> str:
        base = self.gateways[attempt % len(self.gateways)].rstrip("/")
        params = {"token": self.token}
        if self.cursor is not None:
            params["since"] = self.cursor
        else:
            params.update(self.start)
        return f"{base}/v1/sites/{self.site}/stream?{urlencode(params)}"

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Stream until `stop` is set; raise StreamClosed on a do-not-reconnect close."""
        stop = stop or asyncio.Event()
        failures = 0
        attempt = 0
        while not stop.is_set():
            url = self._url(attempt)
            why = "the stream ended"
            try:
                await self._session(url, stop)
                failures = 0
            except StreamClosed as closed:
                if not reconnectable(closed.code):
                    raise
                failures += 1
                why = f"closed with {closed.code} {closed.reason}".rstrip()
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                failures += 1
                why = str(exc) or type(exc).__name__
            except InvalidURI:
                raise
            attempt += 1
            if stop.is_set():
                return
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(failures, 8))
            delay = random.uniform(delay / 2, delay)
            self.on_retry(url.split("?", 1)[0], why, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, url: str, stop: asyncio.Event) -> None:
        async with connect(url, max_size=None, open_timeout=5, close_timeout=1) as ws:
            self.connections += 1
            stopper = asyncio.create_task(stop.wait())
            try:
                while True:
                    receive = asyncio.create_task(ws.recv())
                    done, _ = await asyncio.wait(
                        {receive, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if receive not in done:
                        receive.cancel()
                        return
                    try:
                        raw = receive.result()
                    except ConnectionClosed:
                        code = ws.close_code
                        if code is not None and code >= 4000:
                            raise StreamClosed(code, ws.close_reason or "") from None
                        raise
                    message = orjson.loads(raw)
                    try:
                        self._handle(message)
                    except Exception as exc:
                        raise HandlerFailed(repr(exc)) from exc
            finally:
                stopper.cancel()

    def _handle(self, message: dict[str, Any]) -> None:
        if message["type"] == "events":
            for event in message["events"]:
                self.cursor = event["cursor"]
                self.on_event(event)
            return
        if message["type"] == "welcome" and message.get("cursor"):
            # Even before the first event, a reconnect must resume from where we started; and
            # where a resume could not start at our cursor (it was ahead of storage, of another
            # epoch, or storage went back before it), from where it did start (docs/protocol.md).
            moved = message.get("reason") in ("cursor_ahead", "epoch_changed", "storage_behind")
            if self.cursor is None or moved:
                self.cursor = message["cursor"]
        self.on_notice(message)


def reconnectable(code: int) -> bool:
    """Close codes 4000-4499 ask the client to reconnect; 4500-4999 to stop (app.codes)."""
    return CloseCode.SHUTTING_DOWN <= code < CloseCode.UNAUTHORIZED
