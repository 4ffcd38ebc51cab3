"""What a chaos scenario found: the verdict of each check, its figures, one printed line per
scenario and a Markdown table of all of them (for docs/operations.md)."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (an observed value, never interpolated); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Latency:
    """Ingest acknowledgement latency over one window, in milliseconds."""

    p50_ms: float | None
    p99_ms: float | None
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        p50, p99 = percentile(seconds, 50), percentile(seconds, 99)
        return cls(
            None if p50 is None else p50 * 1000, None if p99 is None else p99 * 1000, len(seconds)
        )

    def __str__(self) -> str:
        if self.p50_ms is None or self.p99_ms is None:
            return "n/a"
        return f"{self.p50_ms:.1f}/{self.p99_ms:.1f}"


@dataclass
class ScenarioResult:
    scenario: str
    pace: str
    acked: int = 0
    #: Posts answered with anything but 202, or not answered at all (transport error).
    failed_posts: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    #: Rows of the site in PostgreSQL, and how many of them belong to failed posts.
    stored: int = 0
    stored_unacked: int = 0
    stored_exactly_once: bool = False
    storage_problems: list[str] = field(default_factory=list)
    viewers_exact: bool = False
    viewer_problems: list[str] = field(default_factory=list)
    recovered_false: list[dict[str, Any]] = field(default_factory=list)
    #: The longest time any viewer went without an event while posting went on (which
    #: includes time when nothing could be committed, e.g. PostgreSQL down), and which viewer.
    longest_silence_s: float | None = None
    silence_where: str = ""
    #: The longest any event took from its acknowledgement to a viewer.
    max_lag_s: float | None = None
    #: Connections the viewers opened after their first one.
    reconnects: int = 0
    #: Ack latency of posts sent before the fault (after a warm-up) and while it lasted.
    quiet: Latency = Latency(None, None, 0)
    fault: Latency = Latency(None, None, 0)
    fault_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one line a scenario prints."""
        silence = _seconds(self.longest_silence_s)
        return (
            f"CHAOS [{self.scenario} / {self.pace}] acked={self.acked} "
            f"failed_posts={self.failed_posts}{_kinds(self.failure_kinds)} stored={self.stored} "
            f"(unacked {self.stored_unacked}) exactly_once={_yes(self.stored_exactly_once)} "
            f"viewers_exact={_yes(self.viewers_exact)} recovered_false={len(self.recovered_false)} "
            f"silence={silence}s{self.silence_where} max_lag={_seconds(self.max_lag_s)}s "
            f"reconnects={self.reconnects} fault={self.fault_s:.1f}s "
            f"ack_ms p50/p99 quiet={self.quiet} (n={self.quiet.count}) "
            f"fault={self.fault} (n={self.fault.count})"
            + (f" notes: {'; '.join(self.notes)}" if self.notes else "")
        )

    def markdown_row(self) -> str:
        cells = [
            self.scenario,
            str(self.acked),
            _yes(self.stored_exactly_once),
            _yes(self.viewers_exact),
            str(len(self.recovered_false)),
            _seconds(self.longest_silence_s),
            _seconds(self.max_lag_s),
            str(self.quiet),
            str(self.fault),
            f"{self.failed_posts}{_kinds(self.failure_kinds)}",
            "; ".join(self.notes),
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| scenario | events acked | stored exactly once | viewers exact | recovered:false notices "
    "| longest silence (s) | max ack-to-viewer lag (s) | ack p50/p99 quiet (ms) "
    "| ack p50/p99 during fault (ms) | non-2xx posts | notes |\n"
    "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def markdown_table(results: Sequence[ScenarioResult]) -> str:
    return "\n".join([HEADER, *(r.markdown_row() for r in results)]) + "\n"


def write_table(results: Sequence[ScenarioResult]) -> Path:
    """Write the table under $TMPDIR (not the work tree: it is a run's output) and return
    where."""
    path = Path(tempfile.gettempdir()) / f"sitewire-chaos-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(markdown_table(results))
    return path


#: Every result of this session, in the order the scenarios ran (for the summary table).
RESULTS: list[ScenarioResult] = []


def record(result: ScenarioResult) -> None:
    """Print the scenario's line and keep it for the session's table. Called before the
    scenario asserts anything, so a failing scenario is in the table too."""
    print(result.line())
    RESULTS.append(result)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _kinds(kinds: dict[str, int]) -> str:
    if not kinds:
        return ""
    return " (" + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) + ")"
