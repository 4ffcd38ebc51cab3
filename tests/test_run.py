"""`sitewire run` stopped as a person stops it: Ctrl-C at its terminal."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from websockets.sync.client import connect

from app import tokens
from workers.embedded import free_port
from workers.run import DEMO_SITE

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

ALARMING = {"warning", "error", "critical"}


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, signal.SIGHUP],  # Ctrl-C; the terminal closed
    ids=["ctrl-c", "hangup"],
)
def test_ctrl_c_stops_everything_in_order_and_quietly(tmp_path: Path, sig: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    data_dir = tmp_path / ".sitewire"
    ingest, gateway = free_port(), free_port()
    output = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "workers.cli", "run", "--data-dir", str(data_dir),
           "--ingest-port", str(ingest), "--gateway-port", str(gateway)]  # fmt: skip
    with output.open("wb") as log:
        # Its own process group, as a shell runs a foreground job: Ctrl-C signals that group.
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    started: set[int] = set()
    try:
        _wait_for(lambda: "Press Ctrl-C to stop." in output.read_text(), proc, output)
        started = _processes(proc.pid, data_dir)
        # The stack's own processes: 1 ingest, 2 gateways, redis-server, postgres and its
        # backends; none of them in the terminal's process group, so only the parent is told.
        assert len(started) >= 6, started
        assert all(os.getpgid(pid) != proc.pid for pid in started - {proc.pid})
        # Viewers are connected when it stops, as a dashboard and `tail` would be.
        secret = (data_dir / "secret").read_text().strip()
        token = tokens.issue(secret, DEMO_SITE, 600)
        viewer = f"ws://127.0.0.1:{gateway}/v1/sites/{DEMO_SITE}/stream?token={token}"
        with (
            connect(viewer + "&stats=1&last=100"),
            socket.create_connection(("127.0.0.1", gateway)) as stream,
        ):
            request = f"GET /v1/sites/{DEMO_SITE}/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n"
            stream.sendall(request.encode())
            time.sleep(1.5)  # demo events reach them
            began = time.monotonic()
            os.killpg(proc.pid, sig)  # what the terminal does, to its foreground job
            code = proc.wait(30)
            took = time.monotonic() - began
        assert code == 0 and took < 20, output.read_text()
        # Nothing it started is left (PostgreSQL's postmaster may need a moment to go).
        deadline = time.monotonic() + 10
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(started), output.read_text()
    finally:
        if proc.poll() is None:
            started |= _processes(proc.pid, data_dir)
            proc.kill()
            proc.wait()
        _kill(started)  # only what a failure left behind
    text = output.read_text()
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if _level(line) in ALARMING] == [], text
    assert "stopping..." in text


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], output: Path) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, output.read_text()
        time.sleep(0.2)


def _level(line: str) -> str | None:
    """The level of a log line, None for what is not a log line (the banner, say)."""
    if not line.startswith("{"):
        return None
    level: str = orjson.loads(line)["level"]
    return level


def _processes(parent: int, data_dir: Path) -> set[int]:
    """`parent` and every process below it, and the servers that run on `data_dir` (pg_ctl
    detaches PostgreSQL from its parent) with theirs."""
    children: dict[int, list[int]] = {}
    roots = {parent}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        if str(data_dir) in cmdline:
            roots.add(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those still running (a zombie waiting for its parent to read it has stopped)."""
    running = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            running.add(pid)
    return running


def _kill(pids: set[int]) -> None:
    for pid in _alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
