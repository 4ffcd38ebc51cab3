"""Ingest's group commit: `Committer.submit()` returns once the events are committed (a
durable ack). Concurrent callers share one transaction: the flush loop takes whatever is queued
as soon as it is free, up to `commit_max_events` (what arrives while one commit runs forms the
next: no timer, so a lone event is committed at once), and commits it with
app.store.writes.commit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import asyncpg

from app.errors import StorageUnavailable
from app.ingest.metrics import IngestMetrics
from app.schema import NewEvent
from app.servers.postgres import STORAGE_ERRORS
from app.store.writes import Outcome, Stored, commit

log = logging.getLogger(__name__)

#: Called with each commit's new events, in commit order; must not block (it runs in the
#: commit loop: app.ingest.publication.PublishQueue.put).
AfterCommit = Callable[[list[Stored]], None]


#: One submission: its events and the future that receives their outcomes, in order.
_Waiter = tuple[Sequence[NewEvent], asyncio.Future[list[Outcome]]]


class Committer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: IngestMetrics,
        *,
        max_events: int,
        after_commit: AfterCommit,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._max_events = max_events
        self._after_commit = after_commit
        # One future per submission, not per event: a batch of 50 costs one future and one
        # wake-up instead of 50 plus a gather (profiled on the batch benchmark).
        self._queue: deque[_Waiter] = deque()
        self._queued = 0  # events in the queue
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def submit(self, events: Sequence[NewEvent]) -> list[Outcome]:
        """Store `events`; raise StorageUnavailable if PostgreSQL did not confirm the commit."""
        if self._closing:
            raise StorageUnavailable("shutting down")
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._queue.append((events, future))
        self._queued += len(events)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                continue
            await self._flush(self._take())

    def _take(self) -> list[_Waiter]:
        """Whole submissions, oldest first, up to max_events (at least one submission)."""
        batch = [self._queue.popleft()]
        size = len(batch[0][0])
        while self._queue and size + len(self._queue[0][0]) <= self._max_events:
            waiter = self._queue.popleft()
            batch.append(waiter)
            size += len(waiter[0])
        self._queued -= size
        return batch

    async def _flush(self, batch: list[_Waiter]) -> None:
        started = time.perf_counter()
        events = [e for submitted, _ in batch for e in submitted]
        try:
            outcomes = await commit(self._pool, events)
        except STORAGE_ERRORS as exc:
            self._metrics.commit_failures.inc()
            log.warning(
                "group commit failed; nothing in it is acknowledged",
                extra={"events": len(events), "error": type(exc).__name__},
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StorageUnavailable(str(exc)))
            return
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.commit_batch.observe(len(events))
        start = 0
        for submitted, fut in batch:
            end = start + len(submitted)
            if not fut.done():  # the client may have gone away; the events are stored anyway
                fut.set_result(outcomes[start:end])
            start = end
        fresh = [o for o in outcomes if o is not None and not o.duplicate]
        self._metrics.accepted.inc(len(fresh))
        self._metrics.duplicates.inc(sum(1 for o in outcomes if o is not None and o.duplicate))
        if fresh:
            self._after_commit(fresh)
