"""The naive baseline: what a first FastAPI fanout looks like.

A set of sockets per site, one Redis listener, and `for ws in sockets: await ws.send_text(msg)`
for every message: one frame per event, and every viewer awaited in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from app.names import Names


def create_app(redis_url: str, prefix: str) -> FastAPI:
    names = Names(prefix)
    sockets: defaultdict[str, set[WebSocket]] = defaultdict(set)
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    subscribing = asyncio.Lock()  # even the naive version needs this, or subscriptions get lost

    async def listen() -> None:
        while True:
            if not pubsub.subscribed:
                await asyncio.sleep(0.05)
                continue
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            site = message["channel"].decode().split("{", 1)[1].rstrip("}")
            text = message["data"].decode()
            for ws in list(sockets[site]):
                with contextlib.suppress(Exception):
                    await ws.send_text(text)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(listen())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/v1/sites/{site}/stream")
    async def stream(ws: WebSocket, site: str) -> None:
        await ws.accept()
        async with subscribing:
            if not sockets[site]:
                await pubsub.subscribe(names.channel(site))
            sockets[site].add(ws)
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            sockets[site].discard(ws)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.redis, args.prefix), host="127.0.0.1", port=args.port,
        log_level="warning", ws_per_message_deflate=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
