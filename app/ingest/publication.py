"""Publication off the commit path: committed events queue here and one task hands them to
the broker, in commit order, so an acknowledgement never waits for Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.broker.base import Broker, Publication
from app.ingest.metrics import IngestMetrics
from app.logs import Repeats
from app.store.writes import Stored

log = logging.getLogger(__name__)


#: How long a stopping ingest goes on publishing what is queued: several publications (each
#: bounded by PUBLISH_TIMEOUT_S), so a rolling restart leaves little for the gateways' position
#: check to find.
CLOSE_S = 2.0

#: Most events waiting for publication; beyond it the oldest are dropped (counted as a
#: publish gap: gateways fill it from PostgreSQL). About 10 s of a busy ingest.
PUBLISH_QUEUE_EVENTS = 100_000
#: Most events one publication call carries: a backlog (after Redis hung) goes out in pieces
#: that each fit PUBLISH_TIMEOUT_S, never as one script that would stall Redis itself.
PUBLISH_BATCH_EVENTS = 5_000


class PublishQueue:
    """Publication off the commit path: `put` returns at once, and one task publishes what
    has queued, in commit order, in as few calls as possible.

    A commit's acknowledgement never waits for Redis: a hung Redis (which answers nothing
    and refuses nothing) would otherwise hold every commit after it for the publish timeout.
    Guarantee: at most once and in commit order per site; what is dropped (queue full, Redis
    failed) is counted as `sitewire_ingest_publish_gap_events` and repaired by the gateways
    from PostgreSQL, like any message pub/sub loses.
    """

    def __init__(
        self, broker: Broker, metrics: IngestMetrics, max_events: int = PUBLISH_QUEUE_EVENTS
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        self._max_events = max_events
        self._repeats = Repeats(log)
        self._queue: list[Publication] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publish")
        self._task.add_done_callback(_log_crash)

    def put(self, stored: list[Stored]) -> None:
        # Every newly stored event has its payload (`Stored.payload` is None for retries only,
        # and the committer hands over new events only).
        self._queue += [(s.event.site, s.offset, s.payload) for s in stored if s.payload]
        overflow = len(self._queue) - self._max_events
        if overflow > 0:
            del self._queue[:overflow]
            self._gap(overflow, "publish queue full")
        self._ready.set()

    async def close(self) -> None:
        """Publish what is queued (for at most CLOSE_S), then stop."""
        self._closing = True
        self._ready.set()
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_S):
                await asyncio.shield(self._task)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                batch = self._queue[:PUBLISH_BATCH_EVENTS]
                del self._queue[:PUBLISH_BATCH_EVENTS]
                try:
                    result = await self._broker.publish(batch)
                    self._metrics.published.inc(result.published)
                    if result.lost:
                        self._gap(result.lost, result.why)
                    if result.reused:
                        self._reused(result.reused)
                except Exception:  # a bug: lose this batch (gateways repair it), not the rest
                    log.exception("publishing failed")
                    self._gap(len(batch), "publishing failed")
            if self._closing:
                return

    def _reused(self, sites: tuple[str, ...]) -> None:
        self._metrics.storage_behind.inc(len(sites))
        log.error(
            "offsets published before were handed out again (PostgreSQL went back to an earlier "
            "point); the sites' replay windows were cut back to storage",
            extra={"sites": list(sites)[:20]},
        )

    def _gap(self, count: int, why: str) -> None:
        self._metrics.publish_gap.inc(count)
        self._repeats.write("events stored but not published", {"events": count}, error=why)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        log.critical("background task stopped", extra={"task": task.get_name()}, exc_info=error)
