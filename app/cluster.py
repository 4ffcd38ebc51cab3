"""Redis Cluster: the gateway's sharded subscriptions (SSUBSCRIBE), following slot moves.

With `REDIS_CLUSTER=true` ingest publishes with SPUBLISH (app/broker.py), which delivers a
message only within the shard that owns the channel's hash slot; classic PUBLISH would be
broadcast over the cluster bus to every node. A shard channel can only be subscribed on the node
that owns its slot, so a gateway holds one pub/sub connection per node it needs (`NodeLink`),
opened on first use and closed when its last channel leaves.

A channel leaves its link in two unplanned ways: Redis sends an unrequested SUNSUBSCRIBE when the
slot migrates to another node, and the connection fails when the node restarts or fails over.
Either way the channel is *lost*: `ShardedSubscriber` refreshes the slot map, subscribes it on
the slot's current owner (retrying with backoff while the cluster is unavailable), then reports
the sites to `on_reconnect`, and the gateway repairs whatever was published meanwhile from the
replay window or PostgreSQL, as after any pub/sub reconnect (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.broker import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    HEALTH_CHECK_S,
    REDIS_ERRORS,
    Burst,
    Subscriber,
)
from app.names import Names
from app.shards import RedisShards

log = logging.getLogger(__name__)

#: A subscription refused because the slot lives elsewhere: refresh the map and try again.
SUBSCRIBE_ATTEMPTS = 3


class NodeLink:
    """One pub/sub connection to one cluster node, carrying the shard channels it owns."""

    def __init__(
        self,
        host: str,
        port: int,
        on_message: Callable[[str, bytes], None],
        on_lost: Callable[[NodeLink, list[str]], None],
    ) -> None:
        self.name = f"{host}:{port}"
        self.channels: set[str] = set()
        self._on_message = on_message
        self._on_lost = on_lost
        # redis-py's retries are off: a silent reconnect would hide a gap (as in broker.py).
        self._client = aioredis.Redis(
            host=host,
            port=port,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2.0,
            socket_keepalive=True,
        )
        self._pubsub = self._client.pubsub()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._leaving: set[str] = set()  # channels whose SUNSUBSCRIBE we asked for
        self._commands = asyncio.Lock()  # one command at a time on the one connection
        self._task: asyncio.Task[None] | None = None
        self.dead = False

    async def add(self, channel: str, confirm_within: float) -> None:
        """SSUBSCRIBE and wait for the node to confirm (raises MovedError if it does not own
        the slot any more)."""
        if channel in self.channels:  # already here, or on its way: wait for that one
            pending = self._confirm.get(channel)
            if pending is not None:
                async with asyncio.timeout(confirm_within):
                    await asyncio.shield(pending)
            return
        future = asyncio.get_running_loop().create_future()
        self._confirm[channel] = future
        self.channels.add(channel)
        try:
            async with self._commands:
                await self._pubsub.ssubscribe(channel)
            if self._task is None:
                self._task = asyncio.create_task(self._read(), name=f"redis-shard {self.name}")
            async with asyncio.timeout(confirm_within):
                await asyncio.shield(future)
        except BaseException:
            self.channels.discard(channel)
            self._confirm.pop(channel, None)
            raise

    async def remove(self, channel: str) -> None:
        self.channels.discard(channel)
        self._confirm.pop(channel, None)
        self._leaving.add(channel)
        with contextlib.suppress(*REDIS_ERRORS):  # a dead connection holds nothing anyway
            async with self._commands:
                await self._pubsub.sunsubscribe(channel)

    async def close(self) -> None:
        self.dead = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*REDIS_ERRORS):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()

    async def _read(self) -> None:
        try:
            await self._read_replies()
        except Exception as exc:  # whatever broke the reader, its channels must move
            if not isinstance(exc, REDIS_ERRORS):
                log.exception("redis cluster node reader failed", extra={"node": self.name})
            log.warning(
                "redis cluster node connection lost", extra={"node": self.name, "error": repr(exc)}
            )
            self._fail(exc)

    async def _read_replies(self) -> None:
        # A node that vanished without a reset (host down, partition) leaves a half-open
        # socket that TCP notices only after many minutes: after HEALTH_CHECK_S of silence we
        # PING, and a PING unanswered for as long again means the connection is dead.
        loop = asyncio.get_running_loop()
        last_reply, pinged = loop.time(), False
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except redis.exceptions.ResponseError as exc:  # MOVED: refused subscription
                self._refuse_oldest(exc)
                message = {"type": "error"}
            now = loop.time()
            if message is not None:
                last_reply, pinged = now, False
                if message["type"] not in ("pong", "error"):
                    self._dispatch(message["type"], message["channel"].decode(), message["data"])
            elif now - last_reply > 2 * HEALTH_CHECK_S:
                raise redis.exceptions.ConnectionError("no answer to PING")
            elif now - last_reply > HEALTH_CHECK_S and not pinged:
                async with self._commands:
                    await self._pubsub.ping()
                pinged = True

    def _dispatch(self, kind: str, channel: str, data: bytes) -> None:
        if kind == "smessage":
            if channel in self.channels:
                self._on_message(channel, data)
        elif kind == "ssubscribe":
            future = self._confirm.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "sunsubscribe":
            if channel in self._leaving:
                self._leaving.discard(channel)
            elif channel in self.channels:  # the node gave the slot away
                self.channels.discard(channel)
                self._on_lost(self, [channel])

    def _refuse_oldest(self, exc: Exception) -> None:
        # Replies come in command order and an error reply names no channel: it answers the
        # oldest subscription still waiting for its confirmation.
        for channel, future in list(self._confirm.items()):
            if not future.done():
                self._confirm.pop(channel)
                future.set_exception(exc)
                return

    def _fail(self, exc: Exception) -> None:
        self.dead = True
        for future in self._confirm.values():
            if not future.done():
                future.set_exception(exc)
        self._confirm.clear()
        lost, self.channels = sorted(self.channels), set()
        self._on_lost(self, lost)


class ShardedSubscriber:
    """The gateway's subscriptions in a Redis Cluster; the same interface as
    `broker.Subscriber`, so `app.feed` does not know which kind it holds."""

    def __init__(
        self,
        cluster: RedisCluster,
        names: Names,
        on_burst: Callable[[Burst], None],
        on_reconnect: Callable[[list[str]], Awaitable[None]],
        on_reconnect_attempt: Callable[[], None] = lambda: None,
    ) -> None:
        self._cluster = cluster
        self._names = names
        self._on_burst = on_burst
        self._on_reconnect = on_reconnect
        self._on_attempt = on_reconnect_attempt
        self._channels: dict[str, str] = {}  # channel -> site
        self._homes: dict[str, NodeLink] = {}  # channel -> the link it is subscribed on
        self._links: dict[str, NodeLink] = {}  # node name -> link
        self._lost: set[str] = set()
        self._lost_signal = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def sites(self) -> list[str]:
        return list(self._channels.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._rehome_forever(), name="redis-cluster-rehome")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None:
        """SSUBSCRIBE the site's channel on the node owning its slot; return once confirmed."""
        channel = self._names.channel(site)
        self._channels[channel] = site
        try:
            await self._home(channel, confirm_within)
        except BaseException:
            self._channels.pop(channel, None)
            raise

    async def unsubscribe(self, site: str) -> None:
        channel = self._names.channel(site)
        self._channels.pop(channel, None)
        await self._forget(channel)

    async def _forget(self, channel: str) -> None:
        self._lost.discard(channel)
        link = self._homes.pop(channel, None)
        if link is not None:
            await link.remove(channel)
            if not link.channels:
                await self._drop(link)

    async def _home(self, channel: str, confirm_within: float) -> None:
        for attempt in range(SUBSCRIBE_ATTEMPTS):
            await self._cluster.initialize()  # a no-op once the slot map is loaded
            node = self._cluster.get_node_from_key(channel)
            if node is None:
                raise redis.exceptions.RedisClusterException(f"no node serves {channel}")
            link = self._links.get(node.name)
            if link is None or link.dead:
                link = NodeLink(node.host, int(node.port), self._on_message_on, self._on_link_lost)
                self._links[node.name] = link
            try:
                await link.add(channel, confirm_within)
            except (redis.exceptions.MovedError, redis.exceptions.AskError):
                if attempt == SUBSCRIBE_ATTEMPTS - 1:
                    raise
                await self._refresh()
                continue
            self._homes[channel] = link
            return

    async def _refresh(self) -> None:
        """Reload the slot map from any node that answers."""
        await self._cluster.nodes_manager.initialize()

    async def _drop(self, link: NodeLink) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        await link.close()

    def _on_message_on(self, channel: str, payload: bytes) -> None:
        # One message at a time: redis-py reads this connection (broker.Subscriber's bulk
        # hiredis reader serves plain servers, where the bench measures throughput).
        site = self._channels.get(channel)
        if site is not None:
            self._on_burst({site: [payload]})

    def _on_link_lost(self, link: NodeLink, channels: list[str]) -> None:
        for channel in channels:
            if self._homes.get(channel) is link:
                del self._homes[channel]
            if channel in self._channels:
                self._lost.add(channel)
        if (link.dead or not link.channels) and self._links.get(link.name) is link:
            del self._links[link.name]
            closing = asyncio.get_running_loop().create_task(link.close())
            self._closing.add(closing)  # held until done: the loop keeps only weak references
            closing.add_done_callback(self._closing.discard)
        if self._lost:
            self._lost_signal.set()

    async def _rehome_forever(self) -> None:
        attempt = 0
        while True:
            await self._lost_signal.wait()
            if attempt:
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(attempt, 10))
                await asyncio.sleep(random.uniform(delay / 2, delay))
            self._on_attempt()
            try:
                ok = await self._rehome()
            except Exception:  # a bug must not end re-homing for good: log it, try again
                log.exception("redis cluster re-homing failed")
                ok = False
            attempt = 0 if ok else attempt + 1

    async def _rehome(self) -> bool:
        """Subscribe every lost channel on its slot's current owner; False if any failed."""
        done: list[str] = []
        ok = True
        try:
            await self._refresh()
            for channel in sorted(self._lost):
                if channel not in self._lost:  # unsubscribed, or subscribed afresh, meanwhile
                    continue
                await self._home(channel, 5.0)
                self._lost.discard(channel)
                site = self._channels.get(channel)
                if site is None:  # its last viewer left while we were subscribing it
                    await self._forget(channel)
                else:
                    done.append(site)
        except REDIS_ERRORS as exc:
            log.warning("redis cluster resubscribe failed", extra={"error": repr(exc)})
            ok = False
        if not self._lost:
            self._lost_signal.clear()
        if done:
            log.info("redis cluster channels moved", extra={"sites": len(done)})
            await self._on_reconnect(done)
        return ok


class Subscriptions(Protocol):
    """What the gateway needs of a pub/sub connection: `broker.Subscriber` (one server) or
    `ShardedSubscriber` (a whole Cluster)."""

    @property
    def sites(self) -> list[str]: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None: ...

    async def unsubscribe(self, site: str) -> None: ...


def subscribers(
    shards: RedisShards,
    names: Names,
    on_burst: Callable[[Burst], None],
    on_reconnect: Callable[[list[str]], Awaitable[None]],
    on_reconnect_attempt: Callable[[], None],
) -> list[Subscriptions]:
    """One subscriber per Redis server, or one for the whole Cluster; indexed like
    `shards.clients`, so `shards.index(site)` picks a site's subscriber."""
    if shards.cluster:
        cluster = shards.clients[0]
        assert isinstance(cluster, RedisCluster)
        return [ShardedSubscriber(cluster, names, on_burst, on_reconnect, on_reconnect_attempt)]
    return [
        Subscriber(url, names, on_burst, on_reconnect, on_reconnect_attempt) for url in shards.urls
    ]
