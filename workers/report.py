"""`sitewire sites stats SITE`: what a site received per UTC day, stored and dropped.

Dropped events were answered 202 and never stored (trackers must not retry), so a newcomer
testing with curl's own User-Agent sees success and no data; this is where the drops show.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from app.store import drops, reads
from app.store.salts import utc_today
from app.store.sites import get_site

#: Why each drop reason happens, for the note under the table.
REASONS = {
    "bot": "a crawler's or a tool's User-Agent (curl, python-requests, Googlebot, ...)",
    "automation": "a headless or automated browser (HeadlessChrome, Selenium, ...)",
    "no_user_agent": "no User-Agent header at all",
}


async def site_days(conn: asyncpg.Connection, site: str, days: int) -> str | None:
    """The table for `site` over the last `days` UTC days, newest first; None if unknown."""
    if await get_site(conn, site) is None:
        return None
    today = utc_today()
    since = today - timedelta(days=days - 1)
    stored = await reads.stored_by_day(conn, site, since)
    dropped = await drops.by_day(conn, site, since)
    lines = [f"{site}: events per UTC day", f"{'day':<12}{'stored':>9}  dropped (202, not stored)"]
    seen: set[str] = set()
    for i in range(days):
        day = today - timedelta(days=i)
        reasons = dropped.get(day, {})
        seen.update(reasons)
        text = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())) or "-"
        lines.append(f"{day.isoformat():<12}{stored.get(day, 0):>9}  {text}")
    for reason in sorted(seen):
        lines.append(f"{reason}: {REASONS.get(reason, 'dropped on purpose')}")
    if "bot" in seen:
        lines.append("testing with curl? send a browser's User-Agent: curl -A 'Mozilla/5.0 ...'")
    return "\n".join(lines)
