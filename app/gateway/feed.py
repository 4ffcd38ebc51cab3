"""A gateway's live feeds, one per site it has viewers for.

- Subscriptions are reference-counted: the first local viewer of a site subscribes (under a
  per-site lock, rolled back on failure), the last one leaving schedules an unsubscribe after
  `unsubscribe_delay_s` that checks the count again (a reconnecting viewer keeps it warm).
- Messages come in bursts: everything read from Redis in one turn of the event loop, grouped
  by site (app.broker.pubsub.PubSubConnection). Each message's offset is read without decoding the
  JSON (app.wire.event_offset), the site's `Sequencer` puts them in order, and the hub sends a
  site's burst to each viewer as one frame. This batches without a timer: what arrives while
  the gateway writes one burst's frames is the next burst, so a busy gateway sends fewer,
  fuller frames and an idle one sends each event at once (docs/decisions.md).
- Gaps (an offset skipped: out-of-order publication by two ingest replicas, or a message Redis
  pub/sub dropped) are held for `gap_hold_ms`, then repaired from the Redis window, else from
  PostgreSQL. Only when both fail do viewers get a `gap` notice with `recovered: false`.
- A periodic position check compares each site's head in PostgreSQL with what was delivered,
  which catches a lost *last* message that no later offset would reveal.
- A site whose live events cannot arrive (its Redis link is down, stalled or not yet
  confirmed: `Subscriptions.holds`, app.broker.base) is served from PostgreSQL instead, polled every
  `POLL_S`, until the link is back; viewers are told with a `delivery` notice each way
  (docs/protocol.md). A gateway started while Redis is down serves every site this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import asyncpg
import orjson

from app.broker.base import Broker, BrokerUnavailable, Burst
from app.codes import CloseCode
from app.gateway.hub import Hub, Sequencer, Viewer
from app.gateway.metrics import DeliveryStats, GatewayMetrics
from app.gateway.replay import UNBOUNDED, Replayer, Start, StartRequest, welcome
from app.logs import Repeats
from app.names import Names
from app.servers.postgres import STORAGE_ERRORS
from app.settings import Settings
from app.store.reads import site_heads
from app.store.sites import get_site
from app.tasks import cancel_and_wait
from app.wire import Event, event_offset, format_cursor, went_back

log = logging.getLogger(__name__)

#: Seconds between position checks of every subscribed site.
POSITION_CHECK_S = 2.0
#: Seconds between two reads of PostgreSQL for the sites whose Redis link is down.
POLL_S = 0.5
#: How long a site's first viewer waits for Redis to confirm its subscription before the
#: site is served from storage (the subscription stays pending and goes live when confirmed).
SUBSCRIBE_CONFIRM_S = 2.0
#: How long a gap repair keeps trying while storage is unreachable before it gives the gap
#: up (a `gap` notice with `recovered: false`); the site's later events wait meanwhile.
REPAIR_PATIENCE_S = 10.0
#: Seconds between two repair attempts while storage is unreachable.
REPAIR_RETRY_S = 0.5


class Feeds:
    def __init__(
        self,
        hub: Hub,
        settings: Settings,
        broker: Broker,
        pool: asyncpg.Pool,
        metrics: GatewayMetrics,
        stats: DeliveryStats,
        replayer: Replayer,
    ) -> None:
        self.hub = hub
        self.stats = stats
        self._replayer = replayer
        self._settings = settings
        self._names = Names(settings.key_prefix)
        self._pool = pool
        self._metrics = metrics
        # With Redis: one pub/sub connection per server (per node in a Cluster), carrying
        # every site there (app.broker.redis).
        self.subscriptions = broker.subscriptions(
            self.on_burst, self.on_reconnect, metrics.redis_reconnect_attempts.inc
        )
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._seq: dict[str, Sequencer] = {}
        self._epochs: dict[str, str] = {}
        self._unsubscribes: dict[str, asyncio.Task[None]] = {}
        self._repairs: dict[str, asyncio.Task[None]] = {}
        #: Reconnected sites whose storage could not be read yet (`on_reconnect`), windows
        #: being cleared (`_went_back`).
        self._later: set[asyncio.Task[None]] = set()
        #: A restore finds every subscribed site at once: one line per 10 s, not per site.
        self._behind_log = Repeats(log, level=logging.ERROR)
        self._checker: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        #: Sites served from storage because their live events cannot arrive.
        self._polled: set[str] = set()

    def start(self) -> None:
        self.subscriptions.start()
        self._checker = asyncio.create_task(self._check_positions(), name="position-check")
        self._poller = asyncio.create_task(self._poll_forever(), name="storage-poll")

    async def close(self) -> None:
        await cancel_and_wait(
            [
                self._checker,
                self._poller,
                *self._later,
                *self._unsubscribes.values(),
                *self._repairs.values(),
            ]
        )
        await self.subscriptions.close()

    # -- viewers come and go ---------------------------------------------------------------

    async def join(self, viewer: Viewer) -> None:
        """Add a viewer; subscribe to its site first if it is the first local viewer."""
        site = viewer.site
        self.hub.add(viewer)
        pending = self._unsubscribes.pop(site, None)
        if pending is not None:
            pending.cancel()
        try:
            async with self._locks[site]:
                if site not in self._seq:
                    await self._subscribe(site, viewer.epoch)
        except BaseException:
            self.leave(viewer)
            raise
        self._metrics.subscriptions.set(len(self._seq))

    async def admit(self, viewer: Viewer, req: StartRequest) -> Start:
        """Join a new viewer to its site's feed (live events held aside), decide where its
        stream starts, and queue its welcome; `run_replay` then takes it to live. Raises
        app.gateway.replay.StorageUnavailable when a resume cannot be judged now."""
        viewer.start_replay()
        await self.join(viewer)
        site = viewer.site
        try:
            start = await self._replayer.resolve(site, viewer.epoch, self.head(site), req)
        except BaseException:  # StorageUnavailable included: the viewer resumes later
            self.leave(viewer)
            raise
        if start.after is not None:
            self.note_head(site, start.head)
        viewer.push_notice(welcome(site, viewer.epoch, start, live=self.live(site)))
        return start

    async def _subscribe(self, site: str, epoch: str) -> None:
        # Baseline: the site's head before subscribing, so an event published in between is
        # seen as a gap (and repaired) rather than silently missed.
        head = None
        with contextlib.suppress(*STORAGE_ERRORS):
            found = await get_site(self._pool, site)
            head = found.next_offset - 1 if found else None
        try:
            await self.subscriptions.subscribe(site, confirm_within=SUBSCRIBE_CONFIRM_S)
        except (TimeoutError, BrokerUnavailable) as exc:
            # The subscriber keeps the site and subscribes it when Redis answers; until then
            # the poll serves it from PostgreSQL.
            log.warning(
                "subscribe failed; serving the site from storage",
                extra={"site": site, "error": repr(exc)},
            )
        self._seq[site] = Sequencer(head)
        self._epochs[site] = epoch

    def note_head(self, site: str, head: int) -> None:
        """A committed head a viewer resolved its start against: the site's baseline, if the
        feed has none yet (storage was down when it subscribed). A baseline read later could
        be past events this viewer, live by then, still needs."""
        seq = self._seq.get(site)
        if seq is not None and seq.last is None:
            seq.last = head

    def live(self, site: str) -> bool:
        """Whether the site's events arrive live (else this gateway polls storage for them)."""
        return site not in self._polled and self.subscriptions.holds(site)

    def leave(self, viewer: Viewer) -> None:
        viewer.release()
        if self.hub.remove(viewer) and viewer.site not in self._unsubscribes:
            self._unsubscribes[viewer.site] = asyncio.create_task(
                self._unsubscribe_later(viewer.site), name=f"unsubscribe {viewer.site}"
            )

    async def _unsubscribe_later(self, site: str) -> None:
        await asyncio.sleep(self._settings.unsubscribe_delay_s)
        # From here on a joining viewer waits for the lock instead of cancelling this task: a
        # cancel halfway through an unsubscribe would leave the site unsubscribed but still
        # listed in `_seq`, and never subscribed again.
        self._unsubscribes.pop(site, None)
        async with self._locks[site]:
            if self.hub.count(site) == 0 and site in self._seq:
                await self.subscriptions.unsubscribe(site)
                del self._seq[site]
                self._epochs.pop(site, None)
                self._polled.discard(site)
                repair = self._repairs.pop(site, None)
                if repair is not None:
                    repair.cancel()
        if self.hub.count(site) == 0:  # a viewer that joined meanwhile may wait on this lock
            self._locks.pop(site, None)
        self._metrics.subscriptions.set(len(self._seq))

    def head(self, site: str) -> int | None:
        """The last offset delivered live for `site` on this gateway (None: not known yet)."""
        seq = self._seq.get(site)
        return None if seq is None else seq.last

    # -- events arrive ----------------------------------------------------------------------

    def on_burst(self, burst: Burst) -> None:
        """Messages read from Redis at once, by site: each site's go out together, one frame
        per viewer for the lot."""
        for site, payloads in burst.items():
            self.on_messages(site, payloads)

    def on_messages(self, site: str, payloads: list[bytes]) -> None:
        seq = self._seq.get(site)
        if seq is None:
            return
        events: list[Event] = []
        for payload in payloads:
            offset = event_offset(payload)
            if offset is not None:
                events.append((offset, payload))
                continue
            mark = went_back(payload)
            if mark is None:
                log.error("dropped a malformed publication", extra={"site": site})
                continue
            # Ingest found the site's offsets handed out again: what came before goes out as
            # it was, what follows through a feed that starts again where storage went back.
            self._deliver(site, seq.offer_many(events))
            events = []
            self._replayer.went_back_seen(site)
            if seq.last is not None and seq.last > mark[0]:
                self._went_back(site, mark[0], seq.last)
                seq = self._seq[site]
        self._deliver(site, seq.offer_many(events))
        if seq.missing() is not None and site not in self._repairs:
            self._repairs[site] = asyncio.create_task(self._repair(site), name=f"repair {site}")

    def _deliver(self, site: str, events: list[Event]) -> None:
        if not events:
            return
        sent = self.hub.publish_many(site, events)
        self.stats.direct(sent.frames, sent.events, events)
        for viewer in sent.slow:
            self._slow(viewer)

    def _slow(self, viewer: Viewer) -> None:
        viewer.fail(CloseCode.SLOW_CONSUMER)  # counted where the close is written

    def notice(self, site: str, body: dict[str, object]) -> None:
        frame = orjson.dumps(body)
        for viewer in self.hub.notice(site, frame):
            self._slow(viewer)

    # -- gaps -------------------------------------------------------------------------------

    async def _repair(self, site: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self._settings.gap_hold_ms / 1000)
            patience = loop.time() + REPAIR_PATIENCE_S
            seq = self._seq.get(site)
            while seq is not None and (gap := seq.missing()) is not None:
                first, last = gap
                events = await self._read(site, first - 1, last)
                seq = self._seq.get(site)
                if seq is None or seq.missing() != gap:
                    # Filled meanwhile (a catch-up, a late publication) or changed: look again,
                    # rather than give up a gap that is no longer there (an outside test saw a
                    # "missing" notice after the very events it named had arrived).
                    continue
                if events is None and loop.time() < patience:  # storage unreachable: retry
                    await asyncio.sleep(REPAIR_RETRY_S)
                    continue
                if not events:  # removed by retention, or storage down for too long
                    self._give_up(site, seq, first - 1)
                    break
                self._deliver(site, seq.fill(events))
        finally:
            self._repairs.pop(site, None)

    async def _read(
        self, site: str, after: int, until: int, *, window: bool = True
    ) -> list[Event] | None:
        """A page of stored events after..until (window, else PostgreSQL: app.gateway.replay); None
        when storage could not be read."""
        epoch = self._epochs.get(site)
        if epoch is None:  # unsubscribed meanwhile (its last viewer left): nothing to fill
            return None
        try:
            return await self._replayer.page(site, epoch, after, until, window=window)
        except STORAGE_ERRORS:
            return None

    def _give_up(self, site: str, seq: Sequencer, after: int) -> None:
        epoch = self._epochs.get(site)
        if epoch is None:  # unsubscribed meanwhile: no viewer left to tell
            return
        log.warning("could not repair a gap", extra={"site": site, "after": after})
        self._metrics.gaps.inc()
        self._metrics.unrecovered_gaps.inc()
        self.notice(site, {"type": "gap", "after": format_cursor(epoch, after), "recovered": False})
        self._deliver(site, seq.skip())

    async def catch_up(
        self, site: str, top: int | None = None, *, window: bool = True
    ) -> bool | None:
        """Deliver whatever the site has beyond what was delivered (PostgreSQL is the truth).
        Returns True when that is all of it, False when storage had nothing for a gap in it
        (given up with a notice, as a repair gives one up), None when storage could not be
        read (nothing is known)."""
        seq = self._seq.get(site)
        if seq is None or seq.last is None:
            return True
        after, complete = seq.last, True
        while True:
            if top is not None and top <= after:
                return complete
            until = UNBOUNDED if top is None else top
            events = await self._read(site, after, until, window=window)
            if events is None:
                return None
            if not events:
                return complete
            self._deliver(site, seq.fill(events))
            gap = seq.missing()
            if gap is not None and gap[1] < events[0][0]:
                # The page is the first events past a hole (app.gateway.replay): storage has
                # nothing in the gap, so nothing will fill it. Held, they would wait for ever
                # (no live event comes to start a repair while the site is polled).
                self._give_up(site, seq, gap[0] - 1)
                complete = False
            after = events[-1][0]

    async def on_reconnect(self, sites: list[str]) -> None:
        """After pub/sub reconnected: whatever was published meanwhile was lost in transit.
        Fill it from storage, then tell viewers their stream had a gap and whether it was
        recovered. A site whose storage cannot be read now is checked again for
        REPAIR_PATIENCE_S before its viewers are told that events may be missing: after an
        outage of both Redis and PostgreSQL nothing was committed meanwhile, and saying "may
        be missing" at once was false (an outside test)."""
        self._metrics.redis_reconnects.inc()
        unchecked = [site for site in sites if not await self._reconnected(site)]
        if unchecked:
            task = asyncio.create_task(self._check_later(unchecked), name="reconnect-check")
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def _reconnected(self, site: str, *, last_try: bool = False) -> bool:
        """Catch the site up and tell its viewers; False when storage could not be read
        (and this is not the last try: then they are told events may be missing)."""
        if site not in self._seq:
            return True
        recovered = await self.catch_up(site)
        if recovered is None and not last_try:
            return False
        seq, epoch = self._seq.get(site), self._epochs.get(site)
        if seq is None or epoch is None:  # its last viewer left while we caught up
            return True
        self._metrics.gaps.inc()
        if not recovered:
            self._metrics.unrecovered_gaps.inc()
            log.warning(
                "could not check what a pub/sub reconnect missed",
                extra={"site": site, "after": seq.last},
            )
        after = format_cursor(epoch, seq.last) if seq.last is not None else None
        notice = {"type": "gap", "reason": "redis_reconnect", "after": after}
        self.notice(site, {**notice, "recovered": bool(recovered)})
        return True

    async def _check_later(self, sites: list[str]) -> None:
        deadline = asyncio.get_running_loop().time() + REPAIR_PATIENCE_S
        while sites:
            await asyncio.sleep(REPAIR_RETRY_S)
            last_try = asyncio.get_running_loop().time() >= deadline
            sites = [s for s in sites if not await self._reconnected(s, last_try=last_try)]

    async def _poll_forever(self) -> None:
        """Serve from PostgreSQL every site whose live events cannot arrive (its Redis link is
        down, stalled or not confirmed), and tell its viewers when that starts and ends. The
        Redis window is not read: the link to that Redis is what failed."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self._poll()
            except Exception:  # a bug must not end polling for good: log it, go on
                log.exception("storage poll failed")

    async def _poll(self) -> None:
        down = {site for site in self._seq if not self.subscriptions.holds(site)}
        for site in down - self._polled:
            log.warning("site served from storage: its redis link is down", extra={"site": site})
            self._polled.add(site)
            self.notice(site, {"type": "delivery", "mode": "storage"})
        for site in self._polled - down:
            self._polled.discard(site)
            if site in self._seq:
                self.notice(site, {"type": "delivery", "mode": "live"})
        self._metrics.polled_sites.set(len(self._polled))
        if not down:
            return
        try:
            heads = await site_heads(self._pool, sorted(down))
        except STORAGE_ERRORS:
            return
        for site, head in heads.items():
            self.note_head(site, head)  # the baseline, if storage was down when it subscribed
            await self.catch_up(site, head, window=False)

    async def _check_positions(self) -> None:
        """Pub/sub can drop a message silently, and ingest cannot publish while Redis is down:
        a lost *last* event is revealed by no later offset. PostgreSQL knows every site's head;
        a site still behind a head seen one check earlier is caught up from storage (waiting
        one period lets events in flight arrive live first).

        The same check finds the opposite: a site delivered beyond PostgreSQL's head, which
        only a PostgreSQL that went back can cause (`_went_back`; ingest's control message
        usually says so first, but not for a site whose window was gone)."""
        suspects: dict[str, int] = {}
        behind: set[str] = set()
        while True:
            await asyncio.sleep(POSITION_CHECK_S)
            try:
                suspects, behind = await self._check_once(suspects, behind)
            except Exception:  # a bug, or a client error: the check must go on for every site
                log.exception("position check failed")

    async def _check_once(
        self, suspects: dict[str, int], behind: set[str]
    ) -> tuple[dict[str, int], set[str]]:
        sites = list(self._seq)
        if not sites:
            return suspects, behind
        # Taken before the query: an event delivered by then was committed before it, so its
        # head cannot be lower, whatever arrives while the query runs.
        delivered = {s: last for s in sites if (last := self._seq[s].last) is not None}
        try:
            heads = await site_heads(self._pool, sites)
        except STORAGE_ERRORS:
            return suspects, behind
        seen_behind = {s for s, head in heads.items() if head < delivered.get(s, head)}
        # Twice in a row before anything is done: closing a site's viewers on one odd read (a
        # pooler briefly on a lagging standby) would cost more than 2 s of waiting.
        for site in seen_behind & behind:
            seq = self._seq.get(site)
            if seq is not None and seq.last is not None and seq.last > heads[site]:
                self._went_back(site, heads[site], seq.last)
        behind = seen_behind - behind
        for site, head in suspects.items():
            seq = self._seq.get(site)
            if seq is not None and seq.last is not None and seq.last < head:
                log.info("position check found missed events", extra={"site": site})
                await self.catch_up(site, head)
        suspects = {
            site: head
            for site, head in heads.items()
            if (seq := self._seq.get(site)) is not None and seq.last is not None and seq.last < head
        }
        return suspects, behind

    def _went_back(self, site: str, head: int, delivered: int) -> None:
        """Storage holds the site only up to `head`, below what this gateway delivered: it was
        restored to an earlier point, or failed over to a replica that lagged. The events
        after `head` are gone from storage and their offsets are being handed out again, to
        new events the feed would drop as repeats. So the feed starts again from `head` and
        the site's viewers are closed with 4006, at once (no await between: no viewer may get
        an offset it already had); their resume is told (`storage_behind` or `cursor_ahead`).
        The window is cleared beyond `head` in the background."""
        self._behind_log.write(
            "storage is behind what this gateway delivered (PostgreSQL restored to an earlier "
            "point, or failed over to a replica that lagged); the site's viewers resume from "
            "its head",
            {"sites": 1},
            site=site,
            delivered=delivered,
            head=head,
        )
        self._metrics.storage_behind.inc()
        repair = self._repairs.pop(site, None)
        if repair is not None:
            repair.cancel()
        self._seq[site] = Sequencer(head)
        for viewer in list(self.hub.viewers(site)):
            viewer.fail(CloseCode.STORAGE_BEHIND)
        task = asyncio.create_task(self._forget(site, head), name=f"forget {site}")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _forget(self, site: str, head: int) -> None:
        if not await self._replayer.forget(site, head):
            log.warning("could not clear the site's window", extra={"site": site})
