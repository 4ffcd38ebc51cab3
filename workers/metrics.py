"""The worker's Prometheus metrics (`sitewire worker --internal-port`): whether its passes run
and succeed. A stopped or failing worker costs no event (ingest makes a missing partition
itself), but retention stops and the database grows: the alerts SitewireWorkerStalled and
SitewireNoWorker (deploy/prometheus/alerts.yml) watch these."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

#: `passes` labels: finished without error, failed (retried next interval), or skipped
#: because another worker's pass held the lock.
OUTCOMES = ("done", "failed", "skipped")


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, interval_s: float) -> None:
        self.passes = Counter(
            "sitewire_worker_passes",
            "Background passes, by outcome: done, failed (retried next interval), or skipped "
            "(another worker's pass held the lock).",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.passes.labels(outcome)
        self.last_done = Gauge(
            "sitewire_worker_last_pass_timestamp_seconds",
            "When this worker last finished a pass without error (Unix time; 0 before its "
            "first). Skipped passes leave it: the worker that ran the pass sets its own.",
            registry=registry,
        )
        self.interval = Gauge(
            "sitewire_worker_interval_seconds",
            "SITEWIRE_WORKER_INTERVAL_S: the time between passes.",
            registry=registry,
        )
        self.interval.set(interval_s)
        self.partitions_created = Counter(
            "sitewire_worker_partitions_created",
            "Partitions of events (months) and event_ids (days) made ahead of ingest.",
            registry=registry,
        )
        self.partitions_dropped = Counter(
            "sitewire_worker_partitions_dropped",
            "Months of events dropped whole past retention.",
            registry=registry,
        )
