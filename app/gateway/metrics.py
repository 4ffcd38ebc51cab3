"""The gateway's Prometheus metrics, one registry per app instance (no import-time globals)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.codes import CloseCode, StandardCloseCode
from app.gateway.hub import EVENT, event_age_s, event_count


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "sitewire_gateway_connections",
            "Open viewer connections",
            ["transport"],
            registry=registry,
        )
        self.subscriptions = Gauge(
            "sitewire_gateway_subscribed_sites", "Sites subscribed in Redis", registry=registry
        )
        self.queue_bytes = Gauge(
            "sitewire_gateway_queue_bytes", "Bytes queued for all viewers", registry=registry
        )
        self.delivered = Counter(
            "sitewire_gateway_delivered_events", "Events written to viewers", registry=registry
        )
        self.frames = Counter(
            "sitewire_gateway_frames", "Frames written to viewers", registry=registry
        )
        self.closes = Counter(
            "sitewire_gateway_closes",
            "Viewer connections closed by the server, by reason (the close code's name, or "
            "write_timeout: dropped without a close frame)",
            ["reason"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "sitewire_gateway_auth_failures", "Rejected viewer tokens", registry=registry
        )
        self.gaps = Counter(
            "sitewire_gateway_gap_notices", "Gap notices sent to viewers", registry=registry
        )
        # Apart from gap notices, most of which say `recovered: true` after a pub/sub
        # reconnect: these are the ones whose viewers may lack events (the failure to alert on).
        self.unrecovered_gaps = Counter(
            "sitewire_gateway_unrecovered_gaps",
            "Gap notices sent with recovered: false (events may be missing)",
            registry=registry,
        )
        # Only a PostgreSQL restored to an earlier point (or failed over to a replica that
        # lagged) does this: offsets are handed out again (app.gateway.feed).
        self.storage_behind = Counter(
            "sitewire_gateway_storage_behind",
            "Sites found delivered beyond PostgreSQL's head (storage went back)",
            registry=registry,
        )
        self.polled_sites = Gauge(
            "sitewire_gateway_polled_sites",
            "Sites served from PostgreSQL because their Redis link is down",
            registry=registry,
        )
        # Reconnections made (each one a catch-up from storage and a gap notice per viewer),
        # apart from the attempts: one outage of two minutes was ~40 attempts, and an alert on
        # "flapping" counted them (an outside test).
        self.redis_reconnects = Counter(
            "sitewire_gateway_redis_reconnects",
            "Pub/sub links lost and made again (every site on them resubscribed)",
            registry=registry,
        )
        self.redis_reconnect_attempts = Counter(
            "sitewire_gateway_redis_reconnect_attempts",
            "Attempts at making a lost pub/sub link again (one per backoff while Redis is away)",
            registry=registry,
        )
        self.replay_reads = Counter(
            "sitewire_gateway_replay_reads",
            "Storage reads for replays and gap repairs, by source "
            "(shared: joined an identical read in flight)",
            ["source"],
            registry=registry,
        )
        self.latency = Histogram(
            "sitewire_gateway_publish_to_send_seconds",
            "From the event's server timestamp to its write on a viewer socket",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        # Every label value exported from the start, 0 until it happens: a series that appears
        # only with its first event showed as "No data" on a healthy dashboard, and a new pod
        # had no viewer count for the autoscaler until its first viewer (an outside test).
        for transport in TRANSPORTS:
            self.connections.labels(transport)
        for reason in CLOSE_REASONS:
            self.closes.labels(reason)
        for source in REPLAY_SOURCES:
            self.replay_reads.labels(source)


#: `connections` labels.
TRANSPORTS = ("websocket", "sse")
#: `closes` labels: each close code's name, and a write that timed out (no close frame).
CLOSE_REASONS = (
    *(c.name.lower() for c in CloseCode),
    *(c.name.lower() for c in StandardCloseCode),
    "write_timeout",
)
#: `replay_reads` labels.
REPLAY_SOURCES = ("shared", "redis", "postgres")


def count_close(metrics: GatewayMetrics, code: int) -> None:
    """A close the server sends (WebSocket frame or SSE `close` event), by its code's name:
    counted where it is written, so every reason is counted once, whoever asked for it."""
    try:
        reason = CloseCode(code).name.lower()
    except ValueError:
        reason = StandardCloseCode(code).name.lower()
    metrics.closes.labels(reason).inc()


class DeliveryStats:
    """Hot-path counters kept as plain ints and folded into Prometheus twice a second: a
    Prometheus increment per frame cost more than the frame's own bookkeeping."""

    #: A viewer's own flushes are sampled on one write in this many.
    SAMPLE_EVERY = 8

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self.frames = 0
        self.delivered = 0
        self._writes = 0

    def count(self, items: list[tuple[int, int, bytes]]) -> None:
        """Items a viewer's flush sent from its queue (a viewer behind, or replaying: its
        newest event is sampled, as a replay's oldest is old by design)."""
        self.delivered += event_count(items)
        self._writes += 1
        if self._writes % self.SAMPLE_EVERY == 0:
            newest = next((data for kind, _, data in reversed(items) if kind == EVENT), None)
            self._observe(newest)

    def direct(self, frames: int, count: int, events: list[tuple[int, bytes]]) -> None:
        """Shared frames written straight to caught-up viewers (`frames` writes carrying `count`
        events in all). Latency is observed once per burst, not per viewer (the same events
        left at the same moment), and for its oldest event: a gateway that stalled (short of
        CPU, a long pause) reads what piled up as one burst whose newest event is fresh, and
        sampling that one hid lags of 2 s from the alert (an outside test)."""
        if not frames:
            return
        self.frames += frames
        self.delivered += count
        self._observe(events[0][1])

    def _observe(self, payload: bytes | None) -> None:
        age = None if payload is None else event_age_s(payload, time.time())
        if age is not None:
            self._metrics.latency.observe(max(age, 0.0))

    def flush(self) -> None:
        self._metrics.frames.inc(self.frames)
        self._metrics.delivered.inc(self.delivered)
        self.frames = self.delivered = 0
