"""The broker's interface: how committed events travel from ingest to the gateways, and the
short history a gateway reads before it falls back to PostgreSQL.

Events reach a broker only after PostgreSQL committed them, with their per-site offsets, so a
broker never decides order or durability: PostgreSQL is the truth, and every guarantee below is
about *delivery*. What a broker loses, gateways repair from PostgreSQL (app.gateway.feed), which
is why "at most once" is enough here and "exactly once" still holds for viewers.

Implementations: `RedisBroker` (app.broker.redis: pub/sub plus a sorted-set window, on one
server, several, or a Cluster) and `MemoryBroker` (app.broker.memory: one process, for tests).
tests/test_broker_contract.py runs the same contract against each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

from app.servers import Status
from app.wire import Event

#: One committed event for publication: its site, its offset, and its wire encoding.
Publication = tuple[str, int, bytes]

#: Live events handed to a gateway at once, grouped by site, each site's in publication order.
Burst = dict[str, list[bytes]]

#: Called with a burst; it must not block (the gateway writes frames from it).
OnBurst = Callable[[Burst], None]
#: Called after the link carrying these sites was lost and is back: whatever was published
#: meanwhile may never arrive, so the gateway reads it from storage.
OnReconnect = Callable[[list[str]], Awaitable[None]]


class BrokerUnavailable(Exception):
    """The broker could not do what was asked (unreachable, refused, or too slow)."""


class PublishResult(NamedTuple):
    published: int
    #: Events not published (the broker was unreachable, or skipped after a recent failure);
    #: gateways repair them from PostgreSQL.
    lost: int = 0
    #: Why some were lost ("" when none were).
    why: str = ""
    #: Sites whose published offsets the broker's history held for other events: storage
    #: handed them out again (it went back to an earlier point). Their history from there on
    #: was dropped.
    reused: tuple[str, ...] = ()


class Subscriptions(Protocol):
    """A gateway's live subscriptions, for every site it has viewers for.

    Guarantees:
    - A site's events are handed to `on_burst` in the order they were published, each at most
      once, but only while the site `holds`: publication while the link is down is lost.
    - When a lost link is back (every site on it subscribed again and confirmed),
      `on_reconnect` gets those sites, so the caller can read what it missed from storage.
    - A subscribed site stays subscribed until `unsubscribe`, across failures.
    """

    @property
    def sites(self) -> list[str]: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None:
        """Subscribe and wait for the broker to confirm. Raises TimeoutError or
        BrokerUnavailable if it does not within `confirm_within`; the site is then still
        held, and subscribed as soon as the broker answers (reported to `on_reconnect`)."""

    async def unsubscribe(self, site: str) -> None: ...

    def holds(self, site: str) -> bool:
        """Whether the site's live events arrive now (subscribed, confirmed, on a link not
        known to be lost)."""


class Broker(Protocol):
    """Publication (ingest), subscriptions (gateway) and a short history per site (gateway).

    Guarantees:
    - `publish` never raises for an unavailable broker: it returns what it could not publish,
      and it returns within a bounded time (a hung server costs a timeout, then is skipped
      for a while), because ingest's publication queue waits for it.
    - Each site's events are published in the order given (commit order), and a publication
      is idempotent: the same offset published twice is one event in the history, and
      subscribers drop an offset they already have.
    - An offset published again with another payload (storage handed it out again) is
      reported in `reused`: that site's history is dropped (a window never serves an event
      storage no longer has), subscribers get a control message `{"went_back":R,"through":O}`
      (app.wire.went_back) ahead of the new events, and `went_back(site)` answers (R, O) for
      a day: the events after R up to O were other events than storage now has.
    - `window(site, first, last)` returns every event first..last in offset order, or None:
      the history is capped, can be lost (a restarted Redis), and is never partial.
    - `forget(site, after)` removes the site's history beyond `after` (storage went back to an
      earlier point: those offsets now belong to other events, or to none). Best effort and
      bounded: it returns False when the broker could not be reached.
    """

    async def publish(self, events: Sequence[Publication]) -> PublishResult: ...

    async def window(self, site: str, first: int, last: int) -> list[Event] | None:
        """Events first..last from the broker's history when it holds all of them; None when
        it does not, or when it is unavailable or slow (bounded: the caller reads storage)."""

    async def forget(self, site: str, after: int) -> bool:
        """Remove the site's history beyond offset `after`; False if the broker did not
        answer (bounded, as a window read)."""

    async def went_back(self, site: str) -> tuple[int, int] | None:
        """(R, O) when storage handed the site's offsets after R (up to O) out again lately;
        None when not, or when the broker does not answer (bounded, as a window read)."""

    def subscriptions(
        self, on_burst: OnBurst, on_reconnect: OnReconnect, on_reconnect_attempt: Callable[[], None]
    ) -> Subscriptions:
        """The gateway's subscriptions (one object per gateway)."""

    async def probe(self) -> Status: ...
