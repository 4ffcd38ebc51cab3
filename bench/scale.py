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
   viewer's stream checked exact at the end. Events go through ingest, in batches of 100
   sites' events (SitesPoster): bench.run's Publisher, which writes straight into Redis, would
   leave PostgreSQL without the events and the sites' heads, and a gateway judges resumes
   against those and falls back to them (a window read that is slow or incomplete), so
   resumes would look wrong where the product is right.

The bench starts the two replicas itself, exactly as `sitewire up --gateways 2` does (`sitewire
gateway --reuse-port` on one port, each with its own private metrics port), instead of running
`sitewire up`: it must restart them one at a time from outside, read each one's CPU and memory,
and raise their file limit. RLIMIT_NOFILE is raised here, for the processes the bench starts,
never by the product: on a server it is the operator's (systemd's LimitNOFILE, the container
runtime's ulimit). The viewers are bench/viewers.c processes that bind their connections to
127.0.0.2.. round-robin: one source address has ~28,000 ephemeral ports towards one server port.

Where a process may not open that many files (the hard RLIMIT_NOFILE, which only root with
CAP_SYS_RESOURCE may raise), the sizes shrink to what fits, and the rows say so: the viewers
open, the file limit, the viewers a restart moved (`viewer_counts`), viewers per site in 6b.
SITEWIRE_BENCH_SCALE overrides the sizes ("replicas=6,viewers=50000": `sizes_for`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.settings import Settings
from app.store.sites import create_site
from bench.harness import (
    PAD,
    Env,
    Row,
    rss_kib,
    stream_urls,
    viewers_binary,
)
from bench.loadgen import percentile
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
    #: 6a's rolling restart: 0 stops a replica, then starts its replacement; 1 starts the
    #: replacement first (a third listener on the port), then stops the old one.
    surge: int = 0
    #: Gateway replicas on the port (`sitewire up --gateways 2`).
    replicas: int = 2

    @property
    def site_viewers(self) -> int:
        return self.sites * self.per_site


FULL = Sizes(100_000, 2, 16, 10.0, 10_000, 10, 1_000, 3, 10.0)
QUICK = Sizes(1_000, 1, 2, 3.0, 100, 10, 10, 1, 3.0)

#: Files a gateway holds besides its viewers (listening sockets, PostgreSQL and Redis
#: connections, its event loop, logs), with room to spare; and a viewers process.
GATEWAY_FDS = 256
VIEWER_FDS = 64
#: SO_REUSEPORT spreads connections by a hash of their addresses, not evenly: a replica may get
#: a few percent more than its share.
SPREAD_MARGIN = 0.97


def fd_ceiling() -> int:
    """The most files a process the bench starts may open: the hard RLIMIT_NOFILE, first raised
    to fs.nr_open when this process may (root with CAP_SYS_RESOURCE)."""
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def replica_capacity() -> int:
    """Viewers one gateway replica can hold under the file limit, spread margin included."""
    return int((fd_ceiling() - GATEWAY_FDS) * SPREAD_MARGIN)


def nofile_preexec() -> None:
    """For `preexec_fn`: the child's RLIMIT_NOFILE raised to its hard limit (which
    `fd_ceiling` raised in this process when it could; children inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def per_process(count: int, minimum: int) -> list[int]:
    """`count` viewers split over viewers.c processes: at least `minimum`, and as many as the
    file limit requires."""
    procs = max(minimum, -(-count // (fd_ceiling() - VIEWER_FDS)))
    return _split(count, procs)


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


#: Who is who among the bench's processes, by command line, for `cpu_by_pid`.
ROLES = (
    ("gateways", "workers.cli gateway"),
    ("ingest", "workers.cli ingest"),
    ("viewers", "bench/.build/viewers"),
    ("bench", "bench.run"),
    ("postgres", "postgres"),
    ("redis", "redis-server"),
)


def cpu_by_pid(scratch: Path) -> dict[int, tuple[str, float]]:
    """Every process on the host: its role (ROLES, for this bench's own processes: its process
    tree, and the embedded servers running in `scratch`, which detach; anything else is
    "other": on this shared host, other people's work) and its CPU seconds so far."""
    me = os.getpid()
    parents: dict[int, int] = {}
    lines: dict[int, str] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            lines[pid] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parents[pid] = int(stat[1])
        used[pid] = (int(stat[11]) + int(stat[12])) / CLK_TCK

    roots = {me} | {pid for pid, cmdline in lines.items() if str(scratch) in cmdline}

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid in roots:
                return True
            pid = parents.get(pid, 0)
        return False

    roles: dict[int, tuple[str, float]] = {}
    for pid, cmdline in lines.items():
        role = next((name for name, marker in ROLES if marker in cmdline), "other")
        roles[pid] = (role if ours(pid) else "other", used[pid])
    return roles


def cpu_shares(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> str:
    """Cores used by each role between two `cpu_by_pid` readings (a process that started in
    between counts from zero; one that ended, not at all)."""
    shares: dict[str, float] = {}
    for pid, (role, used) in after.items():
        earlier = before.get(pid)
        shares[role] = shares.get(role, 0.0) + (used - (earlier[1] if earlier else 0.0)) / seconds
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))


def slab_kib() -> int:
    """The kernel's slab memory (/proc/meminfo): sockets, their files and epoll entries live
    there, outside every process's RSS. Host-wide, so other work on the host moves it too."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
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

    def __init__(self, env: Env, count: int) -> None:
        self.env = env
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.internal: list[int] = []
        #: time.perf_counter() of each SIGTERM sent, in order.
        self.sigterms: list[float] = []
        for _ in range(count):
            proc, internal = self._start()
            self.procs.append(proc)
            self.internal.append(internal)

    def _start(self) -> tuple[subprocess.Popen[bytes], int]:
        internal = free_port(avoid={self.port})  # the replicas' shared port may not be bound yet
        argv = ["workers.cli", "gateway", "--port", str(self.port), "--reuse-port"]
        argv += ["--internal-port", str(internal)]
        proc = self.env.start(argv, self.port, None, ready_port=internal, preexec=nofile_preexec)
        return proc, internal

    def stop(self, i: int) -> None:
        """SIGTERM (the gateway drains its viewers with 4000), then wait for it to exit."""
        proc = self.procs[i]
        self.sigterms.append(time.perf_counter())
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, i: int, surge: bool = False) -> None:
        """Replace replica i: stop it, then start the new one; with `surge`, the other way
        round (three processes share the port for a moment)."""
        if surge:
            fresh = self._start()
            self.stop(i)
        else:
            self.stop(i)
            fresh = self._start()
        self.procs[i], self.internal[i] = fresh

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
    """bench/viewers.c processes, `counts[i]` viewers in process i (one epoll loop each), with
    reconnect-and-resume on. Viewer j of a process watches URL j mod len(urls)."""

    def __init__(
        self, urls: list[str], counts: list[int], sources: int, scratch: Path, tag: str
    ) -> None:
        binary = viewers_binary()
        if binary is None:
            raise RuntimeError("scenario 6 needs bench/viewers.c, and no C compiler was found")
        self.scratch = scratch
        self.tag = tag
        url_file = scratch / f"urls-{tag}.txt"
        url_file.write_text("\n".join(urls) + "\n")
        started = time.perf_counter()
        self.procs: list[subprocess.Popen[bytes]] = []
        for n in counts:
            args = [str(binary), "--count", str(n), "--urls", str(url_file)]
            args += ["--sources", str(sources), "--reconnect", "--deadline", "300"]
            self.procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        ready = [self._read(p) for p in self.procs]
        self.seconds = time.perf_counter() - started
        self.opens = [r["open"] for r in ready]
        self.connect_rate = self.open / self.seconds

    @property
    def open(self) -> int:
        """Viewers open after the connect phase (of the processes still running)."""
        return sum(self.opens)

    def quit_last(self, procs: int) -> None:
        """Stop the last `procs` processes: their viewers' connections close at once."""
        gone = self.procs[-procs:]
        del self.procs[-procs:], self.opens[-procs:]
        self._quit(gone)

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
        self._quit(self.procs)

    @staticmethod
    def _quit(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        for proc in procs:
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


class SitesPoster:
    """One event a second to every site, through ingest (POST /api/events): every 10 ms one
    batch of the next sites in turn (at most ingest's 100 events a batch), so that one round of
    100 ticks reaches every site once. `run` stops at the end of a round: every site then has
    the same head, `rounds`. Raw HTTP/1.1 on keep-alive connections with bodies joined from
    ready-made pieces: an HTTP client library in this process was the limit near 6,600
    events/s."""

    TICK_S = 0.01
    TICKS_PER_ROUND = 100
    BATCH = 100  # SITEWIRE_MAX_BATCH_EVENTS's default
    CONNECTIONS = 32

    def __init__(self, port: int, sites: list[str]) -> None:
        self.port = port
        self.sites = sites
        self.per_tick = -(-len(sites) // self.TICKS_PER_ROUND)
        head = '{{"site":"{0}","name":"pageview","url":"https://{0}/","props":{{"t0":'
        self._heads = {s: head.format(s).encode() for s in sites}
        self.rounds = 0
        self.acked = 0
        self.failed = 0
        #: Microseconds from each batch's send to ingest's answer (PostgreSQL's commit in it).
        self.acks_us: list[int] = []
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._opened = 0

    async def run(self, seconds: float | None, stop: asyncio.Event | None = None) -> None:
        """Whole rounds for `seconds` (or until `stop` is set), then wait for every ack."""
        started = time.perf_counter()
        posts: set[asyncio.Task[None]] = set()
        tick = 0
        while True:
            if tick % self.TICKS_PER_ROUND == 0 and (
                (seconds is not None and time.perf_counter() - started >= seconds)
                or (stop is not None and stop.is_set())
            ):
                break
            first = (tick % self.TICKS_PER_ROUND) * self.per_tick
            due = self.sites[first : first + self.per_tick]
            for i in range(0, len(due), self.BATCH):
                post = asyncio.create_task(self._post(due[i : i + self.BATCH]))
                posts.add(post)
                post.add_done_callback(posts.discard)
            tick += 1
            if tick % self.TICKS_PER_ROUND == 0:
                self.rounds += 1
            await asyncio.sleep(max(0.0, started + tick * self.TICK_S - time.perf_counter()))
        await asyncio.gather(*posts)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._idle.empty() and self._opened < self.CONNECTIONS:
            self._opened += 1
            return await asyncio.open_connection("127.0.0.1", self.port)
        return await self._idle.get()

    async def _post(self, sites: list[str]) -> None:
        reader, writer = await self._connection()
        sent = time.perf_counter_ns()
        t0 = str(time.time_ns()).encode()
        body = b"[" + b",".join(self._heads[s] + t0 + b"}}" for s in sites) + b"]"
        writer.write(
            b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nUser-Agent: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (BROWSER.encode(), len(body), body)
        )
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        answer = await reader.readexactly(length)
        self.acks_us.append((time.perf_counter_ns() - sent) // 1000)
        self._idle.put_nowait((reader, writer))
        # Each stored event's result carries its cursor.
        ok = answer.count(b'"cursor"') if b" 202 " in status else 0
        self.acked += ok
        self.failed += len(sites) - ok

    async def aclose(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait()[1].close()


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


def viewer_counts(sizes: Sizes) -> tuple[int, int]:
    """How many viewers 6a can hold on `replicas` replicas under the file limit, and how many
    of them a rolling restart can move. A stopped replica's viewers spread over the listeners
    left (the others, plus its replacement in the surge order), so the replica restarted last
    has taken a share of every one before it: (1 + 1/listeners)^(replicas - 1) times its own
    share (2x for two replicas stopped first: the survivor holds every viewer)."""
    capacity = replica_capacity()
    count = min(sizes.viewers, capacity * sizes.replicas)
    growth = (1 + 1 / (sizes.replicas - 1 + sizes.surge)) ** (sizes.replicas - 1)
    movable = int(capacity * sizes.replicas / growth)
    return count, min(count, movable)


async def many_viewers(env: Env, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    [site] = await register_sites(env, 1)
    ingest_proc, ingest_port = env.role("ingest", core=None)
    gateways = Replicas(env, sizes.replicas)
    poster = Poster(ingest_port, site)
    viewers: Viewers | None = None
    count, moved = viewer_counts(sizes)
    # The viewers the restart moves are their own processes: the others leave before it.
    counts = per_process(moved, sizes.viewer_procs)
    extra = per_process(count - moved, 1) if count > moved else []
    result: dict[str, Any] = {"count": count, "moved": moved, "fd_ceiling": fd_ceiling()}
    try:
        await asyncio.sleep(1.0)
        rss_before, slab_before = gateways.rss_kib(), slab_kib()
        url = stream_urls(gateways.port, [site])[0]
        viewers = await asyncio.to_thread(
            Viewers, [url], counts + extra, sizes.sources, scratch, "6a"
        )
        result["open"] = viewers.open
        result["connect_s"] = viewers.seconds
        print(f"  6a: {viewers.open} open in {viewers.seconds:.1f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(2.0)
        rss_after, slab_after = gateways.rss_kib(), slab_kib()
        result["kib_per_viewer"] = (rss_after - rss_before) / max(1, viewers.open)
        result["slab_kib_per_viewer"] = (slab_after - slab_before) / max(1, viewers.open)
        spread = [metric(m, "sitewire_gateway_connections") for m in await gateways.metrics()]
        result["spread"] = spread

        # Broadcast: 1 event/s; every viewer must get every one.
        await viewers.acommand("reset")
        roles0, started = cpu_by_pid(scratch), time.perf_counter()
        await poster.every_second(sizes.broadcast_s)
        result["cores"] = cpu_shares(roles0, cpu_by_pid(scratch), time.perf_counter() - started)
        print(f"  6a broadcast cores: {result['cores']}", file=sys.stderr, flush=True)
        await asyncio.sleep(2.0)
        seen = await viewers.status()
        result.update(await viewers.latencies_ms())
        result["delivered"] = seen["events"] / (poster.posted * viewers.open)
        result["broadcast"] = seen
        result["kib_per_viewer_after"] = (gateways.rss_kib() - rss_before) / max(1, viewers.open)
        print(f"  6a broadcast: {json.dumps(seen)}", file=sys.stderr, flush=True)

        if extra:
            viewers.quit_last(len(extra))
            await asyncio.sleep(2.0)
        result["moved_open"] = viewers.open
        result.update(await rolling_restart(gateways, viewers, poster, sizes, scratch))
        return result
    finally:
        if viewers is not None:
            viewers.close()
        await poster.aclose()
        gateways.close()
        env.stop(ingest_proc)


async def rolling_restart(
    gateways: Replicas, viewers: Viewers, poster: Poster, sizes: Sizes, scratch: Path
) -> dict[str, Any]:
    """Replace replica 0 (SIGTERM it, then start a new one on the port; with `surge` the other
    way round), then replica 1, events posted at 1 event/s all along. Returns the seconds from
    the first SIGTERM until every viewer is open again on a new replica, resumed, and has every
    event acknowledged so far."""
    await viewers.acommand("reset")
    stop = asyncio.Event()
    posting = asyncio.create_task(poster.every_second(None, stop))
    roles0 = cpu_by_pid(scratch)
    started = time.perf_counter()
    restarted: dict[str, float] = {}

    def restart_all() -> None:
        for i in range(len(gateways.procs)):
            gateways.restart(i, surge=bool(sizes.surge))
            restarted[f"replica {i} ready s"] = time.perf_counter() - started

    restarting = asyncio.create_task(asyncio.to_thread(restart_all))
    done_s: float | None = None
    status: dict[str, Any] = {}
    limit = 180.0
    trace: list[str] = []
    try:
        while time.perf_counter() - started < limit:
            await asyncio.sleep(0.25)
            acked = poster.acked
            status = await viewers.status()
            trace.append(
                f"{time.perf_counter() - started:.2f}s open={status['open']} "
                f"welcomed={status['welcomed']} min_last={status['min_last']}/{acked}"
            )
            if (
                restarting.done()
                and status["open"] == viewers.open
                and status["welcomed"] == viewers.open
                and status["min_last"] >= acked
            ):
                done_s = time.perf_counter() - gateways.sigterms[0]  # from the first SIGTERM
                break
        await restarting
    finally:
        stop.set()
        await posting
    cores = cpu_shares(roles0, cpu_by_pid(scratch), time.perf_counter() - started)
    print(f"  6a restart cores: {cores}", file=sys.stderr, flush=True)
    await asyncio.sleep(1.5)
    final = await viewers.status()
    sigterms = [round(t - started, 2) for t in gateways.sigterms[-len(gateways.procs) :]]
    print("  6a restart trace:\n    " + "\n    ".join(trace[::4]), file=sys.stderr)
    print(f"  6a restart: {json.dumps(final)} {restarted} SIGTERMs at {sigterms} s",
          file=sys.stderr, flush=True)  # fmt: skip
    exact = (
        final["dups"] == 0
        and final["gaps"] == 0
        and final["unrecovered"] == 0
        and final["recovered"] >= viewers.open
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
    # As many viewers per site as the replicas' file limits allow, up to `per_site`.
    per_site = min(sizes.per_site, replica_capacity() * sizes.replicas // sizes.sites)
    gateways = Replicas(env, sizes.replicas)
    ingest_proc, ingest_port = env.role("ingest", core=None)
    publisher = SitesPoster(ingest_port, sites)
    stable: Viewers | None = None
    churn: Viewers | None = None
    result: dict[str, Any] = {"sites": sizes.sites, "per_site": per_site}
    try:
        await asyncio.sleep(1.0)
        churn = await asyncio.to_thread(
            Viewers, stream_urls(gateways.port, churned),
            per_process(len(churned) * per_site, 1), sizes.sources, scratch, "6b-churn",
        )  # fmt: skip
        stable = await asyncio.to_thread(
            Viewers, stream_urls(gateways.port, steady),
            per_process(len(steady) * per_site, sizes.viewer_procs), sizes.sources, scratch, "6b",
        )  # fmt: skip
        result["open"] = stable.open + churn.open
        pages = await gateways.metrics()
        result["subscribed"] = [metric(m, "sitewire_gateway_subscribed_sites") for m in pages]
        print(f"  6b: {result['open']} open, subscribed {result['subscribed']}", file=sys.stderr)
        await asyncio.sleep(1.0)

        # Steady state: every site at 1 event/s.
        info0, cpu0 = await redis_info(env.redis_url), gateways.cpu_s()
        await stable.acommand("reset")
        await churn.acommand("reset")
        roles0 = cpu_by_pid(scratch)
        started = time.perf_counter()
        await publisher.run(sizes.publish_s)
        seconds = time.perf_counter() - started
        published = publisher.acked
        cpu1 = gateways.cpu_s()
        print(f"  6b posted {publisher.rounds} rounds, {published} acked, {publisher.failed} not,"
              f" in {seconds:.2f} s", file=sys.stderr)  # fmt: skip
        result["cores"] = cpu_shares(roles0, cpu_by_pid(scratch), seconds)
        print(f"  6b cores used: {result['cores']}", file=sys.stderr, flush=True)
        await asyncio.sleep(1.5)
        info1 = await redis_info(env.redis_url)
        seen = [await stable.status(), await churn.status()]
        result.update(await stable.latencies_ms())
        events = sum(s["events"] for s in seen)
        deliveries_expected = published * per_site
        result["published_per_s"] = published / seconds
        result["ack_p50_ms"] = percentile(publisher.acks_us, 0.5)
        result["ack_p99_ms"] = percentile(publisher.acks_us, 0.99)
        result["refused_events"] = publisher.failed
        result["delivered"] = events / deliveries_expected
        result["cpu_us_per_event"] = (cpu1 - cpu0) / published * 1e6
        result["cpu_us_per_delivery"] = (cpu1 - cpu0) / max(1, events) * 1e6
        result["gateway_cpu_share"] = (cpu1 - cpu0) / seconds
        held = publisher.rounds  # events in each site's window now
        grown = info1["used_memory"] - info0["used_memory"]
        result["redis_bytes_per_site"] = grown / sizes.sites
        result["redis_events_per_site"] = held
        result["redis_bytes_per_event"] = grown / published
        print(f"  6b steady: {json.dumps(seen)}", file=sys.stderr, flush=True)

        before = await gateway_counters(gateways)
        result.update(await churn_cycles(env, gateways, publisher, churn, sizes))
        await asyncio.sleep(2.0)
        after = await gateway_counters(gateways)
        result["churn_counters"] = {k: after[k] - before.get(k, 0.0) for k in after}
        print(f"  6b churn counters: {result['churn_counters']}", file=sys.stderr, flush=True)
        final = [await stable.status(), await churn.status()]
        end = publisher.rounds  # every site got one event a round, in whole rounds
        result["final"] = final
        result["exact"] = publisher.failed == 0 and all(
            f["dups"] == 0
            and f["gaps"] == 0
            and f["unrecovered"] == 0
            and f["min_last"] == f["max_last"] == end
            for f in final
        )
        print(f"  6b final (end {end}): {json.dumps(final)}", file=sys.stderr, flush=True)
        return result
    finally:
        for group in (stable, churn):
            if group is not None:
                group.close()
        await publisher.aclose()
        gateways.close()
        env.stop(ingest_proc)


async def gateway_counters(gateways: Replicas) -> dict[str, float]:
    """Counters of every replica added up: replay reads by source, gap notices."""
    names = {
        "window reads": 'sitewire_gateway_replay_reads_total{source="redis"}',
        "PostgreSQL reads": 'sitewire_gateway_replay_reads_total{source="postgres"}',
        "shared reads": 'sitewire_gateway_replay_reads_total{source="shared"}',
        "gap notices": "sitewire_gateway_gap_notices_total",
        "unrecovered gaps": "sitewire_gateway_unrecovered_gaps_total",
        "pub/sub reconnects": "sitewire_gateway_redis_reconnects_total",
    }
    pages = await gateways.metrics()
    return {label: sum(sample(page, name) for page in pages) for label, name in names.items()}


def sample(text: str, name: str) -> float:
    """One sample (name with its labels, exactly) from Prometheus text; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def churn_cycles(
    env: Env, gateways: Replicas, publisher: SitesPoster, churn: Viewers, sizes: Sizes
) -> dict[str, Any]:
    """The churn group's viewers leave (each closes with 1000), the gateways unsubscribe their
    sites once the unsubscribe delay has passed, and the viewers come back resuming from their
    cursors; `churn_cycles` times, every site still at 1 event/s."""
    count = churn.open
    base = sum(metric(m, "sitewire_gateway_subscribed_sites") for m in await gateways.metrics())
    stop = asyncio.Event()
    publishing = asyncio.create_task(publisher.run(None, stop))
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
        stop.set()  # the poster ends its round: every site keeps the same head
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


def sizes_for(quick: bool) -> Sizes:
    """FULL or QUICK, with fields overridden by SITEWIRE_BENCH_SCALE ("viewers=20000,sites=2000":
    to find where a limit is, or to try a change at a smaller scale)."""
    sizes = QUICK if quick else FULL
    spec = os.environ.get("SITEWIRE_BENCH_SCALE", "")
    changes: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        kind = type(getattr(sizes, name))
        changes[name] = kind(value)
    return dataclasses.replace(sizes, **changes)


async def scale_rows(env: Env, quick: bool, scratch: Path, parts: set[str]) -> list[Row]:
    """The rows of 6a and 6b (`parts`: "a", "b" or both)."""
    sizes = sizes_for(quick)
    rows: list[Row] = []
    if "a" in parts:
        rows += _viewers_rows(await many_viewers(env, sizes, scratch), sizes)
    if "b" in parts:
        rows += _sites_rows(await many_sites(env, sizes, scratch), sizes)
    return rows


def _viewers_rows(a: dict[str, Any], sizes: Sizes) -> list[Row]:
    goal = f"{sizes.viewers:,}"
    r = sizes.replicas
    moved = f"{a['moved_open']:,}"
    storm = a["storm"]
    rows = [
        Row("6a viewers", f"viewers open ({r} gateways, one port)", a["open"],
            target=f">= {goal}", met=a["open"] >= sizes.viewers),
        # Below the goal when the file limit caps each replica (docs/performance.md).
        Row("6a viewers", "files per process (hard RLIMIT_NOFILE)", a["fd_ceiling"]),
        Row("6a viewers", "seconds to connect them", a["connect_s"]),
        Row("6a viewers", f"gateway KiB per viewer (RSS, {r} replicas)", a["kib_per_viewer"],
            target="<= 6", met=a["kib_per_viewer"] <= 6),
        Row("6a viewers", "same, after the broadcast", a["kib_per_viewer_after"]),
        Row("6a viewers", "kernel slab KiB per viewer (both ends, host-wide)",
            a["slab_kib_per_viewer"]),
        Row("6a broadcast 1 ev/s", "p99 ms (from t0, through ingest)", a["p99_ms"],
            target="<= 1000", met=a["p99_ms"] <= 1000),
        Row("6a broadcast 1 ev/s", "p50 ms", a["p50_ms"]),
        Row("6a broadcast 1 ev/s", "delivered (every viewer, every event)", a["delivered"],
            target="1.00", met=a["delivered"] == 1.0 and a["broadcast"]["gaps"] == 0),
        Row("6a rolling restart", f"seconds until all {moved} resumed and caught up",
            a["storm_s"], target=f"<= 30 ({goal})",
            met=a["storm_s"] <= 30 and a["storm_exact"] and a["moved_open"] >= sizes.viewers),
        Row("6a rolling restart", "every viewer exact (no dup, no gap, recovered)",
            float(a["storm_exact"]), target="1.00", met=a["storm_exact"]),
        Row("6a rolling restart", "reconnects scheduled (closes and failed attempts)",
            storm["retries"]),
        Row("6a rolling restart", "of which refused by a draining replica", storm["refused"]),
        Row("6a rolling restart", "attempts whose TCP connect failed", storm["connect_failed"]),
        Row("6a rolling restart", "attempts lost before their 101", storm["handshake_lost"]),
        Row("6a rolling restart", "attempts that timed out (10 s)", storm["open_timeouts"]),
    ]  # fmt: skip
    return rows


def _sites_rows(b: dict[str, Any], sizes: Sizes) -> list[Row]:
    s = f"{sizes.sites:,}"
    churned = f"{sizes.churn_sites:,}"
    return [
        Row(f"6b {s} sites", f"viewers open ({b['per_site']} per site)", b["open"],
            target=f">= {sizes.site_viewers:,}", met=b["open"] >= sizes.site_viewers),
        Row(f"6b {s} sites", "events/s published (1 per site)", b["published_per_s"]),
        Row(f"6b {s} sites", "delivered (events received / published x viewers)",
            b["delivered"]),
        Row(f"6b {s} sites", "p99 ms (from t0, through ingest)", b["p99_ms"]),
        Row(f"6b {s} sites", "p50 ms", b["p50_ms"]),
        Row(f"6b {s} sites", "ingest ack p50 ms (batch sent to 202)", b["ack_p50_ms"]),
        Row(f"6b {s} sites", "ingest ack p99 ms", b["ack_p99_ms"]),
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
