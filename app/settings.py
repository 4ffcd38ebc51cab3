"""The one validated settings object.

`Settings.from_env()` is the only code in Sitewire that reads the environment. It runs once at
start-up; a bad value raises `SettingsError` naming the variable, so a misconfigured process
fails before it accepts any traffic.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast

from app.errors import SettingsError

T = TypeVar("T")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: How logs are written (app/logs.py); `auto` is decided by each process from its stderr.
LogFormat = Literal["auto", "json", "text"]


@dataclass(frozen=True)
class Settings:
    """Every tunable of every Sitewire process. Field docs name the environment variable."""

    #: DATABASE_URL: PostgreSQL DSN. None means "not configured" (only `sitewire run` accepts
    #: that, and starts an embedded server).
    database_url: str | None = None
    #: REDIS_URL: Redis URL (redis:// or unix://), or several comma-separated: independent
    #: servers, each site on one of them (app/servers/redis.py).
    redis_url: str | None = None
    #: REDIS_CLUSTER: true when REDIS_URL names seed nodes of one Redis 7 Cluster, which is then
    #: used with sharded pub/sub (app/broker/cluster.py).
    redis_cluster: bool = False
    #: SITEWIRE_KEY_PREFIX: prefix of every Redis key and channel; isolates deployments/tests.
    key_prefix: str = "sw"
    #: SITEWIRE_SECRET: HMAC key for viewer tokens, at least 32 characters.
    secret: str | None = None
    #: SITEWIRE_MAX_EVENT_BYTES: largest body accepted by POST /api/event.
    max_event_bytes: int = 16 * 1024
    #: SITEWIRE_MAX_BATCH_BYTES: largest body accepted by POST /api/events.
    max_batch_bytes: int = 512 * 1024
    #: SITEWIRE_MAX_BATCH_EVENTS: most events in one POST /api/events.
    max_batch_events: int = 100
    #: SITEWIRE_COMMIT_MAX_EVENTS: most events in one group commit (app/store/writes.py).
    commit_max_events: int = 1000
    #: SITEWIRE_COMMIT_TIMEOUT_S: a commit PostgreSQL has not confirmed by then is given up:
    #: its requests are answered 503 (app/ingest/committer.py).
    commit_timeout_s: float = 5.0
    #: SITEWIRE_COMMIT_QUEUE_EVENTS: most events waiting for a commit; more are answered 503.
    commit_queue_events: int = 10_000
    #: SITEWIRE_RATE_SITE_PER_SEC: events a site may send per second (all replicas). 0 = off.
    rate_site_per_sec: int = 2000
    #: SITEWIRE_RATE_IP_PER_MIN: events one client IP may send per minute (all replicas). 0 = off.
    rate_ip_per_min: int = 600
    #: SITEWIRE_TRUSTED_PROXIES: comma-separated CIDRs whose X-Forwarded-For is believed.
    trusted_proxies: tuple[IPNetwork, ...] = field(default_factory=tuple)
    #: SITEWIRE_REPLAY_WINDOW: events kept per site in the Redis replay window.
    replay_window: int = 2000
    #: SITEWIRE_REPLAY_WINDOW_TTL_S: a site's window expires this long after its last event
    #: (replays then read PostgreSQL), so Redis holds windows of active sites only.
    replay_window_ttl_s: int = 3600
    #: SITEWIRE_DB_POOL_SIZE: PostgreSQL connections per process.
    db_pool_size: int = 4
    #: SITEWIRE_VIEWER_QUEUE_BYTES: bytes queued for one viewer before it is closed as slow.
    viewer_queue_bytes: int = 1024 * 1024
    #: SITEWIRE_WRITE_TIMEOUT_S: a write to one viewer waiting this long with nothing read by
    #: the viewer meanwhile closes it as slow.
    write_timeout_s: float = 5.0
    #: SITEWIRE_PING_INTERVAL_S / SITEWIRE_PING_TIMEOUT_S: WebSocket ping/pong liveness.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    #: SITEWIRE_UNSUBSCRIBE_DELAY_S: linger before unsubscribing a site with no viewers left.
    unsubscribe_delay_s: float = 2.0
    #: SITEWIRE_SITE_CACHE_TTL_S: how long a process trusts what it read of a site from the
    #: registry before reading it again (app.store.sites.SiteCache; a known site is still
    #: served while that read runs, or fails).
    site_cache_ttl_s: float = 30.0
    #: SITEWIRE_DRAIN_TIMEOUT_S: on SIGTERM, the longest a gateway waits for viewers to leave.
    drain_timeout_s: float = 5.0
    #: SITEWIRE_GAP_HOLD_MS: how long out-of-order events wait before a gap is repaired.
    gap_hold_ms: float = 50.0
    #: SITEWIRE_HEADER_TIMEOUT_S: a request's line and headers must arrive within this long
    #: of the connection (or of a keep-alive request's first byte); else 408 (app/web/http.py).
    header_timeout_s: float = 30.0
    #: SITEWIRE_BODY_TIMEOUT_S: a request's body must arrive within this long of its headers.
    body_timeout_s: float = 30.0
    #: SITEWIRE_MAX_HEADER_BYTES: most bytes of request line and headers; else 431.
    max_header_bytes: int = 32 * 1024
    #: SITEWIRE_KEEPALIVE_S: an idle keep-alive connection is closed after this long.
    keepalive_s: int = 5
    #: SITEWIRE_LISTEN_BACKLOG: connections the kernel queues for a process before it accepts
    #: them (listen(2)); the kernel caps it at net.core.somaxconn. A reconnect storm fills it:
    #: past it, a client's SYN is dropped and retried 1, 3, 7 s later (docs/operations.md).
    listen_backlog: int = 4096
    #: SITEWIRE_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    #: SITEWIRE_LOG_FORMAT: json (one object per line), text (for a person), or auto: text
    #: when stderr is a terminal, else json (app/logs.py).
    log_format: LogFormat = "auto"
    #: SITEWIRE_RETENTION_DAYS: events older than this are deleted by `sitewire worker`
    #: (0 keeps them forever).
    retention_days: int = 400
    #: SITEWIRE_WORKER_INTERVAL_S: seconds between two passes of the background jobs.
    worker_interval_s: float = 3600.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: os.environ); raise SettingsError on bad input."""
        env = os.environ if environ is None else environ
        r = _Reader(env)
        settings = cls(
            database_url=r.url("DATABASE_URL", ("postgres://", "postgresql://")),
            redis_url=r.url("REDIS_URL", ("redis://", "rediss://", "unix://"), many=True),
            redis_cluster=r.get("REDIS_CLUSTER", False, _bool),
            key_prefix=r.get("SITEWIRE_KEY_PREFIX", cls.key_prefix, _prefix),
            secret=r.get("SITEWIRE_SECRET", None, _secret),
            max_event_bytes=r.int("SITEWIRE_MAX_EVENT_BYTES", cls.max_event_bytes, 256),
            max_batch_bytes=r.int("SITEWIRE_MAX_BATCH_BYTES", cls.max_batch_bytes, 1024),
            max_batch_events=r.int("SITEWIRE_MAX_BATCH_EVENTS", cls.max_batch_events, 1, 1000),
            commit_max_events=r.int("SITEWIRE_COMMIT_MAX_EVENTS", cls.commit_max_events, 1),
            commit_timeout_s=r.float("SITEWIRE_COMMIT_TIMEOUT_S", cls.commit_timeout_s, 0.1, 600),
            commit_queue_events=r.int(
                "SITEWIRE_COMMIT_QUEUE_EVENTS", cls.commit_queue_events, 1, 10_000_000
            ),
            rate_site_per_sec=r.int("SITEWIRE_RATE_SITE_PER_SEC", cls.rate_site_per_sec, 0),
            rate_ip_per_min=r.int("SITEWIRE_RATE_IP_PER_MIN", cls.rate_ip_per_min, 0),
            trusted_proxies=r.get("SITEWIRE_TRUSTED_PROXIES", (), _networks),
            replay_window=r.int("SITEWIRE_REPLAY_WINDOW", cls.replay_window, 10),
            replay_window_ttl_s=r.int(
                "SITEWIRE_REPLAY_WINDOW_TTL_S", cls.replay_window_ttl_s, 60, 30 * 86400
            ),
            db_pool_size=r.int("SITEWIRE_DB_POOL_SIZE", cls.db_pool_size, 1, 100),
            viewer_queue_bytes=r.int("SITEWIRE_VIEWER_QUEUE_BYTES", cls.viewer_queue_bytes, 4096),
            write_timeout_s=r.float("SITEWIRE_WRITE_TIMEOUT_S", cls.write_timeout_s, 0.05, 600),
            ping_interval_s=r.float("SITEWIRE_PING_INTERVAL_S", cls.ping_interval_s, 0.1, 3600),
            ping_timeout_s=r.float("SITEWIRE_PING_TIMEOUT_S", cls.ping_timeout_s, 0.1, 3600),
            unsubscribe_delay_s=r.float(
                "SITEWIRE_UNSUBSCRIBE_DELAY_S", cls.unsubscribe_delay_s, 0.0, 3600
            ),
            site_cache_ttl_s=r.float(
                "SITEWIRE_SITE_CACHE_TTL_S", cls.site_cache_ttl_s, 0.1, 86_400
            ),
            drain_timeout_s=r.float("SITEWIRE_DRAIN_TIMEOUT_S", cls.drain_timeout_s, 0.1, 600),
            gap_hold_ms=r.float("SITEWIRE_GAP_HOLD_MS", cls.gap_hold_ms, 0.0, 10_000),
            header_timeout_s=r.float("SITEWIRE_HEADER_TIMEOUT_S", cls.header_timeout_s, 0.1, 60),
            body_timeout_s=r.float("SITEWIRE_BODY_TIMEOUT_S", cls.body_timeout_s, 0.1, 600),
            max_header_bytes=r.int(
                "SITEWIRE_MAX_HEADER_BYTES", cls.max_header_bytes, 1024, 1 << 20
            ),
            keepalive_s=r.int("SITEWIRE_KEEPALIVE_S", cls.keepalive_s, 1, 600),
            listen_backlog=r.int("SITEWIRE_LISTEN_BACKLOG", cls.listen_backlog, 1, 1 << 20),
            log_level=r.get("SITEWIRE_LOG_LEVEL", cls.log_level, _log_level),
            log_format=r.get("SITEWIRE_LOG_FORMAT", cls.log_format, _log_format),
            retention_days=r.int("SITEWIRE_RETENTION_DAYS", cls.retention_days, 0, 36500),
            worker_interval_s=r.float(
                "SITEWIRE_WORKER_INTERVAL_S", cls.worker_interval_s, 1, 86400
            ),
        )
        if settings.redis_cluster and settings.redis_url and "unix://" in settings.redis_url:
            raise SettingsError("REDIS_CLUSTER", "needs redis:// or rediss:// seed node URLs")
        return settings

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the process launcher use it)."""
        return replace(self, **changes)

    def require_database(self) -> str:
        if not self.database_url:
            raise SettingsError("DATABASE_URL", "is not set")
        return self.database_url

    def require_redis(self) -> tuple[str, ...]:
        """The Redis server URLs (one, or several independent shards)."""
        if not self.redis_url:
            raise SettingsError("REDIS_URL", "is not set")
        return tuple(self.redis_url.split(","))

    def require_secret(self) -> str:
        if not self.secret:
            raise SettingsError("SITEWIRE_SECRET", "is not set (needed to sign viewer tokens)")
        return self.secret


class _Reader:
    """Reads one variable at a time, turning parse failures into SettingsError(name)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise SettingsError(name, f"{exc}{_shown(name, raw)}") from None

    def url(self, name: str, schemes: tuple[str, ...], many: bool = False) -> str | None:
        def parse(raw: str) -> str:
            parts = [p.strip() for p in raw.split(",")] if many else [raw]
            for part in parts:
                if not part.startswith(schemes):
                    raise ValueError(f"must start with one of {', '.join(schemes)}")
            return ",".join(parts)

        return self.get(name, None, parse)

    def int(self, name: str, default: int, low: int, high: int | None = None) -> int:
        def parse(raw: str) -> int:
            try:
                value = int(raw)
            except ValueError:
                raise ValueError("must be an integer") from None
            _check_bounds(value, low, high)
            return value

        return self.get(name, default, parse)

    def float(self, name: str, default: float, low: float, high: float) -> float:
        def parse(raw: str) -> float:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError("must be a number") from None
            _check_bounds(value, low, high)
            return value

        return self.get(name, default, parse)


#: Variables whose values an error message must not repeat.
_SECRETS = frozenset({"SITEWIRE_SECRET"})
#: What may hold a password in a URL: whatever comes between `//` and the host's `@` (the last
#: one: a password may hold `@` or `/` itself), and a `password=` query parameter.
_USERINFO = re.compile(r"//.*@")
_PASSWORD_PARAM = re.compile(r"(password=)[^&]*", re.IGNORECASE)


def _shown(name: str, raw: str) -> str:
    """The value an error message repeats: none for a secret, a URL without its password."""
    if name in _SECRETS:
        return f" (got {len(raw)} characters)"
    masked = _PASSWORD_PARAM.sub(r"\g<1>***", _USERINFO.sub("//***@", raw))
    return f" (got {masked!r})"


def _check_bounds(value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and at most {high}"
        raise ValueError(f"must be at least {low}{upper}")


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("must be true or false")
    return value in {"true", "1", "yes"}


def _prefix(raw: str) -> str:
    if not _PREFIX_RE.match(raw):
        raise ValueError("must be 1-32 characters of letters, digits, '_' or '-'")
    return raw


def _secret(raw: str) -> str:
    if len(raw) < 32:
        raise ValueError("must be at least 32 characters")
    return raw


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    nets = []
    for part in raw.split(","):
        try:
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not an IP address or CIDR") from None
    return tuple(nets)


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _log_format(raw: str) -> LogFormat:
    value = raw.lower()
    if value not in {"auto", "json", "text"}:
        raise ValueError("must be json, text or auto")
    return cast(LogFormat, value)
