"""Redis pub/sub for the gateway: one connection per Redis server, carrying every site
subscribed there (`Subscriber`), read in bulk by hiredis (`PubSubConnection`).

A gateway holds one pub/sub connection per server (per node in a Cluster: app.broker.cluster),
whatever its number of sites and viewers. Replies are parsed in bulk and handed over as one
`Burst` per read; a PING health check finds a stalled link in 2-3 s; after a reconnect every
channel is subscribed again and confirmed before `on_reconnect` reports the sites, so the
gateway's catch-up from storage starts only once live events flow again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
import redis.exceptions
from redis.asyncio.connection import SSLConnection, parse_url

from app.broker.base import Burst
from app.names import Names
from app.servers.redis import REDIS_ERRORS

log = logging.getLogger(__name__)


#: Subscriber reconnect backoff: base * 2**attempt, capped, with full jitter.
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 5.0


def reconnect_delay(attempt: int) -> float:
    """Seconds before pub/sub reconnect attempt `attempt` (1, 2, ...): exponential, capped,
    jittered so that gateways do not reconnect in step."""
    delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(attempt, 10))
    return random.uniform(delay / 2, delay)


#: Seconds between PINGs on an idle pub/sub connection; one unanswered for as long again
#: means the connection is dead even if TCP has not noticed (a half-open socket, a hung or
#: cut-off Redis). A stalled link is so found within 2-3 s, and the gateway serves its sites
#: from PostgreSQL meanwhile (app.gateway.feed); the cost is one PING a second per idle connection.
HEALTH_CHECK_S = 1.0
CONNECT_TIMEOUT_S = 2.0
#: The longest a resubscription waits for Redis to confirm every channel (many channels on a
#: Redis just restarted may take more than one health-check interval).
CONFIRM_TIMEOUT_S = 5.0


class Subscriber:
    """The gateway's one Redis pub/sub connection, carrying every site it has viewers for.

    It owns reconnection (docs/decisions.md): a silent reconnect would hide a gap. On any
    connection error it waits with exponential backoff and jitter, logs each attempt, opens a
    new connection, resubscribes every channel it held, and calls `on_reconnect(sites)` so the
    gateway can repair and report the gap. `subscribe` returns once Redis has confirmed.

    Reading is ours, not redis-py's: redis-py parses and dispatches one pub/sub message per
    call (profiled at ~30 % of the gateway's CPU with one event per message). Here hiredis
    parses everything the event loop read in one turn, and `on_burst` gets it grouped by
    site: one call, and so one frame per viewer, per site per turn, however many events it
    holds (PubSubConnection).
    """

    def __init__(
        self,
        redis_url: str,
        names: Names,
        on_burst: Callable[[Burst], None],
        on_reconnect: Callable[[list[str]], Awaitable[None]],
        on_reconnect_attempt: Callable[[], None] = lambda: None,
        health_check_s: float = HEALTH_CHECK_S,
    ) -> None:
        self._url = redis_url
        self._names = names
        self._health_check_s = health_check_s
        self._on_burst = on_burst
        self._on_reconnect = on_reconnect
        self._on_attempt = on_reconnect_attempt
        self._channels: dict[bytes, str] = {}  # channel -> site
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._conn: PubSubConnection | None = None
        #: Set while `_conn` is open: the watcher has a connection to look after.
        self._opened = asyncio.Event()
        #: True from a lost connection until the watcher has replaced it: subscribing then
        #: fails fast (the viewer reconnects) instead of racing the watcher to reconnect.
        self._lost = False
        # Opening the connection must not interleave (two first SUBSCRIBEs at once would open
        # two connections, one orphaned).
        self._commands = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._catch_ups: set[asyncio.Task[None]] = set()  # held: the loop keeps weak refs
        self._closing = False

    @property
    def sites(self) -> list[str]:
        return list(self._channels.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever(), name="redis-subscriber")
        self._task.add_done_callback(_log_crash)

    async def close(self) -> None:
        self._closing = True
        for task in [self._task, *self._catch_ups]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._conn is not None:
            self._conn.close()

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None:
        """SUBSCRIBE to the site's channel and wait for Redis to confirm it.

        Raises (TimeoutError or a Redis error) when Redis is unreachable or does not confirm
        in time; the channel is then still held, and subscribed as soon as the connection is
        back (`on_reconnect` reports it), so the caller serves the site from storage meanwhile
        (`holds` says when it is live). Cancelled, it holds nothing."""
        channel = self._names.channel(site).encode()
        self._channels[channel] = site
        future = self._confirm.setdefault(channel, asyncio.get_running_loop().create_future())
        try:
            async with self._commands:
                conn = await self._connection()
            conn.command(b"SUBSCRIBE", channel)
            async with asyncio.timeout(confirm_within):
                await asyncio.shield(future)
        except (TimeoutError, *REDIS_ERRORS):
            raise
        except BaseException:
            self._drop(channel)
            raise

    def holds(self, site: str) -> bool:
        """True while the site's channel is confirmed on a connection not known to be lost:
        its live events arrive. A stalled connection is known lost within 2-3 health-check
        intervals."""
        channel = self._names.channel(site).encode()
        conn = self._conn
        return (
            conn is not None
            and not self._lost
            and not conn.lost
            and channel in self._channels
            and channel not in self._confirm
        )

    async def unsubscribe(self, site: str) -> None:
        channel = self._names.channel(site).encode()
        self._drop(channel)
        if self._conn is not None:  # a dead connection unsubscribes everything
            self._conn.command(b"UNSUBSCRIBE", channel)

    def _drop(self, channel: bytes) -> None:
        """Stop holding `channel`, settling its pending confirmation: a resubscription waiting
        for it need not wait any more (and unsubscribes the channel once its connection is
        in); a failing `subscribe`, whose own future it may be, is past waiting anyway."""
        self._channels.pop(channel, None)
        waiting = self._confirm.pop(channel, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def _confirmed(self, conn: PubSubConnection) -> list[str] | None:
        """SUBSCRIBE every channel held on `conn`; once Redis has confirmed each one still
        held, their sites (None if it did not). A channel dropped meanwhile is not waited for
        (`_drop` settles its future) and is unsubscribed again here, so the connection carries
        exactly the channels held; one subscribed meanwhile is `subscribe`'s own to confirm."""
        loop = asyncio.get_running_loop()
        sent = list(self._channels)
        waits = [self._confirm.setdefault(ch, loop.create_future()) for ch in sent]
        conn.command(b"SUBSCRIBE", *sent)
        try:
            async with asyncio.timeout(max(self._health_check_s, CONFIRM_TIMEOUT_S)):
                for waiting in waits:  # asyncio.wait cancels neither on its way out
                    either: list[asyncio.Future[Any]] = [waiting, conn.gone]
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    if conn.lost:
                        return None
        except TimeoutError:
            return None
        if dropped := [ch for ch in sent if ch not in self._channels]:
            conn.command(b"UNSUBSCRIBE", *dropped)
        return [self._channels[ch] for ch in sent if ch in self._channels]

    async def _connection(self) -> PubSubConnection:
        """The open connection, opened on first use (call under `_commands`). When it cannot
        be opened, the watcher takes over: it reconnects with backoff and subscribes every
        channel held."""
        if self._lost or (self._conn is not None and self._conn.lost):
            raise redis.exceptions.ConnectionError("redis pub/sub is reconnecting")
        if self._conn is None:
            try:
                self._conn = await PubSubConnection.open(self._url, self._on_replies)
            except REDIS_ERRORS:
                self._lost = True
                self._opened.set()  # wakes the watcher, which finds no connection
                raise
            self._opened.set()
        return self._conn

    # -- reading ----------------------------------------------------------------------------

    def _on_replies(self, replies: list[Any]) -> None:
        """Everything one turn of the loop read: messages grouped by site (in order) for `on_burst`,
        subscription confirmations resolved."""
        burst: Burst = {}
        channels = self._channels
        for reply in replies:
            if type(reply) is list and reply[0] == b"message":  # [message, channel, data]
                site = channels.get(reply[1])
                if site is not None:
                    payloads = burst.get(site)
                    if payloads is None:
                        burst[site] = [reply[2]]
                    else:
                        payloads.append(reply[2])
            else:
                self._on_control(reply)
        if burst:
            self._on_burst(burst)

    def _on_control(self, reply: Any) -> None:
        if type(reply) is list and reply and reply[0] == b"subscribe":
            future = self._confirm.pop(reply[1], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(reply, Exception):
            log.error("redis pub/sub command failed", extra={"error": str(reply)})
        # unsubscribe confirmations and pongs need nothing

    # -- connection lifecycle ---------------------------------------------------------------

    async def _watch_forever(self) -> None:
        attempt = 0
        while not self._closing:
            if attempt:
                delay = reconnect_delay(attempt)
                log.warning(
                    "redis pub/sub reconnecting",
                    extra={"attempt": attempt, "delay_s": round(delay, 3)},
                )
                self._on_attempt()
                await asyncio.sleep(delay)
                attempt = 0 if await self._resubscribe() else attempt + 1
                continue
            await self._opened.wait()
            conn = self._conn
            if conn is None:  # the first connection could not be opened
                log.warning("redis pub/sub unavailable")
                self._opened.clear()
                attempt = 1
                continue
            error = await conn.watch(self._health_check_s)
            log.warning("redis pub/sub connection lost", extra={"error": error})
            self._conn = None
            self._opened.clear()
            self._lost = True
            attempt = 1

    async def _resubscribe(self) -> bool:
        """A fresh connection subscribed to every channel held; False if Redis is still down
        or does not confirm within the health-check interval.

        `on_reconnect` runs only once Redis has confirmed every channel: the gateway's repair
        then reads the replay window after the subscription is in place, so an event is either
        in what the repair reads or arrives live, never in neither."""
        async with self._commands:
            if not self._channels:
                self._lost = False  # nothing to read until the next subscribe
                return True
            try:
                conn = await PubSubConnection.open(self._url, self._on_replies)
            except REDIS_ERRORS as exc:
                log.warning("redis resubscribe failed", extra={"error": repr(exc)})
                return False
            try:
                sites = await self._confirmed(conn)
            except BaseException:  # closing: the connection is not ours to keep yet
                conn.close()
                raise
            if sites is None:
                conn.close()
                log.warning(
                    "redis resubscribe not confirmed", extra={"channels": len(self._channels)}
                )
                return False
            self._conn = conn
            self._lost = False
            self._opened.set()
        log.info("redis pub/sub reconnected", extra={"sites": len(sites)})
        # Its own task: the catch-up reads storage site by site, and meanwhile the watcher
        # must already be watching (PINGing) the new connection.
        catch_up = asyncio.create_task(self._report(sites), name="redis-catch-up")
        self._catch_ups.add(catch_up)
        catch_up.add_done_callback(self._catch_ups.discard)
        catch_up.add_done_callback(_log_crash)
        return True

    async def _report(self, sites: list[str]) -> None:
        await self._on_reconnect(sites)


def tls_context(params: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context redis-py would use for these URL parameters (None for plain TCP): its
    own `SSLConnection` reads the `ssl_*` options, so the gateway's pub/sub connection verifies
    exactly as the rest of Sitewire's Redis clients do."""
    if params.get("connection_class") is not SSLConnection:
        return None
    options = {k: v for k, v in params.items() if k.startswith("ssl_")}
    context: ssl.SSLContext = SSLConnection(**options).ssl_context.get()
    return context


#: Bytes fed to hiredis at a time. Its reader moves what is left of its buffer to the front
#: each time it has consumed 1 KB, so one large feed costs quadratic time: 4 MB of messages
#: fed at once parsed 24x slower per message than in 16 KB pieces (2.3x for 256 KB).
FEED_BYTES = 16 * 1024


class PubSubConnection(asyncio.Protocol):
    """One RESP2 connection in pub/sub mode: commands are written as they come, replies are
    parsed by hiredis in bulk, and handed over in one call per turn of the event loop.

    Handing them over on the next turn, not per read, is what lets a busy gateway batch
    without a timer: while it spends 8 ms writing one frame to 1,000 viewers, messages pile
    up in the socket; the loop then reads them all (with uvloop, up to 32 reads of 256 KB in
    one turn; asyncio's own loop reads once) and the lot becomes one frame per viewer. Per
    read, a burst was capped at 256 KB (about 10 ms of 70,000 events/s), so 100 busy sites
    could never catch up by batching (docs/decisions.md).
    """

    def __init__(self, on_replies: Callable[[list[Any]], None]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._on_replies = on_replies
        self._parser = hiredis.Reader()
        #: What was read since the last `_hand_over` (scheduled once per turn of the loop).
        self._unparsed: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[str] = loop.create_future()
        self.last_read = loop.time()

    @classmethod
    async def open(cls, url: str, on_replies: Callable[[list[Any]], None]) -> PubSubConnection:
        """Connect (TCP, TLS or a Unix socket, as `url` says) and authenticate if it asks to,
        reading the URL as redis-py does, TLS options (`?ssl_ca_certs=…`) included. No SELECT:
        pub/sub channels are not per database."""
        params: dict[str, Any] = dict(parse_url(url))
        loop = asyncio.get_running_loop()
        conn = cls(on_replies)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if "path" in params:
                    await loop.create_unix_connection(lambda: conn, params["path"])
                else:
                    await loop.create_connection(
                        lambda: conn, params.get("host", "localhost"), params.get("port", 6379),
                        ssl=tls_context(params),
                    )  # fmt: skip
                username, password = params.get("username"), params.get("password")
                if username or password is not None:  # as redis-py: AUTH user "" for a bare user
                    await conn._authenticate(username, password or "")
        except BaseException:  # refused, timed out or cancelled: no half-open connection left
            conn.close()
            raise
        return conn

    async def _authenticate(self, username: str | None, password: str) -> None:
        answer: asyncio.Future[list[Any]] = self._loop.create_future()
        on_replies = self._on_replies
        self._on_replies = lambda replies: None if answer.done() else answer.set_result(replies)
        try:
            self.command(b"AUTH", *([username.encode()] if username else []), password.encode())
            [reply, *rest] = await answer
        finally:
            self._on_replies = on_replies
        if isinstance(reply, Exception):
            self.close()
            raise redis.exceptions.AuthenticationError(str(reply))
        if rest:
            on_replies(rest)

    def command(self, *args: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # the watcher will notice the loss and resubscribe everything
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self._transport.write(b"".join(parts))

    @property
    def lost(self) -> bool:
        return self._lost.done()

    @property
    def gone(self) -> asyncio.Future[str]:
        """Done (with the reason) once the connection is lost."""
        return self._lost

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def watch(self, health_check_s: float) -> str:
        """Return (why) once the connection is lost. PINGs it when idle for `health_check_s`
        and gives it up when a PING has had no answer for as long again."""
        pinged_at = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(health_check_s):
                    return await asyncio.shield(self._lost)
            now = self._loop.time()
            if pinged_at is not None and self.last_read < pinged_at:
                self.close()
                return "no answer to PING"
            pinged_at = None
            if now - self.last_read >= health_check_s:
                pinged_at = now
                self.command(b"PING")

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        self._unparsed.append(data)
        if len(self._unparsed) == 1:
            self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Everything read since the last turn of the loop, parsed, in one call."""
        chunks, self._unparsed = self._unparsed, []
        parser, replies = self._parser, []
        try:
            for data in chunks:
                for at in range(0, len(data), FEED_BYTES):
                    parser.feed(data, at, min(FEED_BYTES, len(data) - at))
                    while (reply := parser.gets()) is not False:
                        replies.append(reply)
        except hiredis.ProtocolError as exc:
            self._give_up(f"protocol error: {exc}")
        if not replies:
            return
        try:
            self._on_replies(replies)
        except Exception:
            # A bug in handling: what this turn brought for other sites is lost, so this
            # connection is given up like a broken one; the subscriber reconnects and its
            # viewers are caught up from storage (docs/decisions.md).
            log.exception("handling pub/sub messages failed")
            self._give_up("handling messages failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self._give_up(repr(exc) if exc is not None else "closed by the server")

    def _give_up(self, why: str) -> None:
        if not self._lost.done():
            self._lost.set_result(why)
        self.close()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        log.critical("background task stopped", extra={"task": task.get_name()}, exc_info=error)
