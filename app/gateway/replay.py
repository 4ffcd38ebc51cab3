"""Resuming viewers: where a stream starts, and the paged replay up to the live stream.

A viewer says where it wants to start: after a cursor (`?since=`, SSE `Last-Event-ID`), the
last N events (`?last=N`), the last T minutes (`?minutes=T`), or now. The gateway joins it to
the live feed first (live events are held aside), then replays storage from the start position
page by page, each page only once the viewer's queue has room, and finally moves the held live
events behind the replay with no gap and no duplicate (`Viewer.go_live`).

Pages come from the broker's window when it holds the whole page, else from PostgreSQL.
Identical page reads in flight are shared, whichever the source, and pages just read are kept
for a second (a reconnect storm after a gateway restart asks for the same pages many times); at
most `MAX_CONCURRENT_READS` PostgreSQL reads run at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import asyncpg
import orjson

from app.broker.base import Broker
from app.codes import CloseCode
from app.gateway.hub import Viewer
from app.gateway.metrics import GatewayMetrics
from app.servers.postgres import STORAGE_ERRORS
from app.store.reads import from_postgres
from app.wire import Event, format_cursor, parse_cursor, parse_decimal, parse_whole

T = TypeVar("T")

#: Events per replay page.
PAGE = 200
#: PostgreSQL replay reads allowed at once per gateway.
MAX_CONCURRENT_READS = 4
#: "No upper bound" for a page: up to whatever is stored now (a catch-up that does not know the
#: head). Every other caller's bound is an offset known to be committed.
UNBOUNDED = 2**62
#: Seconds a page read (from the window or PostgreSQL) is kept for viewers asking for it just
#: after. In a reconnect storm the viewers drift a few milliseconds apart, so most miss the read
#: in flight.
#: Only pages bounded by a committed offset are kept or shared: the same range read without a
#: bound may have been read before all of it was committed.
RECENT_PAGE_S = 1.0
#: Most pages kept (each at most PAGE events).
RECENT_PAGES = 64
#: Most events `?last=` may ask for, and most minutes `?minutes=` may.
MAX_LAST = 10_000
MAX_MINUTES = 24 * 60
#: How long a replay keeps retrying a page while storage is unreachable before it closes the
#: viewer with 4004 (it resumes later from its last cursor), and the wait between tries.
REPLAY_PATIENCE_S = 5.0
REPLAY_RETRY_S = 0.5


class StorageUnavailable(Exception):
    """Where a resume must start, or what it must replay, cannot be read now: the viewer is
    closed with 4004 and resumes later from its own cursor (nothing is skipped)."""


class BadStart(ValueError):
    """A malformed `since`, `last` or `minutes` (named by `field`); the message is safe to
    show."""

    def __init__(self, message: str, field: str = "since") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class StartRequest:
    since: tuple[str, int] | None = None
    last: int | None = None
    minutes: float | None = None


def parse_start(since: str | None, last: str | None, minutes: str | None) -> StartRequest:
    given = [x for x in (since, last, minutes) if x]
    if len(given) > 1:
        raise BadStart("give at most one of since, last and minutes")
    if since:
        try:
            return StartRequest(since=parse_cursor(since))
        except ValueError as exc:
            raise BadStart(f"bad start position: {exc}", "since") from None
    if last:
        try:
            n = parse_whole(last)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_LAST:
            raise BadStart(f"last is a whole number from 0 to {MAX_LAST}", "last")
        return StartRequest(last=n)
    if minutes:
        try:
            m = parse_decimal(minutes)
        except ValueError:
            m = 0.0
        if not 0 < m <= MAX_MINUTES:  # NaN included
            raise BadStart(f"minutes is a number above 0 and at most {MAX_MINUTES}", "minutes")
        return StartRequest(minutes=m)
    return StartRequest()


@dataclass(frozen=True, slots=True)
class Start:
    #: Replay everything after this offset; None means "start live, no replay".
    after: int | None
    #: None: not a resume. True: every event after the cursor will be delivered.
    recovered: bool | None
    reason: str | None = None
    #: The site's last offset when the viewer joined: replay at least up to here.
    head: int = 0


class Replayer:
    def __init__(self, broker: Broker, pool: asyncpg.Pool, metrics: GatewayMetrics) -> None:
        self._broker = broker
        self._pool = pool
        self._metrics = metrics
        self._inflight: dict[tuple[object, ...], asyncio.Future[object]] = {}
        self._reads = asyncio.Semaphore(MAX_CONCURRENT_READS)
        #: Pages recently read: key -> (kept until, events), oldest first.
        self._recent: OrderedDict[tuple[object, ...], tuple[float, list[Event]]] = OrderedDict()
        #: Went-back markers recently read: site -> (kept until, marker), oldest first.
        self._marks: dict[str, tuple[float, tuple[int, int] | None]] = {}

    async def _shared(
        self, key: tuple[object, ...], read: Callable[[], Awaitable[T]], *, count: bool = True
    ) -> T:
        """Run `read` once for all concurrent callers with the same key (each joining caller
        counts as a `shared` replay read, with `count`)."""
        pending = self._inflight.get(key)
        if pending is not None:
            if count:
                self._metrics.replay_reads.labels("shared").inc()
            return cast(T, await asyncio.shield(pending))
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await read()
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters, if any, re-raise it
            raise
        finally:
            del self._inflight[key]

    async def page(
        self, site: str, epoch: str, after: int, until: int, *, window: bool = True
    ) -> list[Event]:
        """Events after..until (at most PAGE), window first (unless `window` is False), then
        PostgreSQL. `until` is an offset known to be committed, or UNBOUNDED. Empty only when
        nothing is stored after `after` up to `until`: past a hole of a page or more, the page
        is the first events after it.

        Wherever the page comes from, concurrent callers asking for it share one read, and a
        page bounded by a committed offset is kept for RECENT_PAGE_S: a reconnect storm's
        viewers ask for the same few pages. Reading the window once per viewer cost a storm of
        19,000 resumes a third of the gateway's time, most of it in redis-py opening a pool
        connection for every concurrent read (docs/performance.md, finding 23)."""
        last = min(until, after + PAGE)
        if until == UNBOUNDED:
            # PostgreSQL is read up to whatever is stored: one query, past any hole.
            return await self._read_page(site, epoch, after, last, UNBOUNDED, window)
        events = await self._read_page(site, epoch, after, last, last, window)
        if not events and last < until:
            # A hole longer than a page (retention dropped a month, or events whose time was
            # far off went with theirs): the page is the first events past it, not "nothing
            # left" (callers tell the hole by the offsets). Read to `until`, under a key of
            # its own: another caller's bound may end inside the hole.
            events = await self._read_page(site, epoch, after, until, until, False)
        return events

    async def _read_page(
        self, site: str, epoch: str, after: int, last: int, bound: int, window: bool
    ) -> list[Event]:
        """The window's after..last (complete, or not at all) unless `window` is False, else
        PostgreSQL's first PAGE events after..bound (`bound` is `last`, or UNBOUNDED: an
        uncommitted range, read past holes and never kept); shared as `page` says."""
        committed = bound < UNBOUNDED
        key = ("page", site, epoch, after, last, committed, window)
        recent = self._recent_page(key)
        if recent is not None:
            self._metrics.replay_reads.labels("shared").inc()
            return recent

        async def read() -> list[Event]:
            events = await self._broker.window(site, after + 1, last) if window else None
            if events is not None:
                self._metrics.replay_reads.labels("redis").inc()
            else:
                self._metrics.replay_reads.labels("postgres").inc()
                async with self._reads:
                    events = await from_postgres(self._pool, site, epoch, after, PAGE, until=bound)
            if committed:
                self._recent[key] = (time.monotonic() + RECENT_PAGE_S, events)
                if len(self._recent) > RECENT_PAGES:
                    self._recent.popitem(last=False)
            return events

        return await self._shared(key, read)

    def _recent_page(self, key: tuple[object, ...]) -> list[Event] | None:
        now = time.monotonic()
        while self._recent:  # kept for the same time each, so the oldest expires first
            oldest = next(iter(self._recent.values()))
            if oldest[0] > now:
                break
            self._recent.popitem(last=False)
        kept = self._recent.get(key)
        return kept[1] if kept is not None and kept[0] > now else None

    async def forget(self, site: str, after: int) -> bool:
        """Storage went back to `after` (app.gateway.feed): the pages kept of the site, and its
        window beyond `after`, may hold events storage no longer has. False when the window
        could not be cleared (resumes then read it, and take its events for the site's)."""
        self.went_back_seen(site)
        return await self._broker.forget(site, after)

    def went_back_seen(self, site: str) -> None:
        """Storage went back for the site: drop what is kept of it (pages, and the marker
        read as absent a moment ago: the viewers closed elsewhere resume here within a
        second, and must find it)."""
        for key in [k for k in self._recent if k[1] == site]:
            del self._recent[key]
        self._marks.pop(site, None)

    async def went_back(self, site: str) -> tuple[int, int] | None:
        """The broker's went-back marker of the site (app.broker.base), read once a second at
        most per site: every resume of a storm asks."""
        now = time.monotonic()
        kept = self._marks.get(site)
        if kept is not None and kept[0] > now:
            return kept[1]

        async def read() -> tuple[int, int] | None:
            mark = await self._broker.went_back(site)
            self._marks[site] = (time.monotonic() + RECENT_PAGE_S, mark)
            if len(self._marks) > RECENT_PAGES:
                self._marks.pop(next(iter(self._marks)))
            return mark

        return await self._shared(("went_back", site), read, count=False)

    async def head(self, site: str, *, fresh: bool = False) -> int | None:
        """The site's last committed offset. Concurrent callers share one read, unless
        `fresh`: a read that began before a commit does not see it."""

        async def read() -> int | None:
            value = await self._pool.fetchval(
                "SELECT next_offset - 1 FROM sites WHERE id = $1", site
            )
            return None if value is None else int(value)

        async def limited() -> int | None:
            async with self._reads:
                return await read()

        return await (read() if fresh else self._shared(("head", site), limited))

    async def stored(self, site: str, offset: int) -> bool:
        """Whether the event at `offset` can still be read (window or PostgreSQL). Concurrent
        callers asking about the same event share one check (every resume of a storm asks)."""

        async def check() -> bool:
            if await self._broker.window(site, offset, offset):
                return True
            found = await self._pool.fetchval(
                "SELECT 1 FROM events WHERE site = $1 AND site_offset = $2", site, offset
            )
            return found is not None

        return await self._shared(("stored", site, offset), check, count=False)

    async def offset_at(self, site: str, when: datetime) -> int | None:
        """The first offset stored at or after `when` (None if none): the lowest offset of the
        first timestamp. A batch's events share one timestamp, and `ORDER BY ts LIMIT 1` picked
        any of them: a start from "the last N minutes" skipped the batch's events before it
        (an outside test counted 17 of 35). Both steps use the (site, ts) index."""
        value = await self._pool.fetchval(
            """SELECT min(site_offset) FROM events WHERE site = $1 AND ts = (
                   SELECT ts FROM events WHERE site = $1 AND ts >= $2 ORDER BY ts LIMIT 1)""",
            site,
            when,
        )
        return None if value is None else int(value)

    async def resolve(
        self, site: str, epoch: str, live_head: int | None, req: StartRequest
    ) -> Start:
        """Turn a start request into an offset to replay after, and whether a resume is
        complete. `live_head` is how far this gateway's live feed has got (None: unknown).

        A resume (`since`) is judged against what is committed: a cursor beyond the live
        feed's position (an event acknowledged a moment ago, or a feed that fell behind) is
        checked against PostgreSQL's head. When that cannot be read, it raises
        StorageUnavailable (the viewer resumes later); the other starts then go live."""
        if req.since is not None:
            cursor_epoch, since = req.since
            try:
                head = live_head
                if head is None or (cursor_epoch == epoch and since > head):
                    head = await self.head(site)
                if head is not None and cursor_epoch == epoch and since > head:
                    # A shared read may have begun before the cursor's commit: ask once more.
                    head = await self.head(site, fresh=True)
                if head is None:
                    raise StorageUnavailable("site head unknown")
                return await self._resume(site, epoch, head, cursor_epoch, since)
            except STORAGE_ERRORS as exc:
                raise StorageUnavailable(str(exc)) from None
        try:
            head = live_head if live_head is not None else await self.head(site)
            if head is None:
                return Start(None, None)
            if req.last is not None:
                return Start(max(0, head - req.last), None, head=head)
            if req.minutes is not None:
                since_time = datetime.now(UTC) - timedelta(minutes=req.minutes)
                first = await self.offset_at(site, since_time)
                return Start(head if first is None else first - 1, None, head=head)
            return Start(head, None, head=head)
        except STORAGE_ERRORS:
            return Start(None, None)

    async def _resume(
        self, site: str, epoch: str, head: int, cursor_epoch: str, since: int
    ) -> Start:
        if cursor_epoch != epoch:
            return Start(head, False, "epoch_changed", head)
        mark = await self.went_back(site)
        if mark is not None and mark[0] < since <= mark[1]:
            # Storage went back to mark[0]: the events this viewer had after it are gone, and
            # their offsets now belong to others. Replay those others, and say so.
            return Start(mark[0], False, "storage_behind", head)
        if since > head:  # beyond the committed head: no such event was ever acknowledged
            return Start(head, False, "cursor_ahead", head)
        if since == head or await self.stored(site, since + 1):
            return Start(since, True, head=head)
        return Start(since, False, "expired", head)  # retention removed the missed events


async def run_replay(
    replayer: Replayer,
    viewer: Viewer,
    start: Start,
    drained: asyncio.Event,
    on_gap: Callable[[Viewer, int], None],
) -> None:
    """Replay from `start` until the viewer is live. Runs beside the viewer's writer.

    Paced by bytes: an event is queued only while the viewer's queue is under half its cap
    (else the replay waits for the writer to drain it), so a viewer that reads is never
    closed by its replay, whatever the events' sizes. While storage is unreachable a page is
    retried for REPLAY_PATIENCE_S, then the viewer is closed with 4004 (it resumes later from
    its last cursor: nothing is skipped)."""
    if start.after is None:
        _go_live_now(viewer)
        return
    viewer.after = start.after
    target: int | None = start.head
    while target is not None:
        while viewer.after < target and not viewer.closed:
            page = await _read_page(replayer, viewer, target)
            if page is None:
                viewer.fail(CloseCode.STORAGE_UNAVAILABLE)
                return
            if not page:  # retention removed them: say so, skip
                on_gap(viewer, viewer.after)
                viewer.after = target
                break
            for offset, payload in page:
                # Checked per event, not per page: a hole can open inside a page too (an event
                # whose ts was hours off went with its month: app.store.partitions).
                if offset > viewer.after + 1:
                    on_gap(viewer, viewer.after)
                await _wait_for_room(viewer, drained, len(payload))
                if viewer.closed:
                    return
                if not viewer.push_replay(offset, payload):
                    viewer.fail(CloseCode.SLOW_CONSUMER)  # one event over the whole cap
                    return
        if viewer.closed:
            return
        missing = viewer.go_live()
        target = None if missing is None else missing - 1
        if target is not None and viewer.after >= target:
            # Nothing to read: held events did not fit the queue. Let it drain first.
            await _wait_for_room(viewer, drained, viewer.max_bytes // 2)


async def _read_page(replayer: Replayer, viewer: Viewer, target: int) -> list[Event] | None:
    """The next page up to `target`; None when storage stayed unreachable."""
    deadline = time.monotonic() + REPLAY_PATIENCE_S
    while True:
        try:
            return await replayer.page(viewer.site, viewer.epoch, viewer.after, target)
        except STORAGE_ERRORS:
            if time.monotonic() >= deadline or viewer.closed:
                return None
            await asyncio.sleep(REPLAY_RETRY_S)


def _go_live_now(viewer: Viewer) -> None:
    held_from = viewer.go_live()
    while held_from is not None:
        viewer.after = held_from - 1
        held_from = viewer.go_live()


async def _wait_for_room(viewer: Viewer, drained: asyncio.Event, size: int) -> None:
    """Wait until `size` more bytes keep the queue under half its cap (or it is empty): the
    other half is for live events held meanwhile (app.gateway.hub.Viewer)."""
    while (
        viewer.queued_bytes
        and viewer.queued_bytes + size > viewer.max_bytes // 2
        and not viewer.closed
    ):
        drained.clear()
        await drained.wait()


def welcome(
    site: str, epoch: str, start: Start, *, live: bool = True, stats_only: bool = False
) -> bytes:
    """The first frame. `live` False: this gateway's Redis link is down, so events come from
    PostgreSQL, polled (`delivery: "storage"`), until a `delivery` notice says otherwise.
    `stats_only`: the viewer asked for `stats` frames and no events."""
    body: dict[str, object] = {"type": "welcome", "site": site, "epoch": epoch}
    if stats_only:
        body["stats"] = "only"
    body["cursor"] = None if start.after is None else format_cursor(epoch, start.after)
    body["recovered"] = start.recovered
    if start.reason:
        body["reason"] = start.reason
    body["delivery"] = "live" if live else "storage"
    return orjson.dumps(body)
