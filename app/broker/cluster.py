"""Redis Cluster: the gateway's sharded subscriptions (SSUBSCRIBE), following slot moves.

With `REDIS_CLUSTER=true` ingest publishes with SPUBLISH (app/broker/redis.py), which delivers a
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

A channel is *held* only while its home link has it confirmed: whatever re-homing did, a loss
read after the confirmation (a manual slot move runs `CLUSTER SETSLOT <slot> NODE <target>` on
the source, then on the target, and Redis 7.0 drops the owner's shard subscribers on both) is
seen, and the channel subscribed again. Every `RECONCILE_S` a sweep checks, without asking
Redis, that each held channel is confirmed on a live link to its slot's owner in the slot map,
and re-homes any that is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from app.broker.base import Burst
from app.broker.pubsub import HEALTH_CHECK_S, PubSubConnection, reconnect_delay
from app.names import Names
from app.servers.redis import REDIS_ERRORS

log = logging.getLogger(__name__)

#: What redis-py's cluster client raises, besides its own errors, when a node dies under a
#: command (an outside test saw both while killing masters): the command failed, as a
#: connection error would have (re-homing retries; a publication loses that site's events).
CLUSTER_CLIENT_ERRORS = (AttributeError, RuntimeError)

#: A subscription refused because the slot lives elsewhere: refresh the map and try again.
SUBSCRIBE_ATTEMPTS = 3
#: How often every held channel is checked against its link and the slot map (no I/O: about
#: 10 ms of CPU for 10,000 channels).
RECONCILE_S = 5.0


def node_url(seed: str, host: str, port: int) -> str:
    """The URL of one cluster node as the seed URL reaches it: same scheme, credentials and
    options (TLS or not, `?ssl_ca_certs=…`), the node's own address. Every node of a cluster
    shares its ACL users and `requirepass`, so what opens the seed opens them all."""
    parts = urlsplit(seed)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{address}" if userinfo else address
    return urlunsplit((parts.scheme, netloc, "", parts.query, ""))  # the query: TLS options


class NodeLink:
    """One pub/sub connection to one cluster node, carrying the shard channels it owns: the
    gateway's own bulk connection (`broker.PubSubConnection`: hiredis, PING health check), in
    sharded mode."""

    def __init__(
        self,
        name: str,
        url: str,
        on_messages: Callable[[dict[str, list[bytes]]], None],
        on_lost: Callable[[NodeLink, list[str]], None],
    ) -> None:
        self.name = name  # redis-py's node name ("host:port"), which keys `_links`
        self._url = url
        self._on_messages = on_messages
        self._on_lost = on_lost
        self._keys: dict[bytes, str] = {}  # the channels held (encoded -> name)
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._leaving: set[bytes] = set()  # channels whose SUNSUBSCRIBE we asked for
        self._conn: PubSubConnection | None = None
        self._opening = asyncio.Lock()  # one connection, however many first SSUBSCRIBEs
        self._task: asyncio.Task[None] | None = None
        self.dead = False

    @property
    def empty(self) -> bool:
        return not self._keys

    def holds(self, channel: str) -> bool:
        """Whether the node confirmed the channel and has not unsubscribed it since."""
        key = channel.encode()
        return not self.dead and key in self._keys and key not in self._confirm

    async def add(self, channel: str, confirm_within: float) -> None:
        """SSUBSCRIBE and wait for the node to confirm (raises ResponseError when the node
        refuses: it does not own the slot any more)."""
        key = channel.encode()
        if key in self._keys:  # already here, or on its way: wait for that one
            pending = self._confirm.get(key)
            if pending is not None:
                async with asyncio.timeout(confirm_within):
                    await asyncio.shield(pending)
            return
        future = asyncio.get_running_loop().create_future()
        self._confirm[key] = future
        self._keys[key] = channel
        try:
            async with self._opening:
                conn = await self._connection()
            conn.command(b"SSUBSCRIBE", key)
            async with asyncio.timeout(confirm_within):
                await asyncio.shield(future)
        except BaseException:
            self._keys.pop(key, None)
            self._confirm.pop(key, None)
            raise

    def remove(self, channel: str) -> None:
        key = channel.encode()
        self._keys.pop(key, None)
        self._confirm.pop(key, None)
        if self._conn is not None:  # a dead connection holds nothing anyway
            self._leaving.add(key)
            self._conn.command(b"SUNSUBSCRIBE", key)

    async def close(self) -> None:
        self.dead = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            self._conn.close()

    async def _connection(self) -> PubSubConnection:
        if self.dead:
            raise redis.exceptions.ConnectionError(f"link to {self.name} is closed")
        if self._conn is None:
            self._conn = await PubSubConnection.open(self._url, self._on_replies)
            self._task = asyncio.create_task(self._watch(self._conn), name=f"redis {self.name}")
        return self._conn

    async def _watch(self, conn: PubSubConnection) -> None:
        why = await conn.watch(HEALTH_CHECK_S)
        log.warning("redis cluster node connection lost", extra={"node": self.name, "error": why})
        self._fail(redis.exceptions.ConnectionError(why))

    def _on_replies(self, replies: list[Any]) -> None:
        """Everything one turn of the loop read: messages by channel (in order) for `on_messages`,
        confirmations resolved, slots given away reported."""
        burst: dict[str, list[bytes]] = {}
        for reply in replies:
            if type(reply) is list and reply[0] == b"smessage":  # [smessage, channel, data]
                channel = self._keys.get(reply[1])
                if channel is not None:
                    burst.setdefault(channel, []).append(reply[2])
            elif type(reply) is list and reply[0] == b"ssubscribe":
                future = self._confirm.pop(reply[1], None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif type(reply) is list and reply[0] == b"sunsubscribe":
                self._on_unsubscribed(reply[1])
            elif isinstance(reply, Exception):  # MOVED: a refused subscription
                self._refuse_oldest(redis.exceptions.ResponseError(str(reply)))
        if burst:
            self._on_messages(burst)

    def _on_unsubscribed(self, key: bytes) -> None:
        if key in self._leaving:
            self._leaving.discard(key)
        elif (channel := self._keys.pop(key, None)) is not None:  # the node gave the slot away
            self._on_lost(self, [channel])

    def _refuse_oldest(self, exc: Exception) -> None:
        # Replies come in command order and an error reply names no channel: it answers the
        # oldest subscription still waiting for its confirmation.
        for key, future in list(self._confirm.items()):
            if not future.done():
                self._confirm.pop(key)
                future.set_exception(exc)
                return

    def _fail(self, exc: Exception) -> None:
        self.dead = True
        for future in self._confirm.values():
            if not future.done():
                future.set_exception(exc)
        self._confirm.clear()
        lost = sorted(self._keys.values())
        self._keys.clear()
        self._on_lost(self, lost)


class ShardedSubscriber:
    """The gateway's subscriptions in a Redis Cluster; the same interface as
    `app.broker.pubsub.Subscriber`, so `app.gateway.feed` does not know which kind it holds."""

    def __init__(
        self,
        cluster: RedisCluster,
        seed_url: str,
        names: Names,
        on_burst: Callable[[Burst], None],
        on_reconnect: Callable[[list[str]], Awaitable[None]],
        on_reconnect_attempt: Callable[[], None] = lambda: None,
    ) -> None:
        self._cluster = cluster
        self._seed_url = seed_url  # node links take its scheme and credentials
        self._names = names
        self._on_burst = on_burst
        self._on_reconnect = on_reconnect
        self._on_attempt = on_reconnect_attempt
        self._channels: dict[str, str] = {}  # channel -> site
        self._homes: dict[str, NodeLink] = {}  # channel -> the link it is subscribed on
        self._links: dict[str, NodeLink] = {}  # node name -> link
        self._lost: set[str] = set()
        self._homing: dict[str, int] = {}  # channel -> `_home` calls under way for it
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
        """SSUBSCRIBE the site's channel on the node owning its slot; return once confirmed.
        When the cluster is unreachable it raises but keeps the channel, which re-homing
        subscribes once a node answers (as `broker.Subscriber.subscribe`)."""
        channel = self._names.channel(site)
        self._channels[channel] = site
        try:
            await self._home(channel, confirm_within)
        except (TimeoutError, *REDIS_ERRORS):
            self._lost.add(channel)
            self._lost_signal.set()
            raise
        except BaseException:
            self._channels.pop(channel, None)
            raise

    def holds(self, site: str) -> bool:
        """True while the site's channel is confirmed on a link not known to be lost."""
        return self._confirmed(self._names.channel(site))

    def _confirmed(self, channel: str) -> bool:
        link = self._homes.get(channel)
        return link is not None and link.holds(channel) and channel not in self._lost

    async def unsubscribe(self, site: str) -> None:
        channel = self._names.channel(site)
        self._channels.pop(channel, None)
        await self._forget(channel)

    async def _forget(self, channel: str) -> None:
        self._lost.discard(channel)
        link = self._homes.pop(channel, None)
        if link is not None:
            link.remove(channel)
            if link.empty:
                await self._drop(link)

    async def _home(self, channel: str, confirm_within: float) -> None:
        """Subscribe the channel on its slot's owner; on return it is confirmed there (with no
        await in between, so the caller sees the same)."""
        self._homing[channel] = self._homing.get(channel, 0) + 1
        try:
            await self._subscribe_on_owner(channel, confirm_within)
        finally:
            if (left := self._homing.pop(channel) - 1) > 0:
                self._homing[channel] = left

    async def _subscribe_on_owner(self, channel: str, confirm_within: float) -> None:
        for attempt in range(SUBSCRIBE_ATTEMPTS):
            await self._cluster.initialize()  # a no-op once the slot map is loaded
            node = self._cluster.get_node_from_key(channel)
            if node is None:
                raise redis.exceptions.RedisClusterException(f"no node serves {channel}")
            link = self._links.get(node.name)
            if link is None or link.dead:
                url = node_url(self._seed_url, node.host, int(node.port))
                link = NodeLink(node.name, url, self._on_link_messages, self._on_link_lost)
                self._links[node.name] = link
            try:
                await link.add(channel, confirm_within)
            except redis.exceptions.ResponseError:  # refused: the slot lives elsewhere now
                if attempt == SUBSCRIBE_ATTEMPTS - 1:
                    raise
                await self._refresh()
                continue
            if not link.holds(channel):
                # Confirmed, then unsubscribed (or the link failed) before this went on: that
                # loss marked the channel lost; subscribe it again, on the owner as now known.
                if attempt == SUBSCRIBE_ATTEMPTS - 1:
                    raise redis.exceptions.ConnectionError(f"{channel} lost as it was confirmed")
                await self._refresh()
                continue
            old = self._homes.get(channel)
            self._homes[channel] = link
            if old is not None and old is not link and not old.dead:  # it moved: leave the old
                old.remove(channel)
                if old.empty:
                    self._close_later(old)
            return

    async def _refresh(self) -> None:
        """Reload the slot map from any node that answers."""
        await self._cluster.nodes_manager.initialize()

    async def _drop(self, link: NodeLink) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        await link.close()

    def _on_link_messages(self, by_channel: dict[str, list[bytes]]) -> None:
        burst: Burst = {}
        for channel, payloads in by_channel.items():
            site = self._channels.get(channel)
            if site is not None:
                burst[site] = payloads
        if burst:
            self._on_burst(burst)

    def _on_link_lost(self, link: NodeLink, channels: list[str]) -> None:
        for channel in channels:
            if self._homes.get(channel) is link:
                del self._homes[channel]
            if channel in self._channels:
                self._lost.add(channel)
        if link.dead or link.empty:
            self._close_later(link)
        if self._lost:
            self._lost_signal.set()

    def _close_later(self, link: NodeLink) -> None:
        if self._links.get(link.name) is not link:
            return
        del self._links[link.name]
        closing = asyncio.get_running_loop().create_task(link.close())
        self._closing.add(closing)  # held until done: the loop keeps only weak references
        closing.add_done_callback(self._closing.discard)

    def _reconcile(self) -> None:
        """Mark lost every held channel that is not confirmed on a live link to its slot's
        owner in the slot map (and not being subscribed right now): whatever left it so,
        re-homing subscribes it again. Local state only, no I/O."""
        stray = []
        for channel in self._channels:
            if channel in self._lost or channel in self._homing:
                continue
            link = self._homes.get(channel)
            if link is None or not link.holds(channel):
                stray.append(channel)
            elif (owner := self._owner(channel)) is not None and owner != link.name:
                stray.append(channel)  # the map moved it elsewhere, but no SUNSUBSCRIBE came
        if stray:
            log.warning("redis cluster channels found unsubscribed", extra={"sites": len(stray)})
            self._lost.update(stray)
            self._lost_signal.set()

    def _owner(self, channel: str) -> str | None:
        try:
            node = self._cluster.get_node_from_key(channel)
        except redis.exceptions.RedisClusterException:  # slot not covered: re-homing says
            return None
        return None if node is None else node.name

    async def _rehome_forever(self) -> None:
        attempt = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_S):
                    await self._lost_signal.wait()
            if not self._lost_signal.is_set():
                self._reconcile()
                if not self._lost_signal.is_set():
                    continue
            if attempt:
                await asyncio.sleep(reconnect_delay(attempt))
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
                before = self._homes.get(channel)
                kept = before is not None and before.holds(channel)  # flagged on a stale map
                await self._home(channel, 5.0)
                home = self._homes.get(channel)
                if home is None or not home.holds(channel):
                    ok = False  # lost again already (`_home` returns confirmed): next round
                    continue
                self._lost.discard(channel)
                site = self._channels.get(channel)
                if site is None:  # its last viewer left while we were subscribing it
                    await self._forget(channel)
                elif not (kept and home is before):  # nothing was lost: no catch-up, no notice
                    done.append(site)
        except (*REDIS_ERRORS, *CLUSTER_CLIENT_ERRORS) as exc:
            log.warning("redis cluster resubscribe failed", extra={"error": repr(exc)})
            ok = False
        if not self._lost:
            self._lost_signal.clear()
        if done:
            log.info("redis cluster channels moved", extra={"sites": len(done)})
            await self._on_reconnect(done)
        return ok
