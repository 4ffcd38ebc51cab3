"""Ingest's group commit: `Committer.submit()` returns once the events are committed (a
durable ack). Concurrent callers share one transaction: the flush loop takes whatever is queued
as soon as it is free, up to `commit_max_events` (what arrives while one commit runs forms the
next: no timer, so a lone event is committed at once), and commits it with
app.store.writes.commit.

What waits is bounded, whatever PostgreSQL does (an outside test hung it and found requests
held for up to 70 s, and 14,565 connections with 300 MB more memory): at most `max_queued`
events wait for a commit, more are refused at once; a commit PostgreSQL has not confirmed
within `timeout_s` is given up: its requests are answered (their events may or may not be
stored, and a retry with the same ids is safe either way), the pool's connections are
replaced (they may be dead: a NAT that forgot them), and the next commit starts. The commit
given up goes on in the background until asyncpg's own timeout ends it; what it stores is
published then. While MAX_ABANDONED of them are still running, storage is taken to be
hung: submissions, and what is queued, are refused at once; and when a commit fails, what
is queued behind it fails with it. So a request waits at most about twice `timeout_s`
(behind one commit given up, then in one)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import asyncpg

from app.errors import StorageUnavailable
from app.ingest.metrics import IngestMetrics
from app.logs import Repeats
from app.schema import NewEvent
from app.servers.postgres import STORAGE_ERRORS, describe_error
from app.store.writes import Outcome, Stored, commit

log = logging.getLogger(__name__)

#: Commits given up and still running (each holds a pool connection) before submissions are
#: refused at once rather than queued.
MAX_ABANDONED = 2

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
        timeout_s: float,
        max_queued: int,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._max_events = max_events
        self._after_commit = after_commit
        self._timeout_s = timeout_s
        self._max_queued = max_queued
        self._repeats = Repeats(log)
        #: Commits given up on (timed out), still running in the background.
        self._abandoned: set[asyncio.Task[list[Outcome]]] = set()
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
        """Commit what is queued (within the same bounds as ever), then stop. Commits given
        up and still running get one more `timeout_s` to end (what they store is published),
        then are cancelled: what they may have stored is then found by the gateways' position
        check, as after an ingest killed between commit and publication."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._abandoned:
            _, running = await asyncio.wait(set(self._abandoned), timeout=self._timeout_s)
            for task in running:
                task.cancel()

    async def submit(self, events: Sequence[NewEvent]) -> list[Outcome]:
        """Store `events`; raise StorageUnavailable if PostgreSQL did not confirm the commit
        (`maybe_stored` once it was sent), or at once when storage is taken to be hung or
        `max_queued` events already wait."""
        if self._closing:
            raise StorageUnavailable("shutting down")
        if len(self._abandoned) >= MAX_ABANDONED:
            self._metrics.commit_refusals.labels("hung").inc(len(events))
            raise StorageUnavailable("storage is not answering")
        if self._queued + len(events) > self._max_queued:
            self._metrics.commit_refusals.labels("queue_full").inc(len(events))
            raise StorageUnavailable("too many events are waiting for storage")
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
            if len(self._abandoned) >= MAX_ABANDONED:
                # Storage is taken to be hung: what waits is answered now, not one commit
                # timeout after another (10,000 queued events would wait ~55 s).
                batch = self._take_all()
                self._metrics.commit_refusals.labels("hung").inc(sum(len(s) for s, _ in batch))
                _fail(batch, StorageUnavailable("storage is not answering"))
                continue
            await self._flush(self._take())

    def _take_all(self) -> list[_Waiter]:
        batch = list(self._queue)
        self._queue.clear()
        self._queued = 0
        return batch

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
        task = asyncio.ensure_future(commit(self._pool, events))
        done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        if not done:
            await self._abandon(task, batch)
            return
        try:
            outcomes = task.result()
        except STORAGE_ERRORS as exc:
            self._metrics.commit_failures.inc()
            self._repeats.write(
                "group commit failed; nothing in it is acknowledged",
                {"events": len(events)},
                error=describe_error(exc),
            )
            _fail(batch, StorageUnavailable(str(exc), maybe_stored=_maybe_sent(exc)))
            # What waits behind it would meet the same failure, one commit attempt after
            # another (each as long as a connection attempt: 20 queued commits waited 40 s
            # on a PostgreSQL that took connections and never answered). Answered now.
            _fail(self._take_all(), StorageUnavailable("storage is unavailable"))
            return
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.commit_batch.observe(len(events))
        start = 0
        for submitted, fut in batch:
            end = start + len(submitted)
            if not fut.done():  # the client may have gone away; the events are stored anyway
                fut.set_result(outcomes[start:end])
            start = end
        self._stored(outcomes)

    def _stored(self, outcomes: list[Outcome]) -> None:
        fresh = [o for o in outcomes if o is not None and not o.duplicate]
        self._metrics.accepted.inc(len(fresh))
        self._metrics.duplicates.inc(sum(1 for o in outcomes if o is not None and o.duplicate))
        if fresh:
            self._after_commit(fresh)

    async def _abandon(self, task: asyncio.Task[list[Outcome]], batch: list[_Waiter]) -> None:
        """PostgreSQL has not confirmed the commit in time: answer its requests now, and
        leave it to end by itself (asyncpg's command timeout)."""
        self._metrics.commit_failures.inc()
        log.warning(
            "group commit not confirmed in time; its requests are answered 503 (retries with "
            "the same ids are safe) and the pool's connections replaced",
            extra={"events": sum(len(s) for s, _ in batch), "timeout_s": self._timeout_s},
        )
        _fail(batch, StorageUnavailable("storage did not answer in time", maybe_stored=True))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned_done)
        # They may all be dead (a NAT that forgot them, a PostgreSQL that failed over): the
        # next commit opens a fresh one rather than waiting on the next dead one in turn.
        await self._pool.expire_connections()

    def _abandoned_done(self, task: asyncio.Task[list[Outcome]]) -> None:
        self._abandoned.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.info("a commit given up has failed", extra={"error": describe_error(exc)})
            return
        outcomes = task.result()
        # Stored after its requests were answered 503: their retries are duplicates, and the
        # events go out to viewers as any others.
        log.warning(
            "a commit given up was confirmed late; its events are stored and published",
            extra={"events": len(outcomes)},
        )
        self._stored(outcomes)


def _fail(batch: list[_Waiter], error: StorageUnavailable) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(error)


def _maybe_sent(exc: BaseException) -> bool:
    """Whether a failed commit may have been committed all the same: not when PostgreSQL
    answered with an error (the transaction was rolled back) or the connection was refused,
    but when the connection was lost or timed out with the commit sent."""
    return not isinstance(exc, asyncpg.PostgresError | ConnectionRefusedError)
