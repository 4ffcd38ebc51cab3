"""The fanout core, free of I/O: viewers, their bounded queues, per-site order, frames.

Everything here is plain Python driven by method calls, so it is tested synchronously. The
gateway wires it to sockets (app.gateway.transports.websocket) and to Redis (app.broker.redis).

- `Viewer` holds one connection's queue, capped in bytes. `push` never blocks: when the cap
  would be exceeded it returns False and the caller closes the viewer as a slow consumer.
- `Hub` maps sites to viewers (a viewer's first arrival and last departure are what the
  gateway subscribes and unsubscribes on) and fans events out to all of a site's viewers:
  caught-up viewers get ready WebSocket frames, built once per burst (one per 256 KB) and
  written as the same bytes through their `sink`; the others get the same payloads queued.
- `Sequencer` puts a site's events in offset order, drops duplicates and reports gaps.
- `ws_frames` / `sse_chunk` turn a drained queue into as few writes as possible.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import NamedTuple

import orjson

#: Queue item kinds.
EVENT = 0
NOTICE = 1
#: A queued item: (kind, offset, payload); a notice's offset is 0 unless it moves the cursor.
Item = tuple[int, int, bytes]

#: Largest coalesced WebSocket frame; more pending events are split over several frames.
MAX_FRAME_BYTES = 256 * 1024

_ids = itertools.count(1)


class Viewer:
    """One connected viewer's bounded queue. `wake` is called when the queue goes non-empty."""

    __slots__ = (
        "_held", "_items", "after", "close_code", "closed", "epoch", "held_bytes", "held_top",
        "id", "max_bytes", "queued_bytes", "sample", "sink", "site", "wake",
    )  # fmt: skip

    def __init__(
        self,
        site: str,
        epoch: str,
        max_bytes: int,
        wake: Callable[[], None],
        after: int = 0,
    ) -> None:
        self.id = next(_ids)
        self.site = site
        self.epoch = epoch
        self.max_bytes = max_bytes
        self.wake = wake
        #: Offset of the last event queued; events at or below it are duplicates and skipped.
        self.after = after
        self.queued_bytes = 0
        self.closed = False
        #: Set by `fail`: the connection must be closed with this code.
        self.close_code: int | None = None
        #: A list, not a deque: `take` swaps it out whole, and an empty list costs 56 bytes
        #: where an empty deque keeps a 0.5 KiB block (10,000 idle viewers: 5 MiB).
        self._items: list[tuple[int, int, bytes]] = []
        #: Live events that arrived while the viewer was still replaying (None once live).
        self._held: list[tuple[int, bytes]] | None = None
        self.held_bytes = 0
        #: The last live offset dropped from `_held` when it outgrew its share of the cap (0:
        #: none). The replay reads up to it from storage instead.
        self.held_top = 0
        #: The connection's `transport.write` while it can take a ready WebSocket frame now
        #: (open, not closing, not held back by flow control); None otherwise, and always for
        #: viewers that go through the queue (SSE). The connection switches it on and off, so
        #: the hub's loop over 1,000 viewers makes one C call per viewer, not two Python ones.
        self.sink: Callable[[bytes], object] | None = None
        #: A sampled stream's filter (app.gateway.sampling.Sampler.filter), applied as the queue
        #: is taken; such a viewer never gets `sink` (its frames are not the shared ones).
        self.sample: Callable[[list[Item], Callable[[], None]], list[Item]] | None = None

    def push(self, offset: int, payload: bytes) -> bool:
        """Queue a live event. False means the cap would be exceeded: close this viewer as
        slow. While replaying, live events are held aside, in half the cap: beyond that they
        are dropped and the replay reads them from storage instead (every live event is
        committed), so a replaying viewer is never closed for what arrives meanwhile."""
        if offset <= self.after:
            return True
        if self._held is not None:
            if self.held_bytes + len(payload) > self.max_bytes // 2:
                self._held.clear()
                self.held_bytes = 0
                self.held_top = offset
                return True
            self._held.append((offset, payload))
            self.held_bytes += len(payload)
            return True
        return self.push_replay(offset, payload)

    def push_replay(self, offset: int, payload: bytes) -> bool:
        """Queue an event read from storage (in offset order)."""
        if offset <= self.after:
            return True
        if not self._append(EVENT, offset, payload):
            return False
        self.after = offset
        return True

    def start_replay(self) -> None:
        """From now on live events are held until `go_live` (call before joining the hub)."""
        self._held = []

    def go_live(self) -> int | None:
        """Move held live events behind the replayed ones. Returns None when the viewer is
        live, or the first held offset when storage must be read up to just before it (the
        replay has not reached the live stream yet)."""
        if self._held is None:
            return None
        if self.held_top > self.after:  # live events were dropped: read storage up to them
            return self.held_top + 1
        # Moved out of the held bytes before they are queued, so that queue plus held stays
        # within the cap and no push fails halfway.
        held, self._held, self.held_bytes = self._held, None, 0
        for index, (offset, payload) in enumerate(held):
            if offset <= self.after:
                continue
            if offset != self.after + 1 or not self.push_replay(offset, payload):
                # A gap before it, or no room for it: storage is read up to just before it.
                self._held = held[index:]
                self.held_bytes = sum(len(p) for _, p in self._held)
                return offset
        return None

    def push_notice(self, frame: bytes) -> bool:
        return self._append(NOTICE, 0, frame)

    def _append(self, kind: int, offset: int, data: bytes) -> bool:
        if self.closed:
            return True
        if self.queued_bytes + self.held_bytes + len(data) > self.max_bytes:
            return False
        was_empty = not self._items
        self._items.append((kind, offset, data))
        self.queued_bytes += len(data)
        if was_empty:
            self.wake()
        return True

    def take(self) -> list[Item]:
        """Everything queued, oldest first (a sampled viewer: what its sample keeps); the queue
        is empty afterwards."""
        items, self._items = self._items, []
        self.queued_bytes = 0
        if self.sample is not None and not self.closed:
            return self.sample(items, self.wake)
        return items

    def fail(self, code: int) -> bool:
        """Ask the connection to close with `code` (slow consumer, drain, protocol error).
        True the first time: the caller counts the close then, so each is counted once."""
        first = self.close_code is None
        if first:
            self.close_code = code
        self.release()
        self.wake()
        return first

    def release(self) -> None:
        """Drop the queue (the connection is gone) so its memory is freed at once."""
        self.closed = True
        self.sink = None
        self._items = []
        self.queued_bytes = 0
        self._held = None
        self.held_bytes = 0


class Fanout(NamedTuple):
    """What one `Hub.publish_many` did."""

    slow: list[Viewer]  # viewers whose queue overflowed (to be closed)
    frames: int  # shared frames written straight to caught-up viewers (one per viewer each)
    events: int  # events those frames carried, counted per viewer


class Hub:
    def __init__(self) -> None:
        self._sites: dict[str, dict[int, Viewer]] = {}

    def add(self, viewer: Viewer) -> bool:
        """Register a viewer; True when it is the site's first (subscribe now)."""
        viewers = self._sites.setdefault(viewer.site, {})
        viewers[viewer.id] = viewer
        return len(viewers) == 1

    def remove(self, viewer: Viewer) -> bool:
        """Unregister a viewer; True when it was the site's last (unsubscribe soon)."""
        viewers = self._sites.get(viewer.site)
        if viewers is None or viewers.pop(viewer.id, None) is None:
            return False
        if viewers:
            return False
        del self._sites[viewer.site]
        return True

    def count(self, site: str) -> int:
        return len(self._sites.get(site, ()))

    def sites(self) -> list[str]:
        return list(self._sites)

    def viewers(self, site: str | None = None) -> Iterator[Viewer]:
        if site is not None:
            yield from list(self._sites.get(site, {}).values())
            return
        for viewers in list(self._sites.values()):
            yield from list(viewers.values())

    def publish_many(self, site: str, events: list[tuple[int, bytes]]) -> Fanout:
        """Deliver consecutive events to every viewer of `site`. Viewers that are caught up get
        ready WebSocket frames, built once and written as the same bytes to each of them (one
        frame per MAX_FRAME_BYTES of events); the others get the events queued."""
        slow: dict[int, Viewer] = {}
        frames = direct = 0
        for chunk in _frame_sized(events):
            written = self._publish_frame(site, chunk, slow)
            frames += written
            direct += written * len(chunk)
        return Fanout(list(slow.values()), frames, direct)

    def _publish_frame(
        self, site: str, events: list[tuple[int, bytes]], slow: dict[int, Viewer]
    ) -> int:
        """Returns how many viewers the frame was written to."""
        before, last = events[0][0] - 1, events[-1][0]
        frame: bytes | None = None  # built when the first viewer can take it
        written = 0
        # The hot loop of a busy gateway (a frame to each of 1,000 viewers), so the checks are
        # inline. A frame may go straight out only when nothing is queued or held and it is
        # exactly next in line (order and exactly-once); `release` clears `sink`, so a closed
        # viewer never passes.
        for viewer in self._sites.get(site, {}).values():
            sink = viewer.sink
            if (
                sink is not None
                and viewer.after == before
                and not viewer._items
                and viewer._held is None
            ):
                if frame is None:
                    frame = ws_broadcast_frame([p for _, p in events])
                if frame:
                    try:
                        sink(frame)
                        viewer.after = last
                        written += 1
                        continue
                    except RuntimeError:  # uvloop: its transport closed under us; queued
                        viewer.sink = None  # instead, and connection_lost drops the lot
            if viewer.id in slow:  # overflowed on an earlier piece: it is being closed
                continue
            for offset, payload in events:
                if not viewer.push(offset, payload):
                    slow[viewer.id] = viewer
                    break
        return written

    def notice(self, site: str, frame: bytes) -> list[Viewer]:
        """Queue a notice of the site's live feed for its viewers; returns those whose queue
        overflowed. Viewers still replaying are skipped: their welcome may not be queued yet,
        and their replay reads storage, so a gap in the live feed reaches them as a gap in
        what they hold (which the replay fills, or reports itself)."""
        slow = []
        for viewer in self._sites.get(site, {}).values():
            if viewer._held is None and not viewer.push_notice(frame):
                slow.append(viewer)
        return slow

    def queued_bytes(self) -> int:
        return sum(v.queued_bytes for v in self.viewers())


class Sequencer:
    """Delivers a site's events in offset order, exactly once, and spots gaps.

    Offsets are gapless per site (app.store.writes), so a jump from N to N+3 means two events were
    published out of order (two ingest replicas) or lost (Redis pub/sub drops messages across
    reconnects). They are held until the gap is filled (`fill`) or abandoned (`skip`).
    """

    def __init__(self, last: int | None = None, max_held: int = 10_000) -> None:
        #: The last offset released; None until the first event fixes the baseline.
        self.last = last
        self.max_held = max_held
        self._held: dict[int, bytes] = {}

    def offer(self, offset: int, payload: bytes) -> list[tuple[int, bytes]]:
        if self.last is None:
            self.last = offset - 1
        if offset == self.last + 1 and not self._held:  # the usual case, in order
            self.last = offset
            return [(offset, payload)]
        if offset <= self.last or offset in self._held:
            return []
        self._held[offset] = payload
        ready = self._release()
        if len(self._held) > self.max_held:  # never hold without bound: give the gap up
            ready += self.skip()
        return ready

    def offer_many(self, events: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """`offer` for a burst: the usual burst (in order, nothing held) is returned as is."""
        if not events:
            return events
        if self.last is None:
            self.last = events[0][0] - 1
        if not self._held:
            expected = self.last + 1
            for offset, _ in events:
                if offset != expected:
                    break
                expected += 1
            else:
                self.last = expected - 1
                return events
        ready = []
        for offset, payload in events:
            ready += self.offer(offset, payload)
        return ready

    def fill(self, events: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """Add events fetched to repair a gap; return what can now be released."""
        for offset, payload in events:
            if self.last is None or offset > self.last:
                self._held.setdefault(offset, payload)
        return self._release()

    def missing(self) -> tuple[int, int] | None:
        """(first, last) missing offsets while events wait behind a gap, else None."""
        if not self._held or self.last is None:
            return None
        return self.last + 1, min(self._held) - 1

    def skip(self) -> list[tuple[int, bytes]]:
        """Give up the current gap: release what is held from its lowest offset on."""
        if not self._held:
            return []
        self.last = min(self._held) - 1
        return self._release()

    def _release(self) -> list[tuple[int, bytes]]:
        ready = []
        assert self.last is not None
        while (self.last + 1) in self._held:
            self.last += 1
            ready.append((self.last, self._held.pop(self.last)))
        return ready


def ws_frames(items: list[tuple[int, int, bytes]]) -> list[bytes]:
    """Coalesce queued items into WebSocket text frames: runs of events become one
    `{"type":"events","events":[...]}` frame (split at MAX_FRAME_BYTES); notices stay alone."""
    frames: list[bytes] = []
    run: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if run:
            frames.append(b'{"type":"events","events":[' + b",".join(run) + b"]}")
            run.clear()
            size = 0

    for kind, _, data in items:
        if kind == NOTICE:
            flush()
            frames.append(data)
            continue
        if size + len(data) > MAX_FRAME_BYTES:
            flush()
        run.append(data)
        size += len(data) + 1
    flush()
    return frames


def _frame_sized(events: list[tuple[int, bytes]]) -> Iterator[list[tuple[int, bytes]]]:
    """Consecutive runs of `events` that fit one frame of MAX_FRAME_BYTES. A gateway that fell
    behind gets big bursts; sent as one oversized frame they would go through every viewer's
    queue event by event, which made it fall further behind."""
    start, size = 0, 0
    for i, (_, payload) in enumerate(events):
        if size + len(payload) + 1 > MAX_FRAME_BYTES - 64 and i > start:
            yield events[start:i]
            start, size = i, 0
        size += len(payload) + 1
    if start < len(events):
        yield events[start:]


def ws_broadcast_frame(payloads: list[bytes]) -> bytes:
    """One complete server-to-client WebSocket text frame carrying an `events` message.
    Server frames are unmasked and we never compress, so these bytes are valid on every
    connection. Empty when too large for one frame (those go through the queues)."""
    body = b'{"type":"events","events":[' + b",".join(payloads) + b"]}"
    size = len(body)
    if size > MAX_FRAME_BYTES:
        return b""
    if size < 126:
        header = bytes((0x81, size))
    elif size < 65536:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + body


def sse_chunk(items: list[tuple[int, int, bytes]], epoch: str) -> bytes:
    """All queued items as one SSE write. Events use the default `message` type with the
    cursor as `id:` (so a browser's Last-Event-ID resumes); notices carry their own type."""
    parts: list[bytes] = []
    for kind, offset, data in items:
        if kind == EVENT:
            parts.append(b"id: %s-%d\ndata: %s\n\n" % (epoch.encode(), offset, data))
        else:  # notices are rare: reading their type back is cheaper than carrying it
            kind_name = orjson.loads(data)["type"].encode()
            if offset:  # a notice that moves the cursor (`sampled`): Last-Event-ID follows it
                parts.append(b"id: %s-%d\n" % (epoch.encode(), offset))
            parts.append(b"event: %s\ndata: %s\n\n" % (kind_name, data))
    return b"".join(parts)


def event_count(items: list[tuple[int, int, bytes]]) -> int:
    return sum(1 for kind, _, _ in items if kind == EVENT)


def event_age_s(payload: bytes, now: float) -> float | None:
    """Seconds since the event's server timestamp (`ts`, the last field app.wire writes),
    for the publish-to-send latency histogram; None if it cannot be read."""
    at = payload.rfind(b'"ts":"')
    if at < 0:
        return None
    try:
        ts = datetime.fromisoformat(payload[at + 6 : at + 30].decode())
    except ValueError:
        return None
    return now - ts.timestamp()
