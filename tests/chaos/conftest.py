"""Fixtures of the chaos suite: its processes, the servers it may break, and the results
table at the end of the session."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Cluster, pace_from_env
from tests.chaos.proxy import PausableProxy
from tests.chaos.report import RESULTS, markdown_table, write_table
from workers.embedded import EmbeddedRedis


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The scenario's ingest and gateway processes; all stopped afterwards (logs in
    tmp_path)."""
    procs = Cluster(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def chaos_redis(private_redis: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    """A private Redis to kill or freeze. Thawed afterwards in case a scenario failed while
    it was stopped (the `private_redis` teardown then stops it)."""
    yield private_redis
    with contextlib.suppress(ProcessLookupError):
        os.kill(private_redis.pid, signal.SIGCONT)


@pytest.fixture
async def redis_proxy(chaos_redis: EmbeddedRedis) -> AsyncIterator[PausableProxy]:
    """A link to the private Redis that can be cut; resumed and closed afterwards."""
    proxy = await PausableProxy(chaos_redis.port).start()
    yield proxy
    await proxy.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The results of every scenario that ran, as a Markdown table; a full run also writes it
    to a file under $TMPDIR, for docs/operations.md."""
    if not RESULTS:
        return
    terminalreporter.section("chaos results")
    for line in markdown_table(RESULTS).splitlines():
        terminalreporter.write_line(line)
    if pace_from_env().full:
        terminalreporter.write_line(f"table written to {write_table(RESULTS)}")
