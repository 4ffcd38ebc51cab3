"""The broker contract (app.broker.base), held against every implementation: the Redis broker
on the session's real Redis, and the in-process MemoryBroker. A new broker joins `BROKERS`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from app.broker.base import Broker, Burst, Subscriptions
from app.broker.memory import MemoryBroker
from app.broker.redis import RedisBroker
from app.names import Names
from app.servers.redis import RedisShards
from app.wire import went_back_message
from workers.embedded import EmbeddedRedis

WINDOW = 50
BROKERS = ["redis", "memory"]


@dataclass
class Harness:
    broker: Broker
    #: Cuts the gateway's link and lets it come back (Redis: the server kills the pub/sub
    #: connections; memory: cut and restore).
    outage: Callable[[], Awaitable[None]]


@dataclass
class Seen:
    bursts: list[Burst] = field(default_factory=list)
    reconnected: list[list[str]] = field(default_factory=list)

    def on_burst(self, burst: Burst) -> None:
        self.bursts.append(burst)

    async def on_reconnect(self, sites: list[str]) -> None:
        self.reconnected.append(sites)

    def payloads(self, site: str) -> list[bytes]:
        return [p for burst in self.bursts for p in burst.get(site, [])]

    async def until(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)


@pytest.fixture(params=BROKERS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        memory = MemoryBroker(WINDOW)

        async def cut_and_restore() -> None:
            memory.cut()
            memory.restore()

        yield Harness(memory, cut_and_restore)
        return
    # A private server: the outage kills every pub/sub connection on it.
    private_redis: EmbeddedRedis = request.getfixturevalue("private_redis")
    shards = RedisShards((private_redis.url,))
    admin = aioredis.Redis.from_url(private_redis.url)
    names = Names(f"contract-{uuid.uuid4().hex[:8]}")

    async def kill_pubsub() -> None:
        await admin.client_kill_filter(_type="pubsub")

    yield Harness(RedisBroker(shards, names, WINDOW), kill_pubsub)
    await admin.aclose()
    await shards.aclose()


@pytest.fixture
async def live(harness: Harness) -> AsyncIterator[tuple[Subscriptions, Seen]]:
    seen = Seen()
    subs = harness.broker.subscriptions(seen.on_burst, seen.on_reconnect, lambda: None)
    subs.start()
    yield subs, seen
    await subs.close()


def site() -> str:
    return f"{uuid.uuid4().hex[:12]}.example"


def events(site: str, offsets: range) -> list[tuple[str, int, bytes]]:
    return [(site, n, b'{"offset":%d}' % n) for n in offsets]


async def test_published_events_reach_subscribers_in_order(
    harness: Harness, live: tuple[Subscriptions, Seen]
) -> None:
    subs, seen = live
    a, b, other = site(), site(), site()
    await subs.subscribe(a)
    await subs.subscribe(b)
    assert subs.holds(a) and subs.holds(b) and not subs.holds(other)
    assert set(subs.sites) == {a, b}
    mixed = [
        e
        for pair in zip(events(a, range(1, 21)), events(b, range(1, 21)), strict=True)
        for e in pair
    ]
    result = await harness.broker.publish(mixed + events(other, range(1, 4)))
    assert result.published == 43 and result.lost == 0
    await seen.until(lambda: len(seen.payloads(a)) == 20 and len(seen.payloads(b)) == 20)
    assert seen.payloads(a) == [p for _, _, p in events(a, range(1, 21))]
    assert seen.payloads(b) == [p for _, _, p in events(b, range(1, 21))]
    assert seen.payloads(other) == []  # never subscribed: never handed over


async def test_unsubscribe_stops_delivery(
    harness: Harness, live: tuple[Subscriptions, Seen]
) -> None:
    subs, seen = live
    a, b = site(), site()
    await subs.subscribe(a)
    await subs.subscribe(b)
    await subs.unsubscribe(a)
    assert not subs.holds(a) and subs.sites == [b]
    await harness.broker.publish(events(a, range(1, 3)) + events(b, range(1, 3)))
    await seen.until(lambda: len(seen.payloads(b)) == 2)
    assert seen.payloads(a) == []


async def test_the_window_is_complete_or_nothing(harness: Harness) -> None:
    broker, s = harness.broker, site()
    assert await broker.window(s, 1, 1) is None  # nothing published yet
    await broker.publish(events(s, range(1, WINDOW + 11)))  # 10 more than the window keeps
    kept = await broker.window(s, 11, WINDOW + 10)
    assert kept is not None and [o for o, _ in kept] == list(range(11, WINDOW + 11))
    assert kept[0][1] == b'{"offset":11}'
    assert await broker.window(s, 10, 12) is None  # 10 fell out: never a partial answer
    assert await broker.window(s, WINDOW + 10, WINDOW + 11) is None  # 61 does not exist
    assert await broker.window(s, 5, 4) == []


async def test_publication_is_idempotent(harness: Harness) -> None:
    broker, s = harness.broker, site()
    await broker.publish(events(s, range(1, 4)))
    await broker.publish(events(s, range(2, 4)))  # a retried publication
    window = await broker.window(s, 1, 3)
    assert window is not None and [o for o, _ in window] == [1, 2, 3]


async def test_an_offset_published_again_with_other_events_is_never_served_twice(
    harness: Harness,
) -> None:
    """Storage restored to an earlier point hands out offsets again: the window may hold two
    events at one offset then, and must not serve both (nor a range that skips one)."""
    broker, s = harness.broker, site()
    await broker.publish(events(s, range(1, 4)))
    await broker.publish([(s, 3, b'{"offset":3,"again":1}')])
    for first, last in ((1, 3), (1, 4), (2, 3), (2, 4), (3, 4)):
        window = await broker.window(s, first, last)
        assert window is None or [o for o, _ in window] == list(range(first, last + 1))


async def test_offsets_published_again_with_other_events_replace_the_history(
    harness: Harness, live: tuple[Subscriptions, Seen]
) -> None:
    """Storage went back to offset 3: the events published now at 4 and 5 are storage's. The
    history goes (none of it can be told apart), subscribers are told ahead of the new events,
    and the marker says which offsets changed (after 3, through 6: the newest it had)."""
    subs, seen = live
    broker, s, other = harness.broker, site(), site()
    await subs.subscribe(s)
    await broker.publish(events(s, range(1, 7)) + events(other, range(1, 3)))
    again = await broker.publish(events(s, range(5, 7)) + events(other, range(2, 3)))
    assert again.reused == ()  # the same events published again: nothing reused
    assert await broker.went_back(s) is None
    new = [(s, 4, b'{"offset":4,"new":1}'), (s, 5, b'{"offset":5,"new":1}')]
    result = await broker.publish(new + events(other, range(3, 4)))
    assert result.reused == (s,) and result.published == 3
    assert await broker.went_back(s) == (3, 6)
    assert await broker.window(s, 1, 3) is None  # gone with the rest
    window = await broker.window(s, 4, 5)
    assert window is not None and [p for _, p in window] == [p for _, _, p in new]
    kept = await broker.window(other, 1, 3)
    assert kept is not None and [o for o, _ in kept] == [1, 2, 3]
    await seen.until(lambda: len(seen.payloads(s)) == 11)
    assert seen.payloads(s)[8:] == [went_back_message(3, 6), *(p for _, _, p in new)]


async def test_forget_removes_the_history_beyond_an_offset(harness: Harness) -> None:
    broker, s = harness.broker, site()
    await broker.publish(events(s, range(1, 11)))
    assert await broker.forget(s, 6)
    kept = await broker.window(s, 1, 6)
    assert kept is not None and [o for o, _ in kept] == list(range(1, 7))
    assert await broker.window(s, 6, 7) is None  # 7 is gone
    await broker.publish([(s, 7, b'{"offset":7,"new":1}'), (s, 8, b'{"offset":8,"new":1}')])
    window = await broker.window(s, 6, 8)
    assert window is not None
    assert [p for _, p in window][1:] == [b'{"offset":7,"new":1}', b'{"offset":8,"new":1}']
    assert await broker.forget(site(), 0)  # a site without history: nothing to do


async def test_after_an_outage_the_held_sites_are_reported_and_delivery_resumes(
    harness: Harness, live: tuple[Subscriptions, Seen]
) -> None:
    subs, seen = live
    a = site()
    await subs.subscribe(a)
    await harness.outage()
    await seen.until(lambda: [a] in seen.reconnected)
    assert subs.holds(a)
    await harness.broker.publish(events(a, range(1, 3)))
    await seen.until(lambda: len(seen.payloads(a)) == 2)


async def test_probe(harness: Harness) -> None:
    assert await harness.broker.probe() == "ok"
