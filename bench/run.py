"""`make bench`: start real processes on this machine, measure, print one results table.

    python -m bench.run            # the full suite (several minutes)
    python -m bench.run --quick    # a smoke run (seconds; part of `make test`)
    python -m bench.run --only 6   # scenario 6, 100,000 viewers and 10,000 sites
                                   # (bench/scale.py; `make bench-scale`)
    python -m bench.run --scale    # the full suite plus scenario 6

Servers: DATABASE_URL / REDIS_URL, else TEST_DATABASE_URL / TEST_REDIS_URL, else embedded.
The server under test is pinned to core 0, the load generator to core 1 (when there are two).
Results go to stdout and to bench/results/latest.md (+ .json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import hiredis
import httpx
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url

from app.broker.redis import PUBLISH_SCRIPT, script_args, script_keys
from app.names import Names
from app.servers.postgres import create_database, drop_database
from app.store.migrate import migrate
from app.store.sites import create_site
from bench.harness import (
    CORES,
    PAD,
    RESULTS,
    ROOT,
    Env,
    LoadGen,
    Row,
    c_program,
    host_cpu_s,
    pinned,
    rss_kib,
    stream_urls,
    write_cost,
)
from bench.loadgen import MARKER_ID, paced_post, percentile
from bench.scale import cpu_s, scale_rows
from bench.store import ceiling as store_ceiling
from workers.embedded import EmbeddedPostgres, EmbeddedRedis, free_port


def event(offset: int, site: str, now: str) -> bytes:
    """A synthetic event laid out as app.wire encodes one (cursor, then offset, ...), plus `t0`
    (wall-clock ns at publish) for the load generator's latency."""
    return (
        f'{{"cursor":"bench000-{offset}","offset":{offset},"t0":{time.time_ns()},'
        f'"id":"00000000-0000-4000-8000-{offset:012x}","site":"{site}","name":"pageview",'
        f'"url":"https://{site}/page/{offset}","path":"/page/{offset}","pad":"{PAD}",'
        f'"device":"desktop","ts":"{now}"}}'
    ).encode()


class Publisher:
    """Publishes synthetic events the way ingest does: the same Lua script, one call per site
    with all its due events (app.broker.redis.Publisher does one per site per group commit). The
    calls are packed by hiredis and written on a plain connection: redis-py's per-argument
    packing made this process, not the gateway, the limit above ~30k events/s."""

    def __init__(self, env: Env, sites: list[str]) -> None:
        self.url = env.redis_url
        self.names = Names(env.prefix)
        self.sites = sites
        self.offsets = dict.fromkeys(sites, 0)
        self._sha = b""
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is None:
            client = aioredis.Redis.from_url(self.url)
            self._sha = (await client.script_load(PUBLISH_SCRIPT)).encode()
            await client.aclose()
            params = parse_url(self.url)
            self._conn = await asyncio.open_connection(params["host"], params["port"])
        return self._conn

    async def run(self, rate: float, seconds: float) -> int:
        """Publish `rate` events/s in total (spread over the sites) for `seconds`, what is due
        every 10 ms."""
        reader, writer = await self._connection()
        published = ticks = 0
        started = time.perf_counter()
        i = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            due = max(0, int(rate * elapsed) - published)
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            by_site: dict[str, list[int | bytes]] = {}
            for _ in range(due):
                site = self.sites[i % len(self.sites)]
                i += 1
                self.offsets[site] += 1
                offset = self.offsets[site]
                by_site.setdefault(site, []).extend((offset, event(offset, site, now)))
            published += due
            writer.write(b"".join(self._call(site, pairs) for site, pairs in by_site.items()))
            await self._replies(reader, len(by_site))
            ticks += 1
            await asyncio.sleep(max(0.0, started + ticks * 0.01 - time.perf_counter()))
        return published

    def _call(self, site: str, pairs: list[int | bytes]) -> bytes:
        keys, channel = script_keys(self.names, site), self.names.channel(site)
        args = (b"EVALSHA", self._sha, 2, *keys, *script_args(channel, 2000, 3600, pairs))
        packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
        return packed

    @staticmethod
    async def _replies(reader: asyncio.StreamReader, count: int) -> None:
        parser = hiredis.Reader()
        while count:
            parser.feed(await reader.read(65536))
            while count and (reply := parser.gets()) is not False:
                if isinstance(reply, Exception):
                    raise reply
                count -= 1

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn[1].close()


async def new_sites(env: Env, count: int) -> list[str]:
    conn = await asyncpg.connect(env.database_url)
    try:
        sites = [f"b{secrets.token_hex(3)}-{i}.bench.example" for i in range(count)]
        for site in sites:
            await create_site(conn, site)
        return sites
    finally:
        await conn.close()


async def measure_rate(
    publisher: Publisher, load: LoadGen, rate: float, seconds: float, viewers_per_event: int
) -> dict[str, Any]:
    load.command("reset")
    published = await publisher.run(rate, seconds)
    await asyncio.sleep(1.5)  # let the tail arrive
    stats = load.command("report")
    expected = published * viewers_per_event
    stats["delivered"] = stats["events"] / expected if expected else 0.0
    stats["deliveries_per_s"] = stats["events"] / seconds
    stats["rate"] = rate
    stats["published_per_s"] = published / seconds
    print(f"  rate {rate}/s: {json.dumps(stats)}", file=sys.stderr, flush=True)
    return stats


async def fanout(env: Env, quick: bool, sites_count: int, server: str) -> dict[str, Any]:
    """Scenario 2 for one server ("ours" or "naive")."""
    viewers = 50 if quick else 1000
    sites = await new_sites(env, sites_count)
    proc, port = env.role("gateway") if server == "ours" else env.naive()
    publisher = Publisher(env, sites)
    load = LoadGen(stream_urls(port, sites), viewers)
    per_event = viewers // sites_count
    # 2a: 100 events/s to each site, so 100,000 deliveries/s however the viewers are spread.
    low_rate = 100 * sites_count
    # Total events/s to try; deliveries/s = rate x viewers per site.
    ladder = [200] if quick else [100, 200, 400, 700, 1000, 1300, 1600, 2000, 2500, 3000]
    if sites_count > 1 and not quick:
        ladder = [1000, 2000, 4000, 8000, 12000, 20000, 30000, 40000, 50000, 60000, 70000]
    if server == "naive" and not quick:
        ladder = [50, 100, 150, 200, 300, 400, 600, 1000, 2000]
    try:
        await asyncio.sleep(1.0)
        # Warm-up, not counted: the first second after 1,000 connections (allocator growth,
        # first frames) is not the steady state 2a asks about. The naive server falls far
        # behind at 2a's rate, so it warms up at the ladder's first rung and is measured at
        # 2a's rate last: its backlog must not spill into the ladder.
        await publisher.run(low_rate if server == "ours" else ladder[0], 0.5 if quick else 2.0)
        await asyncio.sleep(0.5)
        low: dict[str, Any] | None = None
        if server == "ours":
            low = await measure_rate(publisher, load, low_rate, 1 if quick else 5, per_event)
        best: dict[str, Any] | None = None
        for rate in ladder:
            result = await measure_rate(publisher, load, rate, 1 if quick else 4, per_event)
            if result["delivered"] >= 0.99 and result["p99_ms"] < 250:
                best = result
            else:
                break
        if low is None:
            low = await measure_rate(publisher, load, low_rate, 1 if quick else 5, per_event)
        return {"low": low, "best": best, "rss_kib": rss_kib(proc.pid)}
    finally:
        load.close()
        await publisher.aclose()
        env.stop(proc)


async def idle(env: Env, quick: bool) -> dict[str, Any]:
    count = 300 if quick else 10_000
    [site] = await new_sites(env, 1)
    proc, port = env.role("gateway")
    await asyncio.sleep(0.5)
    before = rss_kib(proc.pid)
    load = LoadGen(stream_urls(port, [site]), count)
    await asyncio.sleep(2.0)
    after = rss_kib(proc.pid)
    # Each viewer must be a real, subscribed one: it got its welcome and is still open.
    seen = load.command("report")
    load.close()
    env.stop(proc)
    return {
        "connections": count,
        "kib_per_connection": (after - before) / count,
        "connect_rate": load.ready["connect_rate"],
        "welcomed": (seen["frames"] / count) if not seen["closed"] else 0.0,
    }


async def ingest(env: Env, quick: bool, batch: int, baseline: bool = False) -> dict[str, Any]:
    """Durable events/s through one ingest process (or, `baseline`, through the validate-only
    FastAPI endpoint of bench/validate_only.py, which stores nothing)."""
    [site] = await new_sites(env, 1)
    if baseline:
        port = free_port()
        proc = env.start(["bench.validate_only", "--port", str(port)], port, 0)
    else:
        # The rate limiter runs as deployed (a check per request), at limits this load never
        # reaches: off, it hid 40 % of the single-event cost (docs/performance.md).
        limits = {"SITEWIRE_RATE_SITE_PER_SEC": "1000000", "SITEWIRE_RATE_IP_PER_MIN": "1000000000"}
        proc, port = env.role("ingest", **limits)
    # Each event with an id of its own, new in every request, as the tracking script sends it
    # (the poster replaces the marker): stored once, through the duplicate check retries need.
    one = {"site": site, "name": "pageview", "url": f"https://{site}/pricing", "props": {"p": PAD}}
    one["id"] = MARKER_ID.decode()
    body = json.dumps([one] * batch if batch > 1 else one)
    path = "/api/events" if batch > 1 else "/api/event"
    poster = c_program("poster")
    if poster is not None:  # C: a third of the Python poster's CPU, on the core PostgreSQL uses
        body_file = env.logs / f"body-{batch}.json"
        body_file.write_text(body)
        args = [*pinned(1), str(poster), "--port", str(port), "--body-file", str(body_file)]
    else:
        args = [*pinned(1), sys.executable, "-m", "bench.loadgen", "ingest", "--port", str(port)]
        args += ["--body", body]
    args += ["--path", path, "--duration", "1" if quick else "8"]
    args += ["--connections", "16" if batch > 1 else "64"]
    host0, server0 = host_cpu_s(), cpu_s(proc.pid)
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, check=True, cwd=ROOT)
    host1, server1 = host_cpu_s(), cpu_s(proc.pid)
    result: dict[str, Any] = json.loads(done.stdout)
    events = result["requests_ok"] * batch
    result["events_per_s"] = events / result["seconds"]
    # What each event cost: the whole host (server, PostgreSQL, Redis, the poster) and the
    # server process alone, in CPU microseconds. Two cores' worth of the first is the most
    # events/s this host could take if the work spread perfectly.
    result["host_us"] = (host1 - host0) / events * 1e6 if events else 0.0
    result["server_us"] = (server1 - server0) / events * 1e6 if events else 0.0
    if baseline:
        env.stop(proc)
        return result
    conn = await asyncpg.connect(env.database_url)
    stored = await conn.fetchval("SELECT count(*) FROM events WHERE site = $1", site)
    await conn.close()
    env.stop(proc)
    result["stored"] = stored
    result["acked"] = result["requests_ok"] * batch
    return result


async def end_to_end(env: Env, quick: bool) -> dict[str, Any]:
    """Scenario 1: ingest HTTP request -> viewer frame, 1000 events/s, 100 viewers, 2 gateways."""
    [site] = await new_sites(env, 1)
    ing, ingest_port = env.role("ingest", core=0)
    g1, p1 = env.role("gateway", core=0)
    g2, p2 = env.role("gateway", core=1)
    viewers = 20 if quick else 100
    load = LoadGen(stream_urls(p1, [site]) + stream_urls(p2, [site]), viewers)
    rate, seconds = (200, 1.0) if quick else (1000, 8.0)
    await asyncio.sleep(1.0)
    load.command("reset")

    def body() -> bytes:
        props = {"t0": time.time_ns(), "p": PAD[:40]}
        return json.dumps({"site": site, "name": "pageview", "url": f"https://{site}/",
                           "props": props}).encode()  # fmt: skip

    acks: list[int] = []
    sent = await paced_post("127.0.0.1", ingest_port, body, rate, seconds, 16, acks)
    await asyncio.sleep(1.0)
    stats = load.command("report")
    load.close()
    for proc in (ing, g1, g2):
        env.stop(proc)
    stats["sent"] = sent
    stats["ack_p50_ms"] = percentile(acks, 0.50)
    stats["ack_p99_ms"] = percentile(acks, 0.99)
    stats["delivered"] = stats["events"] / (sent * viewers) if sent else 0
    return stats


@contextlib.contextmanager
def servers(scratch: Path) -> Iterator[tuple[str, str]]:
    db = os.environ.get("DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    rd = os.environ.get("REDIS_URL") or os.environ.get("TEST_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not db:
            pg = EmbeddedPostgres(scratch / "postgres")
            stack.callback(pg.stop)
            db = pg.dsn()
        if not rd:
            er = EmbeddedRedis(scratch / "redis", persist=False)
            stack.callback(er.stop)
            rd = er.url
        yield db, rd


async def delete_keys(redis_url: str, prefix: str) -> None:
    """Leave the Redis server as we found it: every key of this run's prefix goes."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=Names(prefix).pattern(), count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()


async def run(quick: bool, out: Path, only: set[str], scale: bool = False) -> list[Row]:
    scratch = RESULTS / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with servers(scratch) as (admin_dsn, redis_url):
        dsn = await create_database(admin_dsn, "sw_bench")
        await migrate(dsn)
        env = Env(dsn, redis_url, f"bench{secrets.token_hex(3)}", scratch)
        try:
            rows += await _scenarios(env, quick, only, scale)
        finally:
            env.stop_all()
            await drop_database(admin_dsn, dsn)
            await delete_keys(redis_url, env.prefix)
    write(rows, out, quick)
    return rows


async def _scenarios(env: Env, quick: bool, only: set[str], scale: bool) -> list[Row]:
    rows: list[Row] = []
    if not only or "0" in only:
        rows += await _self_check_rows(quick)
    if not only or "1" in only:
        rows += await _end_to_end_rows(env, quick)
    if not only or "2" in only:
        rows += await _fanout_rows(env, quick)
    if not only or "3" in only:
        rows += await _idle_rows(env, quick)
    if not only or "4" in only:
        rows += await _ingest_rows(env, quick)
    if not only or "5" in only:
        rows += await _resume_rows(env, quick)
    parts = {p[1:] for p in only if p in ("6a", "6b")} or {"a", "b"}
    if only & {"6", "6a", "6b"} or (scale and not only):
        rows += await scale_rows(env, quick, env.logs, parts)
    return rows


async def self_check(quick: bool, per_frame: int, kind: str | None = None) -> dict[str, Any]:
    """How many frames and events per second the load generator takes in (bench.blaster
    pinned to core 0 sends as fast as it can; the loadgen on core 1 counts). When the blaster
    is the slower one, frames per CPU-second of the loadgen is its capacity."""
    port = free_port()
    blaster = subprocess.Popen(  # noqa: ASYNC220 (a benchmark driver; blocking is fine)
        [*pinned(0), sys.executable, "-m", "bench.blaster", str(port), str(per_frame)],
        stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert blaster.stdout is not None
    blaster.stdout.readline()
    load = LoadGen([f"ws://127.0.0.1:{port}/"], 100, kind)
    seconds = 1.0 if quick else 3.0
    load.command("reset")
    await asyncio.sleep(seconds)
    stats = load.command("report")
    load.close()
    blaster.terminate()
    blaster.wait()
    blaster.stdout.close()
    return {
        "frames_per_s": stats["frames"] / seconds,
        "events_per_s": stats["events"] / seconds,
        "cpu_share": stats["cpu_s"] / seconds,
    }


async def resume_storm(env: Env, quick: bool) -> dict[str, Any]:
    """Scenario 5: viewers reconnect at once to a fresh gateway, each `behind` events behind.
    The replay window is kept small so the replay comes from PostgreSQL (the harder case)."""
    viewers, behind = (50, 100) if quick else (1000, 500)
    [site] = await new_sites(env, 1)
    ingest_proc, ingest_port = env.role("ingest", core=1, SITEWIRE_REPLAY_WINDOW="50")
    one = {"site": site, "name": "pageview", "url": f"https://{site}/", "props": {"p": PAD}}
    async with httpx.AsyncClient(headers={"User-Agent": "Mozilla/5.0 Firefox/130.0"}) as client:
        for _ in range(behind // 50):
            r = await client.post(f"http://127.0.0.1:{ingest_port}/api/events", json=[one] * 50)
            r.raise_for_status()
    env.stop(ingest_proc)
    conn = await asyncpg.connect(env.database_url)
    epoch = await conn.fetchval("SELECT epoch FROM sites WHERE id = $1", site)
    await conn.close()
    proc, port = env.role("gateway", core=0)
    url = stream_urls(port, [site])[0] + f"&since={epoch}-0"
    started = time.perf_counter()
    load = LoadGen([url], viewers)
    expected = viewers * behind
    stats = load.command("report")
    while stats["events"] < expected and time.perf_counter() - started < 60:
        await asyncio.sleep(0.05)
        stats = load.command("report")
    elapsed = time.perf_counter() - started
    load.close()
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(env.metrics_url(port))).text
    env.stop(proc)

    def reads(source: str) -> float:
        prefix = f'sitewire_gateway_replay_reads_total{{source="{source}"}} '
        return next((float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(prefix)), 0)

    return {
        "seconds": elapsed,
        "exact": stats["events"] == expected,
        "postgres_reads": reads("postgres"),
        "shared": reads("shared"),
        "viewers": viewers,
    }


async def _resume_rows(env: Env, quick: bool) -> list[Row]:
    r = await resume_storm(env, quick)
    return [
        Row("5 resume storm", f"seconds until {r['viewers']} viewers caught up", r["seconds"],
            target="<= 5", met=r["seconds"] <= 5 and r["exact"]),
        Row("5 resume storm", "every viewer exact (events == viewers x behind)", float(r["exact"])),
        Row("5 resume storm", "PostgreSQL page reads", r["postgres_reads"]),
        Row("5 resume storm", "reads shared (in flight or just read)", r["shared"]),
    ]  # fmt: skip


async def _self_check_rows(quick: bool) -> list[Row]:
    one = await self_check(quick, 1)
    many = await self_check(quick, 20)
    picows = await self_check(quick, 1, "picows")
    writes = write_cost(quick)
    name = "0 loadgen self-check"
    host = (
        []
        if writes is None
        else [
            # What one delivery costs the sender on this host before any of our code runs: 2a's
            # 100,000 deliveries/s take this many microseconds x 10 % of a core.
            Row(
                "0 host", "loopback TCP write µs, C, 1,000 sockets (mean)", writes["write_us_mean"]
            ),
            Row("0 host", "same, best round", writes["write_us_best_round"]),
        ]
    )
    return [
        *host,
        Row(name, "frames/s taken in (1 event/frame)", one["frames_per_s"]),
        Row(name, "events/s taken in (20 events/frame)", many["events_per_s"]),
        # Below 1.0 the blaster, not the load generator, set the frame rate above.
        Row(name, "loadgen CPU share (1 event/frame)", one["cpu_share"]),
        Row(name, "frames per loadgen CPU-second", one["frames_per_s"] / one["cpu_share"]),
        Row(name, "frames per CPU-second, picows viewers", picows["frames_per_s"]
            / picows["cpu_share"]),
    ]  # fmt: skip


async def _end_to_end_rows(env: Env, quick: bool) -> list[Row]:
    e2e = await end_to_end(env, quick)
    return [
        Row("1 end-to-end", "p50 ms", e2e["p50_ms"], target="<= 3", met=e2e["p50_ms"] <= 3),
        Row("1 end-to-end", "p99 ms", e2e["p99_ms"], target="<= 10", met=e2e["p99_ms"] <= 10),
        Row("1 end-to-end", "max ms", e2e["max_ms"]),
        # The share of the latency spent before the 202 (validation and the group commit).
        Row("1 end-to-end", "ack p50 ms (request to 202)", e2e["ack_p50_ms"]),
        Row("1 end-to-end", "ack p99 ms (request to 202)", e2e["ack_p99_ms"]),
        Row("1 end-to-end", "delivered", e2e["delivered"], target=">= 0.99",
            met=e2e["delivered"] >= 0.99),
    ]  # fmt: skip


async def _fanout_rows(env: Env, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for sites, label in ((1, "1 site"), (100 if not quick else 5, "100 sites")):
        # The host's floor drifts within a run (shared VM): measured again right before, so
        # each 2a figure can be read against what a write cost at the time.
        writes = write_cost(quick)
        ours = await fanout(env, quick, sites, "ours")
        naive = await fanout(env, quick, sites, "naive")
        best_ours = ours["best"]["deliveries_per_s"] if ours["best"] else 0.0
        best_naive = naive["best"]["deliveries_per_s"] if naive["best"] else 0.0
        goal = 1_000_000 if sites == 1 else 500_000
        rows += [
            Row(f"2a fanout {label}", "p99 ms @100 ev/s per site", ours["low"]["p99_ms"],
                naive["low"]["p99_ms"], "<= 20", ours["low"]["p99_ms"] <= 20),
            Row(f"2b fanout {label}", "max deliveries/s", best_ours, best_naive,
                f">= {goal:,}", best_ours >= goal),
            Row(f"2 fanout {label}", "loadgen CPU s (2a)", ours["low"]["cpu_s"]),
        ]  # fmt: skip
        if writes is not None:
            rows.append(Row(f"2 fanout {label}", "host write µs just before (mean, as 0 host)",
                            writes["write_us_mean"]))  # fmt: skip
    return rows


async def _idle_rows(env: Env, quick: bool) -> list[Row]:
    idle_stats = await idle(env, quick)
    return [
        Row("3 idle", "KiB per connection", idle_stats["kib_per_connection"], target="<= 16",
            met=idle_stats["kib_per_connection"] <= 16),
        Row("3 idle", "connects/s", idle_stats["connect_rate"]),
        Row("3 idle", "viewers welcomed and open", idle_stats["welcomed"]),
    ]  # fmt: skip


async def _ingest_rows(env: Env, quick: bool) -> list[Row]:
    rows: list[Row] = []
    single = await ingest(env, quick, 1)
    batch = await ingest(env, quick, 50)
    # The validate-only baseline (a FastAPI endpoint that stores nothing) in the naive column:
    # the ratio is durable events/s over validated ones (#20: batches >= 0.6x, single >= 2x).
    base_single = await ingest(env, quick, 1, baseline=True)
    base_batch = await ingest(env, quick, 50, baseline=True)
    cases = (
        ("single", single, 3000, base_single, 2.0),
        ("batch 50", batch, 20000, base_batch, 0.6),
    )
    for label, result, goal, base, share in cases:
        ratio = result["events_per_s"] / base["events_per_s"]
        rows += [
            Row(f"4 ingest {label}", "durable events/s", result["events_per_s"],
                target=f">= {goal:,}", met=result["events_per_s"] >= goal),
            Row(f"4 ingest {label}", "events/s vs validate-only FastAPI",
                result["events_per_s"], base["events_per_s"],
                target=f">= {share}x", met=ratio >= share),
            Row(f"4 ingest {label}", "p99 request ms", result["p99_ms"]),
            Row(f"4 ingest {label}", "host CPU us per event", result["host_us"], base["host_us"]),
            Row(f"4 ingest {label}", "server process CPU us per event", result["server_us"],
                base["server_us"]),
            Row(f"4 ingest {label}", "acked == stored", float(result["acked"] <= result["stored"])),
        ]  # fmt: skip
    # What PostgreSQL alone allows: no ingest can store batches faster than one core of it.
    stored = await store_ceiling(env.database_url, events=8_000 if quick else 40_000)
    if stored is not None:
        rows.append(
            Row("4 ingest batch 50", "PostgreSQL alone: events/s per core (commits of 400)",
                stored, base_batch["events_per_s"])
        )  # fmt: skip
    return rows


def write(rows: list[Row], out: Path, quick: bool) -> None:
    head = (
        f"Sitewire bench ({'quick' if quick else 'full'}) {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{platform.node()}, {CORES} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    lines = [head, "", "| scenario | metric | ours | naive | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        naive = "" if r.naive is None else f"{r.naive:,.2f}"
        met = "" if r.met is None else ("yes" if r.met else "NO")
        cells = [r.scenario, r.metric, f"{r.ours:,.2f}", naive, r.ratio, r.target, met]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md")
    parser.add_argument(
        "--only", default="", help="Comma-separated scenario numbers (0-6; 6a, 6b)."
    )
    parser.add_argument(
        "--scale", action="store_true", help="Add scenario 6 (bench/scale.py) to the full suite."
    )
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    asyncio.run(run(args.quick, args.out, only, args.scale))


if __name__ == "__main__":
    main()
