"""The load generator: many WebSocket viewers (picows) and a keep-alive HTTP poster.

The viewers also exist in C (bench/viewers.c, the default: ~40 % less CPU per frame); these
are the fallback and the comparison in the self-check.

Runs as its own process (`python -m bench.loadgen ...`), pinned to the core the server under
test does not use. It counts *events*, not frames (a coalesced frame carries many), and takes
latency from the `t0` (wall-clock ns at publish) of the oldest event in each frame.

Control protocol on stdin/stdout, one JSON object per line: it prints {"ready": ...} once
connected, then on "stop" prints its statistics and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

T0 = re.compile(rb'"t0":([0-9]{1,19})').search


class Stats:
    def __init__(self) -> None:
        self.events = 0
        self.frames = 0
        self.latencies_us: list[int] = []
        self.closed = 0

    def frame(self, payload: bytes) -> None:
        now = time.time_ns()
        self.frames += 1
        self.events += payload.count(b'"offset":')
        t0 = T0(payload)
        if t0 is not None:
            self.latencies_us.append((now - int(t0[1])) // 1000)


class Viewer(WSListener):  # type: ignore[misc]
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT or frame.msg_type == WSMsgType.BINARY:
            self.stats.frame(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.closed += 1


async def connect_viewers(urls: list[str], count: int, stats: Stats, parallel: int = 200) -> float:
    """Open `count` viewers round-robin over `urls`; return connections per second."""
    started = time.perf_counter()
    sem = asyncio.Semaphore(parallel)
    transports: list[Any] = []

    async def one(i: int) -> None:
        async with sem:
            transport, _ = await ws_connect(lambda: Viewer(stats), urls[i % len(urls)])
            transports.append(transport)

    await asyncio.gather(*(one(i) for i in range(count)))
    _KEEP.extend(transports)
    return count / (time.perf_counter() - started)


_KEEP: list[Any] = []


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ms


async def viewers_main(args: argparse.Namespace) -> None:
    stats = Stats()
    rate = await connect_viewers(args.url, args.count, stats)
    print(orjson.dumps({"ready": True, "connect_rate": rate}).decode(), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "reset":
            stats.__init__()  # type: ignore[misc]
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            print('{"reset": true}', flush=True)
        elif line == "report":
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            print(orjson.dumps(report(stats, cpu)).decode(), flush=True)
        else:  # "quit" or stdin closed
            return


def report(stats: Stats, cpu_s: float) -> dict[str, Any]:
    lat = stats.latencies_us
    return {
        "events": stats.events,
        "frames": stats.frames,
        "closed": stats.closed,
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": (max(lat) / 1000.0) if lat else float("nan"),
        "cpu_s": cpu_s,
    }


# -- HTTP poster ----------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 response (Content-Length framed); return its status line."""
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


#: In a posted body, replaced by a fresh random id in every request (bench/poster.c does the
#: same): events carry their own ids, as the tracking script sends them, each new.
MARKER_ID = b"00000000-0000-4000-8000-000000000000"


def fresh_ids(request: bytes) -> bytes:
    parts = request.split(MARKER_ID)
    out = [parts[0]]
    for part in parts[1:]:
        out += [str(uuid.uuid4()).encode(), part]
    return b"".join(out)


async def post_loop(
    host: str, port: int, body: bytes, path: str, duration: float, latencies: list[int]
) -> int:
    """One keep-alive connection sending requests back to back; returns 202s counted."""
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    ok = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        t = time.perf_counter_ns()
        writer.write(fresh_ids(request))
        status = await read_response(reader)
        latencies.append((time.perf_counter_ns() - t) // 1000)
        if b" 202 " in status:
            ok += 1
    writer.close()
    return ok


async def paced_post(
    host: str,
    port: int,
    make_body: Callable[[], bytes],
    rate: float,
    seconds: float,
    conns: int,
    acks_us: list[int] | None = None,
) -> int:
    """Send `rate` requests/s for `seconds` over `conns` keep-alive connections, building each
    body at send time (so it can carry the send timestamp). Returns 202s counted."""
    interval = conns / rate

    async def one(n: int) -> int:
        reader, writer = await asyncio.open_connection(host, port)
        ok = 0
        start = time.perf_counter() + n * interval / conns
        i = 0
        while (slot := start + i * interval) < start + seconds:
            delay = slot - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = make_body()
            t = time.perf_counter_ns()
            writer.write(
                (
                    f"POST /api/event HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
                    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            status = await read_response(reader)
            if acks_us is not None:
                acks_us.append((time.perf_counter_ns() - t) // 1000)
            ok += b" 202 " in status
            i += 1
        writer.close()
        return ok

    return sum(await asyncio.gather(*(one(n) for n in range(conns))))


async def ingest_main(args: argparse.Namespace) -> None:
    latencies: list[int] = []
    body = args.body.encode()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    results = await asyncio.gather(
        *(post_loop(args.host, args.port, body, args.path, args.duration, latencies)
          for _ in range(args.connections))
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        orjson.dumps(
            {
                "requests_ok": sum(results),
                "requests": len(latencies),
                "seconds": elapsed,
                "p50_ms": percentile(latencies, 0.5),
                "p99_ms": percentile(latencies, 0.99),
                "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
            }
        ).decode(),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    v = sub.add_parser("viewers")
    v.add_argument("--url", action="append", required=True)
    v.add_argument("--count", type=int, required=True)
    i = sub.add_parser("ingest")
    i.add_argument("--host", default="127.0.0.1")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--path", default="/api/event")
    i.add_argument("--body", required=True)
    i.add_argument("--connections", type=int, default=32)
    i.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(viewers_main(args) if args.mode == "viewers" else ingest_main(args))


if __name__ == "__main__":
    main()
