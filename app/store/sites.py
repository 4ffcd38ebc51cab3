"""Site ids and the site registry.

A site id is a lowercase domain-like name. Validating it here (and in a CHECK constraint) means
it can never carry Redis pattern characters (`*?[]`), key separators or the hash-tag braces
used in `app.names`, so one site can never name another site's channel.
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app.errors import InvalidSiteId
from app.servers.postgres import STORAGE_ERRORS

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
SITE_ID_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def validate_site_id(site: str) -> str:
    """Return `site` unchanged if it is a valid site id, else raise InvalidSiteId."""
    if not isinstance(site, str) or len(site) > 253 or not SITE_ID_RE.match(site):
        raise InvalidSiteId(str(site)[:300])
    return site


def is_valid_site_id(site: object) -> bool:
    return isinstance(site, str) and len(site) <= 253 and SITE_ID_RE.match(site) is not None


@dataclass(frozen=True, slots=True)
class Site:
    id: str
    domains: tuple[str, ...]
    epoch: str
    next_offset: int
    created_at: datetime

    @property
    def origins_hosts(self) -> frozenset[str]:
        """Hosts whose browser pages may post events for this site."""
        return frozenset((self.id, f"www.{self.id}", *self.domains))


class SiteExists(Exception):
    pass


async def create_site(
    conn: asyncpg.Connection | asyncpg.Pool, site: str, domains: tuple[str, ...] = ()
) -> Site:
    """Register `site`. Raises InvalidSiteId, or SiteExists if it is already registered."""
    validate_site_id(site)
    for domain in domains:
        validate_site_id(domain)
    row = await conn.fetchrow(
        """INSERT INTO sites (id, domains, epoch) VALUES ($1, $2, $3)
           ON CONFLICT (id) DO NOTHING
           RETURNING id, domains, epoch, next_offset, created_at""",
        site,
        list(domains),
        secrets.token_hex(4),
    )
    if row is None:
        raise SiteExists(site)
    return _site(row)


async def list_sites(conn: asyncpg.Connection | asyncpg.Pool) -> list[Site]:
    rows = await conn.fetch(
        "SELECT id, domains, epoch, next_offset, created_at FROM sites ORDER BY id"
    )
    return [_site(r) for r in rows]


async def get_site(conn: asyncpg.Connection | asyncpg.Pool, site: str) -> Site | None:
    row = await conn.fetchrow(
        "SELECT id, domains, epoch, next_offset, created_at FROM sites WHERE id = $1", site
    )
    return None if row is None else _site(row)


async def get_sites(conn: asyncpg.Connection | asyncpg.Pool, sites: list[str]) -> list[Site]:
    """Those of `sites` that are registered, in one query."""
    rows = await conn.fetch(
        "SELECT id, domains, epoch, next_offset, created_at FROM sites WHERE id = ANY($1::text[])",
        sites,
    )
    return [_site(r) for r in rows]


def _site(row: asyncpg.Record) -> Site:
    return Site(
        id=row["id"],
        domains=tuple(row["domains"]),
        epoch=row["epoch"],
        next_offset=row["next_offset"],
        created_at=row["created_at"],
    )


#: Sites (known or not) a SiteCache keeps.
MAX_ENTRIES = 100_000
#: Longest wait for the registry (one indexed row): a hung PostgreSQL held a site's first
#: events ~21 s (asyncpg's connection and command timeouts) before the commit bounds applied.
LOOKUP_TIMEOUT_S = 2.0


class SiteCache:
    """Read-through cache of the site registry, for ingest's hot path and viewer admission.

    Known sites are kept for `ttl` seconds, unknown ones for `negative_ttl` (short, so a site
    registered a moment ago starts working quickly). Past its `ttl` a known site is still
    answered at once from the cache while one lookup refreshes it in the background; if the
    registry cannot be read, the entry stays and is tried again `retry_s` later. So PostgreSQL
    down or hung for longer than `ttl` does not turn away the viewers (or events) of a site
    known before it: an outside test found every new viewer refused 30 s into an outage. A
    site not known yet waits for its lookup (at most `timeout_s`), shared by concurrent callers,
    and meets what asyncpg raises (TimeoutError past `timeout_s`).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        ttl: float = 30.0,
        negative_ttl: float = 2.0,
        retry_s: float = 5.0,
        timeout_s: float = LOOKUP_TIMEOUT_S,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._retry_s = retry_s
        self._timeout_s = timeout_s
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, Site | None]] = {}
        #: Lookups in flight, by site: concurrent callers share one.
        self._lookups: dict[str, asyncio.Future[Site | None]] = {}

    async def get(self, site: str) -> Site | None:
        hit = self._entries.get(site)
        if hit is not None:
            expires, known = hit
            if expires > time.monotonic():
                return known
            if known is not None:
                self._lookup(site)  # in the background; the stale entry meanwhile
                return known
        # The lookup is not cancelled when this wait ends: cancelling a query on a hung
        # connection waits for asyncpg's own cancellation. It goes on, and fills the cache.
        return await asyncio.wait_for(asyncio.shield(self._lookup(site)), self._timeout_s)

    def cached(self, sites: Collection[str]) -> dict[str, Site | None]:
        """What the cache can answer at once of `sites` (a known site past its ttl too, while
        it is refreshed in the background); the others are left out."""
        found: dict[str, Site | None] = {}
        now = time.monotonic()
        for site in sites:
            hit = self._entries.get(site)
            if hit is None:
                continue
            expires, known = hit
            if expires > now:
                found[site] = known
            elif known is not None:
                self._lookup(site)
                found[site] = known
        return found

    async def read_many(self, sites: Collection[str]) -> dict[str, Site | None]:
        """`sites` read from the registry in one query (those already being read are
        waited for instead), at most `timeout_s`: a batch naming 100 sites nobody registered
        cost 100 lookups, one after another (an outside test)."""
        pending = {site: self._lookups[site] for site in sites if site in self._lookups}
        fresh = [site for site in sites if site not in pending]
        if fresh:
            loop = asyncio.get_running_loop()
            many = asyncio.ensure_future(self._read_many(fresh))
            mine: dict[str, asyncio.Future[Site | None]] = {}
            for site in fresh:
                one: asyncio.Future[Site | None] = loop.create_future()
                one.add_done_callback(_retrieved)
                one.add_done_callback(functools.partial(self._done_lookup, site))
                self._lookups[site] = mine[site] = one
            many.add_done_callback(lambda done: _settle(done, mine))
            pending.update(mine)
        # Not cancelled when this wait ends (as `get`): the query goes on and fills the cache.
        waited = asyncio.gather(*pending.values())
        values = await asyncio.wait_for(asyncio.shield(waited), self._timeout_s)
        return dict(zip(pending, values, strict=True))

    def _done_lookup(self, site: str, _: object) -> None:
        self._lookups.pop(site, None)

    async def _read_many(self, sites: list[str]) -> dict[str, Site | None]:
        known = {s.id: s for s in await get_sites(self._pool, sites)}
        found = {site: known.get(site) for site in sites}
        for site, value in found.items():
            self._keep(site, value)
        return found

    def _lookup(self, site: str) -> asyncio.Future[Site | None]:
        pending = self._lookups.get(site)
        if pending is None:
            pending = asyncio.ensure_future(self._read(site))
            self._lookups[site] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(site, None))
            pending.add_done_callback(_retrieved)
        return pending

    async def _read(self, site: str) -> Site | None:
        try:
            found = await get_site(self._pool, site)
        except STORAGE_ERRORS:
            stale = self._entries.get(site)
            if stale is not None and stale[1] is not None:
                self._entries[site] = (time.monotonic() + self._retry_s, stale[1])
            raise
        self._keep(site, found)
        return found

    def _keep(self, site: str, found: Site | None) -> None:
        if len(self._entries) >= self._max_entries:
            self._evict()
        ttl = self._ttl if found else self._negative_ttl
        self._entries.pop(site, None)  # re-inserted last: the dict's order is the entries' age
        self._entries[site] = (time.monotonic() + ttl, found)

    def _evict(self) -> None:
        """Bounded: unknown ids come from the internet. What names no site goes first, then
        the oldest half: a client inventing ids must not push out the sites in use (it
        cleared the whole cache in ~1,000 requests: every known site read again)."""
        entries = {k: v for k, v in self._entries.items() if v[1] is not None}
        if len(entries) >= self._max_entries // 2:
            entries = dict(list(entries.items())[len(entries) // 2 :])
        self._entries = entries


def _settle(
    many: asyncio.Future[dict[str, Site | None]], each: dict[str, asyncio.Future[Site | None]]
) -> None:
    """Hand one query's answer (or its failure) to each site's own lookup."""
    for site, one in each.items():
        if one.done():
            continue
        if many.cancelled():
            one.cancel()
        elif (error := many.exception()) is not None:
            one.set_exception(error)
        else:
            one.set_result(many.result()[site])


def _retrieved(lookup: asyncio.Future[Any]) -> None:
    """A lookup's failure reaches the callers waiting for it; a background refresh has none,
    and its failure is expected (the registry is down) and handled (the stale entry stays).
    Read it so that asyncio does not log it as lost."""
    if not lookup.cancelled():
        lookup.exception()
