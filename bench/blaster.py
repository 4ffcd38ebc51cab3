"""The load generator's self-check: a picows server that sends ready frames as fast as the
socket takes them, so we know how many frames and events per second the viewers process can
take in before any Sitewire number is trusted.

    python -m bench.blaster PORT EVENTS_PER_FRAME
"""

from __future__ import annotations

import asyncio
import sys
import time

from picows import WSListener, WSMsgType, WSTransport, ws_create_server

EVENT = (
    b'{"offset":1,"t0":%d,"cursor":"bench000-1","site":"s.bench.example","name":"pageview",'
    b'"url":"https://s.bench.example/page/1","path":"/page/1","pad":"' + b"x" * 120 + b'"}'
)


class Blaster(WSListener):  # type: ignore[misc]
    def __init__(self, per_frame: int) -> None:
        self.per_frame = per_frame

    def on_ws_connected(self, transport: WSTransport) -> None:
        asyncio.get_running_loop().create_task(self.blast(transport))

    async def blast(self, transport: WSTransport) -> None:
        while not transport.is_disconnected:
            events = b",".join([EVENT % time.time_ns()] * self.per_frame)
            transport.send(WSMsgType.TEXT, b'{"type":"events","events":[' + events + b"]}")
            await asyncio.sleep(0)  # one frame per connection per loop turn


async def main(port: int, per_frame: int) -> None:
    server = await ws_create_server(lambda _request: Blaster(per_frame), "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
