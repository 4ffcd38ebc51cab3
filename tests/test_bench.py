"""A smoke run of `make bench` (bench/run.py --quick): every scenario runs end to end."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_quick_bench_runs_every_scenario(tmp_path: Path, database_url: str) -> None:
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    for scenario in ("0 loadgen self-check", "1 end-to-end", "2a fanout 1 site",
                     "2b fanout 100 sites", "3 idle", "4 ingest single", "4 ingest batch 50",
                     "5 resume storm"):  # fmt: skip
        assert f"| {scenario} |" in table
    rows = {tuple(line.split(" | ")[:2]): line for line in table.splitlines()}
    for ingest in ("| 4 ingest single", "| 4 ingest batch 50"):
        assert "| 1.00 |" in rows[(ingest, "acked == stored")]  # durable ack held under load
    exact = rows[("| 5 resume storm", "every viewer exact (events == viewers x behind)")]
    assert "| 1.00 |" in exact  # the reconnect storm replayed every event, once
    assert (tmp_path / "bench.json").exists()
