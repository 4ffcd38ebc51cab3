"""Ingest's Prometheus metrics, one registry per app instance (no import-time globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from app.codes import ErrorCode
from app.ingest.enrich import DROP_REASONS

#: Why the committer refuses events before trying them (app.ingest.committer).
COMMIT_REFUSALS = ("hung", "queue_full")


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "sitewire_ingest_accepted_events", "Events committed", registry=registry
        )
        self.duplicates = Counter(
            "sitewire_ingest_duplicate_events",
            "Retried events already stored (acknowledged, stored once)",
            registry=registry,
        )
        self.dropped = Counter(
            "sitewire_ingest_dropped_events",
            "Events dropped on purpose (202, not stored)",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "sitewire_ingest_rejected_events",
            "Events rejected with an error code",
            ["code"],
            registry=registry,
        )
        self.commit_batch = Histogram(
            "sitewire_ingest_commit_batch_events",
            "Events per group commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "sitewire_ingest_commit_seconds",
            "Latency of one group commit",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.commit_failures = Counter(
            "sitewire_ingest_commit_failures", "Group commits that failed", registry=registry
        )
        self.commit_refusals = Counter(
            "sitewire_ingest_commit_refusals",
            "Events refused before any commit: storage hung (commits given up still running) "
            "or the commit queue full",
            ["reason"],
            registry=registry,
        )
        self.published = Counter(
            "sitewire_ingest_published_events", "Events published to Redis", registry=registry
        )
        self.publish_gap = Counter(
            "sitewire_ingest_publish_gap_events",
            "Stored events that could not be published (Redis unavailable)",
            registry=registry,
        )
        # Only a PostgreSQL that went back to an earlier point does this (app.broker.base).
        self.storage_behind = Counter(
            "sitewire_ingest_storage_behind",
            "Publications whose offsets Redis held for other events (storage went back)",
            registry=registry,
        )
        self.ratelimit_unavailable = Counter(
            "sitewire_ingest_ratelimit_unavailable",
            "Requests let through because the rate limiter could not reach Redis",
            registry=registry,
        )
        # Every label value exported from the start, 0 until it happens: a series that appears
        # only with its first event showed as "No data" on a healthy dashboard, and a rate
        # over it starts late (an outside test).
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for code in ErrorCode:
            self.rejected.labels(code.code)
        for refusal in COMMIT_REFUSALS:
            self.commit_refusals.labels(refusal)
