"""Site ids and the site registry.

A site id is a lowercase domain-like name. Validating it here (and in a CHECK constraint) means
it can never carry Redis pattern characters (`*?[]`), key separators or the hash-tag braces
used in `app.names`, so one site can never name another site's channel.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from app.errors import InvalidSiteId

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


def _site(row: asyncpg.Record) -> Site:
    return Site(
        id=row["id"],
        domains=tuple(row["domains"]),
        epoch=row["epoch"],
        next_offset=row["next_offset"],
        created_at=row["created_at"],
    )


class SiteCache:
    """Read-through cache of the site registry for the ingest hot path.

    Known sites are cached for `ttl` seconds, unknown ones for `negative_ttl` (short, so a
    site registered a moment ago starts working quickly). Raises what asyncpg raises.
    """

    def __init__(self, pool: asyncpg.Pool, ttl: float = 30.0, negative_ttl: float = 2.0) -> None:
        self._pool = pool
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._entries: dict[str, tuple[float, Site | None]] = {}

    async def get(self, site: str) -> Site | None:
        now = time.monotonic()
        hit = self._entries.get(site)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await get_site(self._pool, site)
        if len(self._entries) > 100_000:  # bounded: unknown ids come from the internet
            self._entries.clear()
        self._entries[site] = (now + (self._ttl if found else self._negative_ttl), found)
        return found
