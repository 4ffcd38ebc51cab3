"""What many test modules share that is neither a fixture nor a client: waiting on a condition
with a deadline, the settings and tokens processes under test run with, Prometheus samples read
from /metrics, and what to do when the machine lacks a tool a test needs.

Test modules import from here (or tests/clients.py, tests/processes.py), never from each other.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

import asyncpg
import httpx
import pytest

from app import tokens
from app.settings import Settings
from app.store.sites import get_site

if TYPE_CHECKING:  # imported where used: conftest imports this module for every test
    from app.schema import NewEvent

T = TypeVar("T")

# Waiting


@overload
async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = ..., interval: float = ..., what: str = ...
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T], timeout: float = ..., interval: float = ..., what: str = ...
) -> T: ...


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Wait until `check()` (a function or a coroutine function) returns a true value, and
    return that value. `timeout` is a deadline for a loaded machine, not a speed check: a
    test never sleeps for a fixed time to wait for something to happen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(
                f"not true within {timeout} s: {what or _describe(check)} (last {value!r})"
            )
        await asyncio.sleep(interval)


def _describe(check: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(check).strip()
    except (OSError, TypeError):
        return repr(check)


# Environment: a missing tool is a skip on a laptop, a failure in CI


def in_ci() -> bool:
    """CI sets CI=true (.ci/run does too): there every test must run."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(why: str, *, module: bool = False) -> NoReturn:
    """This machine lacks something a test needs: skip, saying why; under CI, fail instead,
    since .ci/run is expected to provide it (a silent skip there hides a test for good)."""
    if in_ci():
        pytest.fail(f"{why}; CI must provide it (.ci/run installs it)", pytrace=False)
    pytest.skip(why, allow_module_level=module)


# What processes under test run with

SECRET = "test-secret-" + "x" * 32
#: No rate limits, and a short linger before a site with no viewers left is unsubscribed.
FAST = {
    "SITEWIRE_RATE_SITE_PER_SEC": "0",
    "SITEWIRE_RATE_IP_PER_MIN": "0",
    "SITEWIRE_UNSUBSCRIBE_DELAY_S": "0.3",
}
#: A browser's User-Agent: ingest drops events from bots and scripts.
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0"


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a process needs to run with `settings`."""
    env = {
        "DATABASE_URL": settings.database_url or "",
        "REDIS_URL": settings.redis_url or "",
        "SITEWIRE_KEY_PREFIX": settings.key_prefix,
        "SITEWIRE_SECRET": settings.secret or "",
        "SITEWIRE_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


def token(site: str, ttl: int = 600) -> str:
    """A viewer token for `site`, signed with the SECRET test processes run with."""
    return tokens.issue(SECRET, site, ttl)


def event(site: str, **extra: Any) -> dict[str, Any]:
    """A pageview as POST /api/event takes it."""
    return {"site": site, "name": "pageview", "url": f"https://{site}/pricing", **extra}


def new(
    site: str, event_id: uuid.UUID | None = None, n: int = 0, ts: datetime | None = None
) -> NewEvent:
    """An event ready for app.store.writes.commit (what ingest builds from a request), received
    now unless `ts` says when."""
    from app.schema import NewEvent

    return NewEvent(
        site=site, event_id=event_id or uuid.uuid4(), name="pageview",
        url=f"https://{site}/p/{n}", path=f"/p/{n}", referrer=None, referrer_host=None,
        props={"n": n}, visitor_id=7, device="desktop", browser="Firefox", os="Linux",
        country="NL", ts=ts or datetime.now(UTC),
        minted=event_id is None,
    )  # fmt: skip


async def cover(pool: asyncpg.Pool, since: datetime, until: datetime) -> None:
    """Partitions of `events` and `event_ids` for since..until, for a test that writes rows
    into the past (ingest makes them on demand; a raw INSERT does not)."""
    from app.store import partitions

    for table in partitions.PARTITIONED:
        await partitions.create(pool, table, since, until)


async def epoch_of(pool: asyncpg.Pool, site: str) -> str:
    found = await get_site(pool, site)
    assert found is not None
    return found.epoch


# Metrics, read as Prometheus scrapes them


def sample(text: str, name: str) -> float:
    """The value of the sample `name` (with its labels, as exposed) in a /metrics text; 0 when
    it is not there (a labelled counter appears once first incremented)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def metric(url: str, name: str) -> float:
    """One sample from the /metrics of the internal listener at `url`."""
    async with httpx.AsyncClient() as client:
        return sample((await client.get(f"{url}/metrics")).text, name)


async def wait_metric(url: str, name: str, value: float, timeout: float = 5.0) -> None:
    """Until the sample equals `value` (a deadline, not a speed check)."""

    async def reached() -> bool:
        return await metric(url, name) == value

    await eventually(reached, timeout, 0.05, f"{name} == {value}")


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
