"""Live aggregates for viewers: one internal viewer per watched site, drained into its
`SiteStats` (app.gateway.aggregates), and `stats` frames pushed to the viewers that asked.

Aggregation is kept apart from the fan-out: the internal viewer joins the site's feed at
`minutes=30` like any dashboard would, so the aggregates see every event exactly once and in
order, through the same replay, gap repair and storage fallback as viewers, and survive a
gateway restart (they are rebuilt from PostgreSQL) or Redis losing its data. The hub only
queues events for it; counting runs in its own callback, so a bug there stops that site's
statistics (logged, `complete: false` no more updates), never a stream. Two gateways count the
same events in the same order: their numbers agree once both have seen the same offset.

A site is watched while a viewer asks for stats, and LINGER_S after (so `GET /stats` polled
now and then stays cheap); a watch costs one queued viewer and the counts of 30 minutes.
Filtered stats (`?page=/pricing`) are a watch of their own, counting only the matching events
from the same stream: the first request for a filter reads 30 minutes from storage, like the
site's first. At most MAX_FILTERED of them are kept per gateway; beyond, unused ones are
dropped first, then requests for new filters are refused (`StatsBusy`). New filtered watches
are also paced (NEW_FILTERED_PER_S, bursts of NEW_FILTERED_BURST), since each costs a read of
30 minutes: a client cycling through filters cannot make the gateway replay without end.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from app.codes import CloseCode
from app.gateway.aggregates import Filters, SiteStats
from app.gateway.feed import Feeds
from app.gateway.hub import EVENT, Viewer
from app.gateway.replay import Replayer, StartRequest, StorageUnavailable, run_replay
from app.store.sites import Site
from app.tasks import cancel_and_wait

log = logging.getLogger(__name__)

StatsMode = Literal["off", "with", "only"]
#: Seconds between two pushes of `stats` frames (a frame goes only when the body changed).
PUSH_S = 1.0
#: Seconds a site stays watched after its last stats viewer or request.
LINGER_S = 60.0
#: The longest `GET /stats` waits for a site's first count (the last 30 minutes, replayed).
READY_TIMEOUT_S = 10.0
#: Seconds before a watch whose internal viewer was closed (storage down) starts again.
RETRY_S = 1.0
WINDOW_MINUTES = 30
#: Filtered watches kept per gateway (each: one queued viewer, 30 minutes of counts).
MAX_FILTERED = 64
#: New filtered watches a second per gateway, sustained, and the burst allowed (a person
#: clicking through a dashboard's panels stays well inside it).
NEW_FILTERED_PER_S = 1.0
NEW_FILTERED_BURST = 10.0


class StatsUnavailable(Exception):
    """The site's aggregates cannot be counted now (storage unreachable, or still loading)."""


class StatsBusy(StatsUnavailable):
    """MAX_FILTERED filtered watches are in use: a new filter must wait."""


def parse_stats(value: str | None) -> StatsMode:
    """The `stats` query parameter: absent or "0" (no stats), "1" (stats frames beside the
    events), "only" (stats frames, no events)."""
    if value in (None, "", "0"):
        return "off"
    if value == "1":
        return "with"
    if value == "only":
        return "only"
    raise ValueError("stats is 0, 1 or only")


@dataclass
class _Watch:
    site: Site
    stats: SiteStats
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    viewer: Viewer | None = None
    task: asyncio.Task[None] | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    #: Set when the internal viewer was closed (its queue overflowed, storage went away).
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False
    subscribers: list[Viewer] = field(default_factory=list)
    last_pushed: bytes = b""
    used_at: float = 0.0


class Analytics:
    def __init__(self, feeds: Feeds, replayer: Replayer, queue_bytes: int) -> None:
        self._feeds = feeds
        self._replayer = replayer
        self._queue_bytes = queue_bytes
        self._watches: dict[tuple[str, Filters], _Watch] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False
        #: The pace of new filtered watches: a token bucket (tokens, when last refilled).
        self._new_tokens = NEW_FILTERED_BURST
        self._new_at = 0.0

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="stats")

    async def close(self) -> None:
        """Stop counting (the gateway drains or stops); idempotent. Stats-only viewers, which
        are not in the hub, are told to reconnect elsewhere here."""
        self._closed = True
        await cancel_and_wait([self._ticker, *(w.task for w in self._watches.values())])
        for watch in self._watches.values():
            if watch.viewer is not None:
                self._feeds.leave(watch.viewer)
            for viewer in watch.subscribers:
                viewer.fail(CloseCode.SHUTTING_DOWN)
        self._watches.clear()

    # -- asking -----------------------------------------------------------------------------

    async def body(self, site: Site, filters: Filters = ()) -> dict[str, Any]:
        """The site's aggregates now (`GET /stats`), of the events matching `filters`; raises
        StatsUnavailable when they cannot be counted within READY_TIMEOUT_S, StatsBusy when
        no more filtered watches can be kept."""
        watch = self._watch(site, filters)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await watch.ready.wait()
        except TimeoutError:
            raise StatsUnavailable("statistics are still loading") from None
        if watch.failed:
            raise StatsUnavailable("statistics failed for this site")
        return self._snapshot(watch)

    def check_room(self, site: Site, filters: Filters) -> None:
        """Raise StatsBusy if a stats viewer with these filters could not be served now (call
        before admitting it: `subscribe` itself never refuses)."""
        if filters and (site.id, filters) not in self._watches:
            self._make_room()

    def subscribe(self, site: Site, viewer: Viewer, filters: Filters = ()) -> None:
        """Push `stats` frames to `viewer`: one as soon as the counts are ready, then at most
        one per PUSH_S while they change, until the viewer is closed. Never raises: a viewer
        that joins while the gateway drains simply gets no stats (it is told to go anyway)."""
        if self._closed:
            return
        watch = self._watch(site, filters, force=True)
        watch.subscribers.append(viewer)
        if watch.ready.is_set():
            self._push(watch, viewer, self._frame(watch))

    # -- watching a site ---------------------------------------------------------------------

    def _watch(self, site: Site, filters: Filters, force: bool = False) -> _Watch:
        if self._closed:
            raise StatsUnavailable("the gateway is shutting down")
        key = (site.id, filters)
        watch = self._watches.get(key)
        if watch is not None and watch.site.epoch != site.epoch:
            self._stop(key, watch)  # the site was registered again: a new offset sequence
            watch = None
        if watch is None:
            if filters and not force:
                self._make_room()
            watch = self._watches[key] = _Watch(site, SiteStats(filters))
            watch.task = asyncio.create_task(self._run(watch), name=f"stats {site.id}")
        watch.used_at = asyncio.get_running_loop().time()
        return watch

    def _make_room(self) -> None:
        """Let one more filtered watch start, or raise StatsBusy saying why not: within the
        pace of new ones, and within MAX_FILTERED after dropping the least recently used
        unwatched one if needed."""
        now = asyncio.get_running_loop().time()
        elapsed = now - self._new_at if self._new_at else 0.0
        self._new_tokens = min(NEW_FILTERED_BURST, self._new_tokens + elapsed * NEW_FILTERED_PER_S)
        self._new_at = now
        if self._new_tokens < 1.0:
            raise StatsBusy("new filtered statistics start at most one a second; try again")
        filtered = [(w.used_at, k) for k, w in self._watches.items() if k[1]]
        if len(filtered) >= MAX_FILTERED:
            unused = [(used, k) for used, k in filtered if not self._watches[k].subscribers]
            if not unused:
                raise StatsBusy("every filtered statistics view of this gateway is in use")
            key = min(unused)[1]
            self._stop(key, self._watches[key])
        self._new_tokens -= 1.0

    async def _run(self, watch: _Watch) -> None:
        """Keep the internal viewer of the site joined: from 30 minutes ago the first time,
        from its last counted offset after it was closed (storage down, a slow drain)."""
        while True:
            site = watch.site
            since = watch.stats.offset
            req = (
                StartRequest(since=(site.epoch, since))
                if since
                else StartRequest(minutes=WINDOW_MINUTES)
            )
            viewer = Viewer(site.id, site.epoch, self._queue_bytes, lambda: self._wake(watch))
            try:
                start = await self._feeds.admit(viewer, req)
            except StorageUnavailable:
                await asyncio.sleep(RETRY_S)
                continue
            except Exception:  # a bug, or a broker error: try again, do not stop counting
                log.exception("stats could not join the feed", extra={"site": site.id})
                await asyncio.sleep(RETRY_S)
                continue
            watch.viewer = viewer
            watch.closed.clear()
            try:
                await run_replay(self._replayer, viewer, start, watch.drained, _no_gap_notice)
                if viewer.close_code is None:
                    self._drain(watch)
                    watch.ready.set()
                    await watch.closed.wait()
            except Exception:
                log.exception("stats replay failed", extra={"site": site.id})
            finally:
                self._feeds.leave(viewer)
                watch.viewer = None
            await asyncio.sleep(RETRY_S)

    def _wake(self, watch: _Watch) -> None:
        if not watch.draining:
            watch.draining = True
            asyncio.get_running_loop().call_soon(self._drain, watch)

    def _drain(self, watch: _Watch) -> None:
        """Count what the internal viewer's queue holds. A failure stops this site's counts
        (`failed`), never the stream the events came from."""
        watch.draining = False
        viewer = watch.viewer
        if viewer is None:
            return
        for kind, offset, payload in viewer.take():
            if watch.failed:
                break
            try:
                if kind == EVENT:
                    watch.stats.add(orjson.loads(payload), offset)
                elif orjson.loads(payload).get("recovered") is False:
                    watch.stats.complete = False  # a gap storage could not fill
            except Exception:
                log.exception("counting failed; no more statistics for this site",
                              extra={"site": watch.site.id})  # fmt: skip
                watch.failed = True
        watch.drained.set()
        if viewer.close_code is not None:
            watch.closed.set()

    # -- pushing -----------------------------------------------------------------------------

    def _snapshot(self, watch: _Watch) -> dict[str, Any]:
        body = watch.stats.snapshot(datetime.now(UTC))
        return {"site": watch.site.id, "epoch": watch.site.epoch, **body}

    def _frame(self, watch: _Watch) -> bytes:
        return orjson.dumps({"type": "stats", "stats": self._snapshot(watch)})

    def _push(self, watch: _Watch, viewer: Viewer, frame: bytes) -> None:
        if not viewer.closed and not viewer.push_notice(frame):
            viewer.fail(CloseCode.SLOW_CONSUMER)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(PUSH_S)
            try:
                self._tick(asyncio.get_running_loop().time())
            except Exception:  # a bug must not end the pushes for good
                log.exception("stats push failed")

    def _tick(self, now: float) -> None:
        for key, watch in list(self._watches.items()):
            watch.subscribers = [v for v in watch.subscribers if not v.closed]
            if watch.subscribers:
                watch.used_at = now
            elif now - watch.used_at > LINGER_S:
                self._stop(key, watch)
                continue
            if not watch.subscribers or not watch.ready.is_set() or watch.failed:
                continue
            body = orjson.dumps(self._snapshot(watch))
            if body == watch.last_pushed:
                continue
            watch.last_pushed = body
            frame = b'{"type":"stats","stats":' + body + b"}"
            for viewer in watch.subscribers:
                self._push(watch, viewer, frame)

    def _stop(self, key: tuple[str, Filters], watch: _Watch) -> None:
        """Stop watching: the task leaves the feed as it ends (its `finally`)."""
        del self._watches[key]
        if watch.task is not None:
            watch.task.cancel()


def _no_gap_notice(viewer: Viewer, after: int) -> None:
    """Replay gaps (retention removed events) need no notice here: those events are older than
    the window anyway."""
