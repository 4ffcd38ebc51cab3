"""A smoke run of `make bench` (bench/run.py --quick): every scenario runs end to end."""

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.processes import ROOT, AppProcess
from tests.support import BROWSER, FAST, eventually, token, unavailable

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_quick_bench_runs_every_scenario(tmp_path: Path, database_url: str) -> None:
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    for scenario in ("0 host", "0 loadgen self-check", "1 end-to-end", "2a fanout 1 site",
                     "2b fanout 100 sites", "3 idle", "4 ingest single", "4 ingest batch 50",
                     "5 resume storm"):  # fmt: skip
        assert f"| {scenario} |" in table
    rows = {tuple(line.split(" | ")[:2]): line for line in table.splitlines()}
    for ingest in ("| 4 ingest single", "| 4 ingest batch 50"):
        assert "| 1.00 |" in rows[(ingest, "acked == stored")]  # durable ack held under load
    assert ("| 2 fanout 1 site", "host write µs just before (mean, as 0 host)") in rows
    # PostgreSQL is on this host in CI, so its backend's CPU can be read.
    assert ("| 4 ingest batch 50", "PostgreSQL alone: events/s per core (commits of 400)") in rows
    exact = rows[("| 5 resume storm", "every viewer exact (events == viewers x behind)")]
    assert "| 1.00 |" in exact  # the reconnect storm replayed every event, once
    # The storm's pages came from PostgreSQL, read through the gateway's metrics (on its
    # private port): a zero here once meant the bench read /metrics where it no longer is.
    reads = rows[("| 5 resume storm", "PostgreSQL page reads")].split(" | ")[2]
    assert float(reads.replace(",", "")) > 0
    assert (tmp_path / "bench.json").exists()


async def test_c_viewers_count_events_measure_latency_and_answer_pings(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """bench/viewers.c against a real gateway that pings every 0.2 s and closes a viewer whose
    pong is 0.5 s late: every event is counted once per viewer, each frame's t0 gives a
    latency, and no viewer is closed (its pongs arrive)."""
    from bench.harness import LoadGen, viewers_binary

    if viewers_binary() is None:
        unavailable("no C compiler to build bench/viewers.c")
    ingest = spawn("ingest", **FAST)
    gateway = spawn(
        "gateway", **FAST, SITEWIRE_PING_INTERVAL_S="0.2", SITEWIRE_PING_TIMEOUT_S="0.5"
    )
    url = f"{gateway.ws_url}/v1/sites/{site}/stream?token={token(site)}"
    load = await asyncio.to_thread(LoadGen, [url], 5, "c")
    try:
        assert load.ready["open"] == 5
        load.command("reset")
        async with httpx.AsyncClient(timeout=10, headers={"User-Agent": BROWSER}) as client:
            for i in range(30):
                body = {"site": site, "name": "pageview", "url": f"https://{site}/{i}",
                        "props": {"t0": time.time_ns()}}  # fmt: skip
                r = await client.post(f"{ingest.url}/api/event", json=body)
                assert r.status_code == 202
        await eventually(lambda: load.command("report")["events"] >= 150, 10, 0.05, "150 events")
        await asyncio.sleep(1.5)  # on purpose: several ping rounds, and no viewer is closed
        stats = load.command("report")
        assert stats["events"] == 150 and stats["closed"] == 0, stats
        assert stats["p50_ms"] > 0 and stats["max_ms"] >= stats["p99_ms"] >= stats["p50_ms"]
    finally:
        load.close()


async def test_c_viewers_resume_exactly_after_a_drain_and_after_leaving(
    spawn: Callable[..., AppProcess], site: str, tmp_path: Path
) -> None:
    """bench/viewers.c with --reconnect, as bench/scale.py runs it (two loopback source
    addresses): a gateway that stops drains its viewers with 4000; they retry (refused while
    no gateway listens) until a new one is up on the same port, and resume from their cursors.
    "leave" and "back" do the same at the viewers' own initiative. Every event arrives once,
    in order, and every resume says `recovered`."""
    from bench.harness import viewers_binary
    from bench.scale import Viewers

    if viewers_binary() is None:
        unavailable("no C compiler to build bench/viewers.c")
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    url = f"{gateway.ws_url}/v1/sites/{site}/stream?token={token(site)}"
    viewers = await asyncio.to_thread(Viewers, [url], [6], 2, tmp_path, "test")
    again: AppProcess | None = None

    async def post(count: int) -> None:
        async with httpx.AsyncClient(timeout=10, headers={"User-Agent": BROWSER}) as client:
            for i in range(count):
                body = {"site": site, "name": "pageview", "url": f"https://{site}/{i}",
                        "props": {"t0": time.time_ns()}}  # fmt: skip
                assert (await client.post(f"{ingest.url}/api/event", json=body)).status_code == 202

    async def left(count: int) -> bool:
        return bool((await viewers.status())["left"] == count)

    async def caught_up(last: int) -> bool:
        status = await viewers.status()
        return status["open"] == status["welcomed"] == 6 and status["min_last"] == last

    try:
        assert viewers.open == 6
        await post(5)
        await eventually(lambda: caught_up(5), 10, 0.05, "the first 5 events")
        await asyncio.to_thread(gateway.stop)  # drains: every viewer gets 4000
        await post(5)  # while no gateway listens: the viewers' retries are refused
        again = await asyncio.to_thread(gateway.restarted)
        await post(5)
        await eventually(lambda: caught_up(15), 30, 0.1, "resumed after the restart")
        status = await viewers.status()
        assert status["drops"] >= 6 and status["recovered"] == 6, status
        assert status["dups"] == status["gaps"] == status["unrecovered"] == 0, status
        assert status["closed"] == 0, status

        assert (await viewers.acommand("leave"))[0]["leaving"] == 6
        await eventually(lambda: left(6), 10, 0.05, "all six left")
        await post(5)
        assert (await viewers.acommand("back"))[0]["back"] == 6
        await eventually(lambda: caught_up(20), 10, 0.05, "back and caught up")
        status = await viewers.status()
        assert status["recovered"] == 12 and status["events"] == 6 * 20, status
        assert status["dups"] == status["gaps"] == status["unrecovered"] == 0, status
    finally:
        viewers.close()
        if again is not None:
            again.stop()


@pytest.mark.timeout(120)
async def test_the_c_poster_counts_only_accepted_requests(
    spawn: Callable[..., AppProcess], site: str, database_url: str, tmp_path: Path
) -> None:
    """bench/poster.c against a real ingest: a good event is counted as many times as it was
    stored, a refused one (400) never; single events and batches. Each event's marker id is
    replaced by a new one in every request, so none is a retry of another."""
    import json

    import asyncpg

    from bench.harness import c_program
    from bench.loadgen import MARKER_ID

    poster = c_program("poster")
    if poster is None:
        unavailable("no C compiler to build bench/poster.c")
    ingest = spawn("ingest", **FAST)  # FAST: no rate limits
    good = {"site": site, "name": "pageview", "url": f"https://{site}/", "id": MARKER_ID.decode()}
    counted = []
    for path, body in (
        ("/api/event", good),
        ("/api/events", [good, good]),
        ("/api/event", {"site": site}),  # refused: no name, no url
    ):
        body_file = tmp_path / "body.json"
        body_file.write_text(json.dumps(body))
        args = [str(poster), "--port", str(ingest.port), "--body-file", str(body_file)]
        args += ["--path", path, "--duration", "0.5", "--connections", "4"]
        done = await asyncio.to_thread(subprocess.run, args, capture_output=True, check=True)
        counted.append(json.loads(done.stdout))
    single, batch, refused = counted
    assert single["requests_ok"] == single["requests"] > 0
    assert batch["requests_ok"] == batch["requests"] > 0
    assert refused["requests_ok"] == 0 < refused["requests"]
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM events WHERE site = $1", site)
    finally:
        await conn.close()
    assert stored == single["requests_ok"] + 2 * batch["requests_ok"]


def test_the_python_poster_gives_each_marker_a_fresh_id() -> None:
    import uuid

    from bench.loadgen import MARKER_ID, fresh_ids

    request = b"[" + b",".join(b'{"id":"%s"}' % MARKER_ID for _ in range(3)) + b"]"
    first, second = fresh_ids(request), fresh_ids(request)
    assert len(first) == len(request) and MARKER_ID not in first
    ids = [uuid.UUID(part.split(b'"')[0].decode()) for part in first.split(b'"id":"')[1:]]
    assert len(set(ids)) == 3 and all(i.version == 4 for i in ids)
    assert first != second
