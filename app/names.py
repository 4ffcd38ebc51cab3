"""Every Redis key and channel name Sitewire uses, built from one configurable prefix.

No other module formats a key. Each site's keys share the hash tag `{site}` so that in a Redis
Cluster they live in one slot and the publish script stays atomic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str

    def channel(self, site: str) -> str:
        """Pub/sub channel carrying the site's live events."""
        return f"{self.prefix}:ch:{{{site}}}"

    def window(self, site: str) -> str:
        """Sorted set (score = offset) holding the site's most recent events for replay."""
        return f"{self.prefix}:win:{{{site}}}"

    def went_back(self, site: str) -> str:
        """String "R O" set by the publish script when storage handed the site's offsets out
        again: offsets after R up to O were other events (kept a day: resumes read it)."""
        return f"{self.prefix}:back:{{{site}}}"

    def rate_site(self, site: str, second: int) -> str:
        """Counter of events accepted for a site in one wall-clock second."""
        return f"{self.prefix}:rl:site:{{{site}}}:{second}"

    def rate_ip(self, site: str, ip_hash: str, minute: int) -> str:
        """Counter of events from one (hashed) client IP to one site in one wall-clock minute.
        It carries the site's hash tag so one script can check it with the site's counter in a
        Cluster; the per-IP limit therefore applies per site."""
        return f"{self.prefix}:rl:ip:{{{site}}}:{ip_hash}:{minute}"

    def pattern(self) -> str:
        """Matches every key of this prefix (used by tests and tooling to clean up, never by
        the gateway to subscribe)."""
        return f"{self.prefix}:*"
