"""A broker inside one process: `Broker` (app.broker.base) without a server.

It is what the unit tests of the feed and the replay run on, and it keeps the interface
honest: tests/test_broker_contract.py holds it to the same contract as the Redis broker. It
can also be cut off and restored (`cut`, `restore`), as a Redis link can: while cut,
publications reach no subscriber, subscribing fails (the site stays held), `holds` is False
and the window cannot be read; on `restore` every subscription reports its sites to
`on_reconnect`, as after a pub/sub reconnect. It cannot connect two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from app.broker.base import (
    BrokerUnavailable,
    Burst,
    OnBurst,
    OnReconnect,
    Publication,
    PublishResult,
    Subscriptions,
)
from app.servers import Status
from app.wire import Event, went_back_message


class MemoryBroker:
    def __init__(self, window: int = 1000) -> None:
        self._window_size = window
        #: Each site's history: offset -> payload, the newest `window` offsets.
        self._history: dict[str, dict[int, bytes]] = {}
        #: Sites whose offsets were handed out again: (after, through), as `went_back` says.
        self._went_back: dict[str, tuple[int, int]] = {}
        self._subscriptions: list[_MemorySubscriptions] = []
        self.available = True

    async def publish(self, events: Sequence[Publication]) -> PublishResult:
        if not self.available:
            return PublishResult(0, len(events), "broker cut off")
        bursts: dict[_MemorySubscriptions, Burst] = {}
        reused = self._reused(events)
        for site in reused:  # the control message goes ahead of the site's new events
            after, through = self._went_back[site]
            self._deliver(bursts, site, went_back_message(after, through))
        for site, offset, payload in events:
            self._remember(site, offset, payload)
            self._deliver(bursts, site, payload)
        # Handed over on a later turn of the loop, as a network broker's would be.
        loop = asyncio.get_running_loop()
        for subs, burst in bursts.items():
            loop.call_soon(subs.on_burst, burst)
        return PublishResult(len(events), reused=reused)

    def _deliver(
        self, bursts: dict[_MemorySubscriptions, Burst], site: str, payload: bytes
    ) -> None:
        for subs in self._subscriptions:
            if site in subs.confirmed:
                bursts.setdefault(subs, {}).setdefault(site, []).append(payload)

    def _reused(self, events: Sequence[Publication]) -> tuple[str, ...]:
        """Sites whose offsets are held for other payloads: their history goes and their
        marker is set (as the Redis script does)."""
        lowest: dict[str, int] = {}
        for site, offset, payload in events:
            held = self._history.get(site, {}).get(offset)
            if held is not None and held != payload and offset < lowest.get(site, offset + 1):
                lowest[site] = offset
        for site, offset in lowest.items():
            history = self._history.pop(site)
            self._went_back[site] = (offset - 1, max(history))
        return tuple(lowest)

    async def went_back(self, site: str) -> tuple[int, int] | None:
        if not self.available:
            return None
        return self._went_back.get(site)

    def _remember(self, site: str, offset: int, payload: bytes) -> None:
        history = self._history.setdefault(site, {})
        history[offset] = payload
        if len(history) > self._window_size:
            for old in sorted(history)[: len(history) - self._window_size]:
                del history[old]

    async def window(self, site: str, first: int, last: int) -> list[Event] | None:
        if last < first:
            return []
        if not self.available:
            return None
        history = self._history.get(site, {})
        if any(offset not in history for offset in range(first, last + 1)):
            return None
        return [(offset, history[offset]) for offset in range(first, last + 1)]

    async def forget(self, site: str, after: int) -> bool:
        if not self.available:
            return False
        history = self._history.get(site, {})
        for offset in [o for o in history if o > after]:
            del history[offset]
        return True

    def subscriptions(
        self, on_burst: OnBurst, on_reconnect: OnReconnect, on_reconnect_attempt: Callable[[], None]
    ) -> Subscriptions:
        subs = _MemorySubscriptions(self, on_burst, on_reconnect)
        self._subscriptions.append(subs)
        return subs

    async def probe(self) -> Status:
        return "ok" if self.available else "unavailable"

    def cut(self) -> None:
        """Cut every subscription's link: what is published meanwhile is lost to them."""
        self.available = False
        for subs in self._subscriptions:
            subs.confirmed.clear()

    def restore(self) -> None:
        """The link is back: every held site is subscribed again, then reported."""
        self.available = True
        for subs in self._subscriptions:
            subs.reconnected()

    def detach(self, subs: _MemorySubscriptions) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subs)


class _MemorySubscriptions:
    def __init__(self, broker: MemoryBroker, on_burst: OnBurst, on_reconnect: OnReconnect) -> None:
        self._broker = broker
        self.on_burst = on_burst
        self._on_reconnect = on_reconnect
        #: Sites held (subscribed, or waiting for the broker to come back).
        self._held: set[str] = set()
        #: Sites whose events arrive now.
        self.confirmed: set[str] = set()
        self._reports: set[asyncio.Task[None]] = set()

    @property
    def sites(self) -> list[str]:
        return sorted(self._held)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        self._broker.detach(self)
        for task in self._reports:
            task.cancel()

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None:
        self._held.add(site)
        if not self._broker.available:
            raise BrokerUnavailable("broker cut off")
        self.confirmed.add(site)

    async def unsubscribe(self, site: str) -> None:
        self._held.discard(site)
        self.confirmed.discard(site)

    def holds(self, site: str) -> bool:
        return site in self.confirmed

    def reconnected(self) -> None:
        self.confirmed = set(self._held)
        if self._held:
            task = asyncio.get_running_loop().create_task(self._report(self.sites))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _report(self, sites: list[str]) -> None:
        await self._on_reconnect(sites)
