"""Scenario 6, many connections and many sites (issue 20, item 1): `make bench-scale`.

    python -m bench.run --only 6           # what `make bench-scale` runs (a few minutes)
    python -m bench.run --scale            # the full suite plus these rows
    python -m bench.run --only 6 --quick   # a smoke version (1,000 viewers)

6a **100,000 viewers of one site** on two gateway replicas sharing one port, as `sitewire up
   --gateways 2` runs them: gateway memory per viewer; a broadcast at 1 event/s (posted through
   ingest, so each event is durable and has a real cursor) that every viewer must receive, p99
   from the event's `t0`; then a rolling restart (SIGTERM one replica, which drains its
   viewers with 4000, start it again, then the other) with events still posted at 1 event/s,
   timed until every viewer has resumed from its cursor and caught up, exactly (no duplicate,
   no gap, every resume `recovered`).
6b **10,000 sites x 10 viewers at 1 event/s each** (10,000 events/s, 100,000 deliveries/s) on
   the same two replicas and one Redis: gateway CPU per event, Redis memory per site window,
   and subscribe/unsubscribe churn (the viewers of 1,000 sites leave, the gateways unsubscribe
   those sites, the viewers come back resuming from their cursors; repeated), with every
   viewer's stream checked exact at the end. Events come from the bench's publisher
   (bench.run.Publisher: ingest's Lua script straight into Redis, and each site's head moved
   in PostgreSQL first, as ingest's commit does; no ingest and no event rows), so this
   measures the gateways and Redis, not ingest.

The bench starts the two replicas itself, exactly as `sitewire up --gateways 2` does (`sitewire
gateway --reuse-port` on one port, each with its own private metrics port), instead of running
`sitewire up`: it must restart them one at a time from outside, read each one's CPU and memory,
and raise their file limit. RLIMIT_NOFILE is raised here, for the processes the bench starts,
never by the product: on a server it is the operator's (systemd's LimitNOFILE, the container
runtime's ulimit). The viewers are bench/viewers.c processes that bind their connections to
127.0.0.2.. round-robin: one source address has ~28,000 ephemeral ports towards one server port.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.settings import Settings
from app.store.sites import create_site
from bench.run import (
    PAD,
    Env,
    Publisher,
    Row,
    rss_kib,
    stream_urls,
    viewers_binary,
)
from workers.embedded import free_port

#: A browser's User-Agent: ingest drops events from bots and scripts.
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The gateways' default (app.settings): how long a site stays subscribed after its last viewer.
UNSUBSCRIBE_DELAY_S = Settings().unsubscribe_delay_s


@dataclass(frozen=True)
class Sizes:
    viewers: int  # 6a
    viewer_procs: int  # bench/viewers.c processes sharing the viewers
    sources: int  # loopback source addresses
    broadcast_s: float  # 6a: seconds of 1 event/s measured
    sites: int  # 6b
    per_site: int
    churn_sites: int
    churn_cycles: int
    publish_s: float  # 6b: seconds of 1 event/s per site measured

    @property
    def site_viewers(self) -> int:
        return self.sites * self.per_site


FULL = Sizes(100_000, 2, 16, 10.0, 10_000, 10, 1_000, 3, 10.0)
QUICK = Sizes(1_000, 1, 2, 3.0, 100, 10, 10, 1, 3.0)


def nofile_preexec(limit: int) -> Callable[[], None]:
    """For `preexec_fn`: the child's RLIMIT_NOFILE raised to `limit` (root may raise the hard
    limit too), else to its hard limit."""

    def preexec() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(hard, limit)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return preexec


def nofile_limit(viewers: int) -> int:
    """What a gateway holding every viewer needs, within fs.nr_open."""
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    return min(nr_open, viewers + 10_000)


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tcp_mem_kib() -> int:
    """Memory of every TCP socket buffer on the host (/proc/net/sockstat, pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            return int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGESIZE") // 1024
    return 0


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


class Replicas:
    """Gateway replicas sharing one port with SO_REUSEPORT, as `sitewire up --gateways N`
    starts them; each answers its own metrics on a private port."""

    def __init__(self, env: Env, count: int, nofile: int) -> None:
        self.env = env
        self.port = free_port()
        self.nofile = nofile
        self.procs: list[subprocess.Popen[bytes]] = []
        self.internal: list[int] = []
        for _ in range(count):
            proc, internal = self._start()
            self.procs.append(proc)
            self.internal.append(internal)

    def _start(self) -> tuple[subprocess.Popen[bytes], int]:
        internal = free_port()
        argv = ["workers.cli", "gateway", "--port", str(self.port), "--reuse-port"]
        argv += ["--internal-port", str(internal)]
        proc = self.env.start(
            argv, self.port, None, ready_port=internal, preexec=nofile_preexec(self.nofile)
        )
        return proc, internal

    def stop(self, i: int) -> None:
        """SIGTERM (the gateway drains its viewers with 4000), then wait for it to exit."""
        proc = self.procs[i]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, i: int) -> None:
        self.stop(i)
        self.procs[i], self.internal[i] = self._start()

    def rss_kib(self) -> int:
        return sum(rss_kib(p.pid) for p in self.procs)

    def cpu_s(self) -> float:
        return sum(cpu_s(p.pid) for p in self.procs)

    async def metrics(self) -> list[str]:
        async with httpx.AsyncClient(timeout=10) as client:
            pages = [await client.get(f"http://127.0.0.1:{i}/metrics") for i in self.internal]
        return [page.text for page in pages]

    def close(self) -> None:
        for proc in self.procs:
            self.env.stop(proc)


class Viewers:
    """Several bench/viewers.c processes sharing `count` viewers (one epoll loop per process),
    with reconnect-and-resume on. Viewer i of a process watches URL i mod len(urls)."""

    def __init__(
        self, urls: list[str], count: int, procs: int, sources: int, scratch: Path, tag: str
    ) -> None:
        binary = viewers_binary()
        if binary is None:
            raise RuntimeError("scenario 6 needs bench/viewers.c, and no C compiler was found")
        self.count = count
        self.scratch = scratch
        self.tag = tag
        url_file = scratch / f"urls-{tag}.txt"
        url_file.write_text("\n".join(urls) + "\n")
        started = time.perf_counter()
        self.procs: list[subprocess.Popen[bytes]] = []
        for n in _split(count, procs):
            args = [str(binary), "--count", str(n), "--urls", str(url_file)]
            args += ["--sources", str(sources), "--reconnect", "--deadline", "300"]
            self.procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        ready = [self._read(p) for p in self.procs]
        self.seconds = time.perf_counter() - started
        self.open = sum(r["open"] for r in ready)
        self.connect_rate = self.open / self.seconds

    @staticmethod
    def _read(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("a viewers process exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def command(self, text: str) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()
        return [self._read(p) for p in self.procs]

    async def acommand(self, text: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.command, text)

    async def status(self) -> dict[str, Any]:
        """The counters of every process added up; min_last/max_last over all viewers."""
        merged: dict[str, Any] = {}
        for part in await self.acommand("status"):
            for key, value in part.items():
                if key == "min_last":
                    if value >= 0:
                        merged[key] = min(merged.get(key, value), value)
                elif key == "max_last":
                    merged[key] = max(merged.get(key, value), value)
                elif isinstance(value, int | float):
                    merged[key] = merged.get(key, 0) + value
        merged.setdefault("min_last", -1)
        return merged

    async def latencies_ms(self) -> dict[str, float]:
        """p50 / p99 / max over every process's latencies since the last reset."""
        values: array.array[int] = array.array("q")
        for i, _ in enumerate(self.procs):
            path = self.scratch / f"latencies-{self.tag}-{i}.bin"
            await asyncio.to_thread(self._dump_one, i, path)
            values.frombytes(path.read_bytes())
            path.unlink()
        ordered = sorted(values)
        if not ordered:
            return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

        return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] / 1000.0}

    def _dump_one(self, i: int, path: Path) -> None:
        proc = self.procs[i]
        assert proc.stdin is not None
        proc.stdin.write(f"dump {path}\n".encode())
        proc.stdin.flush()
        self._read(proc)

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class Poster:
    """Events through ingest (HTTP), one at a time, each carrying `t0` for the viewers'
    latency; remembers the highest offset acknowledged."""

    def __init__(self, port: int, site: str) -> None:
        self.site = site
        self.url = f"http://127.0.0.1:{port}/api/event"
        self.client = httpx.AsyncClient(timeout=10, headers={"User-Agent": BROWSER})
        self.acked = 0
        self.posted = 0

    async def post(self) -> None:
        props = {"t0": time.time_ns(), "p": PAD[:40]}
        body = {
            "site": self.site,
            "name": "pageview",
            "url": f"https://{self.site}/",
            "props": props,
        }
        response = await self.client.post(self.url, json=body)
        response.raise_for_status()
        self.posted += 1
        self.acked = max(self.acked, int(response.json()["cursor"].rsplit("-", 1)[1]))

    async def every_second(self, seconds: float | None, stop: asyncio.Event | None = None) -> None:
        """One event a second for `seconds`, or until `stop` is set."""
        started = time.perf_counter()
        n = 0
        while (seconds is None or n < seconds) and not (stop is not None and stop.is_set()):
            await self.post()
            n += 1
            await asyncio.sleep(max(0.0, started + n - time.perf_counter()))

    async def aclose(self) -> None:
        await self.client.aclose()


async def register_sites(env: Env, count: int) -> list[str]:
    """`count` new sites in one transaction (10,000 commits would take longer than the rest)."""
    conn = await asyncpg.connect(env.database_url)
    try:
        sites = [f"s{secrets.token_hex(3)}-{i}.bench.example" for i in range(count)]
        async with conn.transaction():
            for site in sites:
                await create_site(conn, site)
        return sites
    finally:
        await conn.close()


# -- 6a: 100,000 viewers of one site, broadcast, rolling restart ------------------------------


async def many_viewers(env: Env, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    [site] = await register_sites(env, 1)
    ingest_proc, ingest_port = env.role("ingest", core=None)
    gateways = Replicas(env, 2, nofile_limit(sizes.viewers))
    poster = Poster(ingest_port, site)
    viewers: Viewers | None = None
    result: dict[str, Any] = {"viewers": sizes.viewers}
    try:
        await asyncio.sleep(1.0)
        rss_before, tcp_before = gateways.rss_kib(), tcp_mem_kib()
        url = stream_urls(gateways.port, [site])[0]
        viewers = await asyncio.to_thread(
            Viewers, [url], sizes.viewers, sizes.viewer_procs, sizes.sources, scratch, "6a"
        )
        result["open"] = viewers.open
        result["connect_s"] = viewers.seconds
        print(f"  6a: {viewers.open} open in {viewers.seconds:.1f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(2.0)
        rss_after, tcp_after = gateways.rss_kib(), tcp_mem_kib()
        result["kib_per_viewer"] = (rss_after - rss_before) / max(1, viewers.open)
        result["tcp_kib_per_viewer"] = (tcp_after - tcp_before) / max(1, viewers.open)
        spread = [metric(m, "sitewire_gateway_connections") for m in await gateways.metrics()]
        result["spread"] = spread

        # Broadcast: 1 event/s; every viewer must get every one.
        await viewers.acommand("reset")
        await poster.every_second(sizes.broadcast_s)
        await asyncio.sleep(2.0)
        seen = await viewers.status()
        result.update(await viewers.latencies_ms())
        result["delivered"] = seen["events"] / (poster.posted * sizes.viewers)
        result["broadcast"] = seen
        result["kib_per_viewer_after"] = (gateways.rss_kib() - rss_before) / max(1, viewers.open)
        print(f"  6a broadcast: {json.dumps(seen)}", file=sys.stderr, flush=True)

        result.update(await rolling_restart(gateways, viewers, poster, sizes))
        return result
    finally:
        if viewers is not None:
            viewers.close()
        await poster.aclose()
        gateways.close()
        env.stop(ingest_proc)


async def rolling_restart(
    gateways: Replicas, viewers: Viewers, poster: Poster, sizes: Sizes
) -> dict[str, Any]:
    """SIGTERM replica 0, start it again, then replica 1, events posted at 1 event/s all
    along; seconds from the first SIGTERM until every viewer is open again on a new replica,
    resumed, and has every event acknowledged so far."""
    await viewers.acommand("reset")
    stop = asyncio.Event()
    posting = asyncio.create_task(poster.every_second(None, stop))
    started = time.perf_counter()
    restarted: dict[str, float] = {}

    def restart_all() -> None:
        for i in range(len(gateways.procs)):
            gateways.restart(i)
            restarted[f"replica {i} ready s"] = time.perf_counter() - started

    restarting = asyncio.create_task(asyncio.to_thread(restart_all))
    done_s: float | None = None
    status: dict[str, Any] = {}
    limit = 180.0
    try:
        while time.perf_counter() - started < limit:
            await asyncio.sleep(0.25)
            acked = poster.acked
            status = await viewers.status()
            if (
                restarting.done()
                and status["open"] == sizes.viewers
                and status["welcomed"] == sizes.viewers
                and status["min_last"] >= acked
            ):
                done_s = time.perf_counter() - started
                break
        await restarting
    finally:
        stop.set()
        await posting
    await asyncio.sleep(1.5)
    final = await viewers.status()
    print(f"  6a restart: {json.dumps(final)} {restarted}", file=sys.stderr, flush=True)
    exact = (
        final["dups"] == 0
        and final["gaps"] == 0
        and final["unrecovered"] == 0
        and final["recovered"] >= sizes.viewers
        and final["min_last"] >= poster.acked
    )
    return {
        "storm_s": done_s if done_s is not None else float("inf"),
        "storm_exact": exact and done_s is not None,
        "storm": final,
        "restarted": restarted,
    }


# -- 6b: 10,000 sites x 10 viewers at 1 event/s each ----------------------------------------


async def redis_info(url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url)
    try:
        info: dict[str, Any] = await client.info("all")
        return info
    finally:
        await client.aclose()


def subscribe_calls(info: dict[str, Any]) -> int:
    return int(info.get("cmdstat_subscribe", {}).get("calls", 0))


async def many_sites(env: Env, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    sites = await register_sites(env, sizes.sites)
    churned, steady = sites[: sizes.churn_sites], sites[sizes.churn_sites :]
    gateways = Replicas(env, 2, nofile_limit(sizes.site_viewers))
    heads = await asyncpg.create_pool(env.database_url, min_size=1, max_size=2)
    publisher = Publisher(env, sites, heads)
    stable: Viewers | None = None
    churn: Viewers | None = None
    result: dict[str, Any] = {"sites": sizes.sites}
    try:
        await asyncio.sleep(1.0)
        churn = await asyncio.to_thread(
            Viewers, stream_urls(gateways.port, churned), sizes.churn_sites * sizes.per_site,
            1, sizes.sources, scratch, "6b-churn",
        )  # fmt: skip
        stable = await asyncio.to_thread(
            Viewers, stream_urls(gateways.port, steady), len(steady) * sizes.per_site,
            sizes.viewer_procs, sizes.sources, scratch, "6b",
        )  # fmt: skip
        result["open"] = stable.open + churn.open
        pages = await gateways.metrics()
        result["subscribed"] = [metric(m, "sitewire_gateway_subscribed_sites") for m in pages]
        print(f"  6b: {result['open']} open, subscribed {result['subscribed']}", file=sys.stderr)
        await asyncio.sleep(1.0)

        # Steady state: every site at 1 event/s.
        rate = float(sizes.sites)
        info0, cpu0 = await redis_info(env.redis_url), gateways.cpu_s()
        await stable.acommand("reset")
        await churn.acommand("reset")
        published = await publisher.run(rate, sizes.publish_s)
        cpu1 = gateways.cpu_s()
        await asyncio.sleep(1.5)
        info1 = await redis_info(env.redis_url)
        seen = [await stable.status(), await churn.status()]
        result.update(await stable.latencies_ms())
        events = sum(s["events"] for s in seen)
        deliveries_expected = published * sizes.per_site
        result["published_per_s"] = published / sizes.publish_s
        result["delivered"] = events / deliveries_expected
        result["cpu_us_per_event"] = (cpu1 - cpu0) / published * 1e6
        result["cpu_us_per_delivery"] = (cpu1 - cpu0) / max(1, events) * 1e6
        result["gateway_cpu_share"] = (cpu1 - cpu0) / sizes.publish_s
        held = published / sizes.sites  # events in each site's window now
        grown = info1["used_memory"] - info0["used_memory"]
        result["redis_bytes_per_site"] = grown / sizes.sites
        result["redis_events_per_site"] = held
        result["redis_bytes_per_event"] = grown / published
        print(f"  6b steady: {json.dumps(seen)}", file=sys.stderr, flush=True)

        result.update(await churn_cycles(env, gateways, publisher, churn, sizes))
        await publisher.level()
        await asyncio.sleep(2.0)
        final = [await stable.status(), await churn.status()]
        end = next(iter(publisher.offsets.values()))
        result["final"] = final
        result["exact"] = all(
            f["dups"] == 0 and f["gaps"] == 0 and f["unrecovered"] == 0 and f["min_last"] == end
            for f in final
        )
        print(f"  6b final (end {end}): {json.dumps(final)}", file=sys.stderr, flush=True)
        return result
    finally:
        for group in (stable, churn):
            if group is not None:
                group.close()
        await publisher.aclose()
        await heads.close()
        gateways.close()


async def churn_cycles(
    env: Env, gateways: Replicas, publisher: Publisher, churn: Viewers, sizes: Sizes
) -> dict[str, Any]:
    """The churn group's viewers leave (each closes with 1000), the gateways unsubscribe their
    sites once the unsubscribe delay has passed, and the viewers come back resuming from their
    cursors; `churn_cycles` times, every site still at 1 event/s."""
    count = sizes.churn_sites * sizes.per_site
    base = sum(metric(m, "sitewire_gateway_subscribed_sites") for m in await gateways.metrics())
    seconds = 60.0 * sizes.churn_cycles
    publishing = asyncio.create_task(publisher.run(float(sizes.sites), seconds))
    back_s: list[float] = []
    subscribes: list[int] = []
    unsubscribed: list[float] = []
    try:
        for _ in range(sizes.churn_cycles):
            await churn.acommand("leave")
            deadline = time.perf_counter() + 30
            while time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
                if (await churn.status())["left"] >= count:
                    break
            # Each replica unsubscribes a site SITEWIRE_UNSUBSCRIBE_DELAY_S (2 s) after its
            # last viewer left.
            await asyncio.sleep(UNSUBSCRIBE_DELAY_S + 1.0)
            pages = await gateways.metrics()
            now = sum(metric(m, "sitewire_gateway_subscribed_sites") for m in pages)
            unsubscribed.append(base - now)
            calls0 = subscribe_calls(await redis_info(env.redis_url))
            started = time.perf_counter()
            await churn.acommand("back")
            while time.perf_counter() - started < 60:
                await asyncio.sleep(0.05)
                status = await churn.status()
                if status["open"] == count and status["welcomed"] == count:
                    break
            back_s.append(time.perf_counter() - started)
            subscribes.append(subscribe_calls(await redis_info(env.redis_url)) - calls0)
            await asyncio.sleep(1.0)
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
    print(f"  6b churn: back {back_s} s, subscribes {subscribes}, unsubscribed {unsubscribed}",
          file=sys.stderr, flush=True)  # fmt: skip
    return {
        "churn_back_s": max(back_s),
        "churn_subscribes": subscribes,
        "churn_unsubscribed": unsubscribed,
        "subscribes_per_s": sum(subscribes) / sum(back_s),
        "viewers_back_per_s": count * len(back_s) / sum(back_s),
    }


# -- rows --------------------------------------------------------------------------------------


async def scale_rows(env: Env, quick: bool, scratch: Path) -> list[Row]:
    sizes = QUICK if quick else FULL
    a = await many_viewers(env, sizes, scratch)
    b = await many_sites(env, sizes, scratch)
    n = f"{sizes.viewers:,}"
    storm = a["storm"]
    rows = [
        Row("6a viewers", f"viewers open of {n} (2 gateways, one port)", a["open"],
            target=f">= {n}", met=a["open"] >= sizes.viewers),
        Row("6a viewers", "seconds to connect them", a["connect_s"]),
        Row("6a viewers", "gateway KiB per viewer (RSS, both replicas)", a["kib_per_viewer"],
            target="<= 6", met=a["kib_per_viewer"] <= 6),
        Row("6a viewers", "same, after the broadcast", a["kib_per_viewer_after"]),
        Row("6a viewers", "kernel TCP buffers KiB per viewer (both ends)",
            a["tcp_kib_per_viewer"]),
        Row("6a broadcast 1 ev/s", "p99 ms (from t0, through ingest)", a["p99_ms"],
            target="<= 1000", met=a["p99_ms"] <= 1000),
        Row("6a broadcast 1 ev/s", "p50 ms", a["p50_ms"]),
        Row("6a broadcast 1 ev/s", "delivered (every viewer, every event)", a["delivered"],
            target="1.00", met=a["delivered"] == 1.0 and a["broadcast"]["gaps"] == 0),
        Row("6a rolling restart", f"seconds until all {n} resumed and caught up",
            a["storm_s"], target="<= 30", met=a["storm_s"] <= 30 and a["storm_exact"]),
        Row("6a rolling restart", "every viewer exact (no dup, no gap, recovered)",
            float(a["storm_exact"])),
        Row("6a rolling restart", "reconnects scheduled (closes and failed attempts)",
            storm["retries"]),
        Row("6a rolling restart", "of which refused by a draining replica", storm["refused"]),
    ]  # fmt: skip
    s = f"{sizes.sites:,}"
    churned = f"{sizes.churn_sites:,}"
    rows += [
        Row(f"6b {s} sites", f"viewers open of {sizes.site_viewers:,}", b["open"],
            target=f">= {sizes.site_viewers:,}", met=b["open"] >= sizes.site_viewers),
        Row(f"6b {s} sites", "events/s published (1 per site)", b["published_per_s"]),
        Row(f"6b {s} sites", "delivered", b["delivered"], target=">= 0.99",
            met=b["delivered"] >= 0.99),
        Row(f"6b {s} sites", "p99 ms", b["p99_ms"], target="<= 1000", met=b["p99_ms"] <= 1000),
        Row(f"6b {s} sites", "gateway CPU µs per event (both replicas)", b["cpu_us_per_event"]),
        Row(f"6b {s} sites", "gateway CPU µs per delivery", b["cpu_us_per_delivery"]),
        Row(f"6b {s} sites", "gateway CPU share (cores)", b["gateway_cpu_share"]),
        Row(f"6b {s} sites", f"Redis bytes per site window ({b['redis_events_per_site']:.0f} "
            "events)", b["redis_bytes_per_site"]),
        Row(f"6b {s} sites", "Redis bytes per windowed event", b["redis_bytes_per_event"]),
        Row(f"6b churn {churned} sites", "subscribes/s (viewers back, both replicas)",
            b["subscribes_per_s"]),
        Row(f"6b churn {churned} sites", "viewers back/s (resumed)", b["viewers_back_per_s"]),
        Row(f"6b churn {churned} sites", "slowest return, seconds", b["churn_back_s"]),
        Row(f"6b {s} sites", "every stream exact at the end (churn included)",
            float(b["exact"]), target="1.00", met=b["exact"]),
    ]  # fmt: skip
    return rows
