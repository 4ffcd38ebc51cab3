"""A sampled stream (`sample=N`): at most N events a second reach the viewer, and `sampled`
notices say exactly how many were left out and up to where.

For a person reading a log of a site at thousands of events a second: the whole stream would
scroll faster than anyone reads and cost the bandwidth of every event. The skipping happens
where the viewer's queue is taken (`Viewer.take`), so the hub's fan-out is untouched and a
sampled viewer simply never gets the shared-frame fast path.

Accounting, per notice: `skipped` events were left out since the previous notice (or the
start), the last of them at the cursor `through`; delivered events plus every notice's
`skipped` add up to the events of the stream, exactly. A client's resume cursor is the larger
of its last event's cursor and the last notice's `through` (on SSE the notice carries it as its
`id:`). A notice goes at most once per NOTICE_S, and NOTICE_S after the last skip at the latest
(a timer wakes the viewer when no later event would).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson

from app.gateway.hub import EVENT, NOTICE, Item
from app.wire import format_cursor, parse_whole

#: The fastest sample a viewer may ask for (events a second).
MAX_SAMPLE = 1000
#: Seconds between two `sampled` notices.
NOTICE_S = 1.0


def parse_sample(value: str | None) -> int | None:
    """The `sample` query parameter: absent (every event) or events a second, 1..MAX_SAMPLE."""
    if value in (None, ""):
        return None
    try:
        sample = parse_whole(value)
    except ValueError:
        sample = 0
    if not 1 <= sample <= MAX_SAMPLE:
        raise ValueError(f"sample is a whole number of events a second, 1 to {MAX_SAMPLE}")
    return sample


class Sampler:
    """Keeps at most `per_second` events a second (a token bucket holding a quarter second's
    worth, so the kept events are spread over the second rather than its first instant)."""

    __slots__ = (
        "_clock", "_epoch", "_last_notice", "_seen", "_since", "_timer", "_tokens", "_updated",
        "per_second", "skipped", "through",
    )  # fmt: skip

    def __init__(
        self, epoch: str, per_second: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self._epoch = epoch
        self._clock = clock
        self._tokens = 1.0
        self._updated = clock()
        #: Events skipped since the last notice, and the offset of the last of them.
        self.skipped = 0
        self.through = 0
        #: Events seen (kept or skipped) since `_since`: the rate the notice reports.
        self._seen = 0
        self._since = self._updated
        self._last_notice = self._updated
        self._timer: asyncio.TimerHandle | None = None

    def filter(self, items: list[Item], wake: Callable[[], None]) -> list[Item]:
        """The items to send: notices and the kept events, in order, plus a `sampled` notice
        when one is due. `wake` is called later if skipped events are still unreported."""
        now = self._clock()
        self._refill(now)
        kept: list[Item] = []
        for item in items:
            kind, offset, _ = item
            if kind != EVENT:
                kept.append(item)
                continue
            self._seen += 1
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                kept.append(item)
            else:
                self.skipped += 1
                self.through = offset
        if self.skipped:
            if now - self._last_notice >= NOTICE_S:
                kept.append(self._notice(now))
            elif self._timer is None:
                delay = NOTICE_S - (now - self._last_notice)
                self._timer = asyncio.get_running_loop().call_later(delay, self._due, wake)
        return kept

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self, wake: Callable[[], None]) -> None:
        self._timer = None
        wake()

    def _refill(self, now: float) -> None:
        burst = max(1.0, self.per_second / 4)
        self._tokens = min(burst, self._tokens + (now - self._updated) * self.per_second)
        self._updated = now

    def _notice(self, now: float) -> Item:
        elapsed = max(now - self._since, 1e-3)
        body = {
            "type": "sampled",
            "skipped": self.skipped,
            "through": format_cursor(self._epoch, self.through),
            "rate": round(self._seen / elapsed, 1),
            "sample": self.per_second,
        }
        item = (NOTICE, self.through, orjson.dumps(body))
        self.skipped = 0
        self._seen = 0
        self._since = self._last_notice = now
        return item
