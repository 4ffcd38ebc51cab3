"""Exactly once under partial failure (issue #15): each scenario breaks one thing while events
are posted steadily and viewers watch, then checks that every acknowledged event was stored
once and reached every viewer once, in order, and prints its figures (tests/chaos/harness.py).

Durations: quick by default (`make test`), full with SITEWIRE_CHAOS=full (`make chaos`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal

import pytest

from app.settings import Settings
from tests.chaos.harness import (
    AllowedFailure,
    Cluster,
    Pace,
    Post,
    Scenario,
    assert_exactly_once,
    no_failure,
    pace_from_env,
    register_site,
    run_resume_race,
    run_steady,
    site_epoch,
)
from tests.chaos.proxy import PausableProxy
from tests.chaos.report import record
from tests.disposable import DisposablePostgres
from tests.support import FAST, env_for
from workers.embedded import EmbeddedRedis

PACE = pace_from_env()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(PACE.test_timeout_s),
    pytest.mark.parametrize("pace", [PACE], ids=[PACE.name]),
]

#: Where the issue's target for viewer lag is checked: a gateway cut off from Redis.
MAX_SILENCE_S = 5.0


async def start_scenario(
    name: str,
    pace: Pace,
    cluster: Cluster,
    settings: Settings,
    site: str,
    *,
    gateway1: Settings | None = None,
    allowed_failure: AllowedFailure = no_failure,
) -> Scenario:
    """2 ingests and 2 gateways on `settings` (gateway 1 on `gateway1` when given)."""
    env = env_for(settings, **FAST)
    first = env_for(gateway1, **FAST) if gateway1 is not None else env
    await asyncio.gather(
        cluster.start("ingest", [env, env]), cluster.start("gateway", [first, env])
    )
    assert settings.database_url is not None
    epoch = await site_epoch(settings.database_url, site)
    return Scenario(name, site, epoch, settings.database_url, cluster, pace, allowed_failure)


async def killed_for(cluster: Cluster, role: str, seconds: float) -> None:
    """SIGKILL the first process of `role`, and start it again on its port `seconds` later."""
    cluster.kill(role, 0)
    await asyncio.sleep(seconds)  # the fault's length: down this long, on purpose
    await cluster.restart(role, 0)


async def test_gateway_sigkill(pace: Pace, cluster: Cluster, settings: Settings, site: str) -> None:
    scn = await start_scenario("a. gateway SIGKILL", pace, cluster, settings, site)

    result = await run_steady(scn, lambda: killed_for(cluster, "gateway", pace.restart_delay_s))
    record(result)
    assert_exactly_once(result)


async def test_rolling_sigterm(pace: Pace, cluster: Cluster, settings: Settings, site: str) -> None:
    scn = await start_scenario("b. rolling SIGTERM", pace, cluster, settings, site)
    exits: list[int] = []

    async def fault() -> None:
        for i in (0, 1):
            exits.append(await cluster.terminate("gateway", i))
            await cluster.restart("gateway", i)
            if i == 0:
                await asyncio.sleep(pace.settle_s)  # the rollout's pace, on purpose

    result = await run_steady(scn, fault)
    result.notes.append(f"exit codes {exits}")
    record(result)
    assert_exactly_once(result)
    assert exits == [0, 0], "a gateway did not drain cleanly on SIGTERM"


async def test_redis_sigkill_restarted_empty(
    pace: Pace, cluster: Cluster, settings: Settings, site: str, chaos_redis: EmbeddedRedis
) -> None:
    private = settings.with_(redis_url=chaos_redis.url)
    scn = await start_scenario("c. Redis SIGKILL, restarted empty", pace, cluster, private, site)

    async def fault() -> None:
        os.kill(chaos_redis.pid, signal.SIGKILL)
        # stop() reaps the killed process (no zombie, no ResourceWarning) before the restart.
        await asyncio.to_thread(chaos_redis.stop)
        await asyncio.sleep(pace.restart_delay_s)  # the fault's length, on purpose
        await asyncio.to_thread(chaos_redis.start)

    result = await run_steady(scn, fault)
    record(result)
    assert_exactly_once(result)


async def test_redis_sigstop(
    pace: Pace, cluster: Cluster, settings: Settings, site: str, chaos_redis: EmbeddedRedis
) -> None:
    private = settings.with_(redis_url=chaos_redis.url)
    scn = await start_scenario("d. Redis SIGSTOP", pace, cluster, private, site)

    async def fault() -> None:
        os.kill(chaos_redis.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(pace.fault_s)  # the fault's length, on purpose
        finally:
            os.kill(chaos_redis.pid, signal.SIGCONT)

    result = await run_steady(scn, fault)
    record(result)
    assert_exactly_once(result)
    # Ingest acknowledges on commit; a hung Redis must not hold acknowledgements up. A floor
    # of 50 ms over the quiet p99, because this machine is noisy.
    quiet, hung = result.quiet.p99_ms, result.fault.p99_ms
    assert quiet is not None and hung is not None, (result.quiet, result.fault)
    bound = max(2 * quiet, quiet + 50)
    assert hung <= bound, f"ack p99 {hung:.1f} ms while Redis hung, quiet {quiet:.1f} ms"


async def test_gateway_cut_off_from_redis(
    pace: Pace,
    cluster: Cluster,
    settings: Settings,
    site: str,
    chaos_redis: EmbeddedRedis,
    redis_proxy: PausableProxy,
) -> None:
    private = settings.with_(redis_url=chaos_redis.url)
    cut = private.with_(redis_url=redis_proxy.url)  # only gateway 1 goes through the proxy
    scn = await start_scenario(
        "e. gateway 1 cut off from Redis", pace, cluster, private, site, gateway1=cut
    )

    async def fault() -> None:
        redis_proxy.pause()
        try:
            await asyncio.sleep(pace.fault_s)  # the fault's length, on purpose
        finally:
            redis_proxy.resume()

    result = await run_steady(scn, fault)
    record(result)
    assert_exactly_once(result)
    if pace.full:  # a quick cut is shorter than the target itself
        silence = result.longest_silence_s
        assert silence is not None and silence <= MAX_SILENCE_S, (
            f"a viewer went {silence:.2f} s without events{result.silence_where}"
        )


async def test_postgres_stopped(
    pace: Pace, cluster: Cluster, settings: Settings, private_postgres: DisposablePostgres
) -> None:
    site = f"c{secrets.token_hex(4)}.example.com"
    await register_site(private_postgres.dsn, site)
    private = settings.with_(database_url=private_postgres.dsn)

    def storage_unavailable(post: Post) -> bool:
        return post.status == 503  # anything else (500, a dropped request) is a bug

    scn = await start_scenario(
        "f. PostgreSQL stopped",
        pace,
        cluster,
        private,
        site,
        allowed_failure=storage_unavailable,
    )

    async def fault() -> None:
        await asyncio.to_thread(private_postgres.stop)
        try:
            await asyncio.sleep(pace.fault_s)  # the fault's length, on purpose
        finally:
            await asyncio.to_thread(private_postgres.start)

    result = await run_steady(scn, fault)
    record(result)
    assert_exactly_once(result)


async def test_ingest_sigkill(pace: Pace, cluster: Cluster, settings: Settings, site: str) -> None:
    def to_the_killed_ingest(post: Post) -> bool:
        return post.ingest == 0

    scn = await start_scenario(
        "g. ingest SIGKILL", pace, cluster, settings, site, allowed_failure=to_the_killed_ingest
    )

    result = await run_steady(scn, lambda: killed_for(cluster, "ingest", pace.restart_delay_s))
    record(result)
    assert_exactly_once(result)


async def test_immediate_resume_race(
    pace: Pace, cluster: Cluster, settings: Settings, site: str
) -> None:
    scn = await start_scenario("h. resume right after the ack", pace, cluster, settings, site)
    result, wrong = await run_resume_race(scn, pace.resumes)
    record(result)
    assert_exactly_once(result)
    assert not wrong, f"{len(wrong)} of {pace.resumes} resumes wrong: {wrong[:5]}"
