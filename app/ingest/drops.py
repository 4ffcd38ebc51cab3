"""Counting dropped events where a site owner can see them (app/store/drops.py).

A bot's request is answered 202 at once (trackers must not retry) and nothing is stored; the
count is kept in memory and added to PostgreSQL every FLUSH_S, in one statement for all sites,
so a crawler storm costs a dictionary update per request, not a write. Guarantee: best effort.
Counts not yet written are lost if the process is killed (at most FLUSH_S of them), and kept
for the next flush while PostgreSQL does not answer, up to MAX_KEYS distinct (site, day,
reason); beyond that new keys are not counted (logged once per flush).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import asyncpg

from app.servers.postgres import STORAGE_ERRORS
from app.store import drops
from app.store.salts import utc_today
from app.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Seconds between two writes of the counts.
FLUSH_S = 1.0
#: Most (site, day, reason) counts held between writes.
MAX_KEYS = 10_000


class DropCounts:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._counts: Counter[drops.DropKey] = Counter()
        self._refused = 0
        self._task: asyncio.Task[None] | None = None

    def count(self, site: str, reason: str, events: int = 1) -> None:
        key = (site, utc_today(), reason)
        if key in self._counts or len(self._counts) < MAX_KEYS:
            self._counts[key] += events
        else:
            self._refused += events

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="drop counts")

    async def close(self) -> None:
        """Stop, writing what is counted (once, briefly: a stop must not hang on storage)."""
        await cancel_and_wait([self._task])
        try:
            async with asyncio.timeout(2.0):
                await self.flush()
        except (TimeoutError, *STORAGE_ERRORS):
            log.warning(
                "dropped-event counts not written at stop", extra={"keys": len(self._counts)}
            )

    async def flush(self) -> None:
        """Write the counts; on failure they are kept for the next flush."""
        if self._refused:
            log.warning("dropped-event counts over their bound", extra={"events": self._refused})
            self._refused = 0
        counts, self._counts = self._counts, Counter()
        try:
            await drops.add(self._pool, counts)
        except BaseException:
            counts.update(self._counts)  # counted meanwhile
            self._counts = counts
            raise

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except STORAGE_ERRORS as exc:
                log.warning("dropped-event counts not written", extra={"error": repr(exc)})
