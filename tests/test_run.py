"""`sitewire run` stopped as a person stops it: Ctrl-C at its terminal."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.sync.client import connect

from app import tokens
from workers.embedded import free_ports
from workers.run import DEMO_SITE

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

ALARMING = {"warning", "error", "critical"}
#: A log line as `app.logs.TextFormatter` writes it: time, level, role, message.
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (debug|info|warning|error|critical) +(ingest|gateway) \S")


@pytest.mark.parametrize(
    ("sig", "background"),
    # Ctrl-C; the terminal closed; SIGINT to a stack a script started with `&` (which starts
    # it with SIGINT ignored: an outside tester's stack went on running)
    [(signal.SIGINT, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
    ids=["ctrl-c", "hangup", "sigint-to-a-background-job"],
)
def test_ctrl_c_stops_everything_in_order_and_quietly(
    tmp_path: Path, sig: int, background: bool
) -> None:
    """`sitewire run` in a terminal, as a person runs it: readable logs, and a stop that
    leaves nothing running and logs nothing alarming."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.pop("SITEWIRE_LOG_FORMAT", None)
    data_dir = tmp_path / ".sitewire"
    ingest, gateway, demo = free_ports(3)
    cmd = [sys.executable, "-m", "workers.cli", "run", "--data-dir", str(data_dir),
           "--ingest-port", str(ingest), "--gateway-port", str(gateway),
           "--demo-port", str(demo)]  # fmt: skip
    terminal = Terminal()
    # Its own process group, as a shell runs a foreground job: Ctrl-C signals that group.
    proc = terminal.run(cmd, env, ignore_sigint=background)
    started: set[int] = set()
    try:
        _wait_for(lambda: "Press Ctrl-C to stop." in terminal.text(), proc, terminal)
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
        assert code == 0 and took < 20, terminal.text()
        # Nothing it started is left (PostgreSQL's postmaster may need a moment to go).
        deadline = time.monotonic() + 10
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(started), terminal.text()
    finally:
        if proc.poll() is None:
            started |= _processes(proc.pid, data_dir)
            proc.kill()
            proc.wait()
        _kill(started)  # only what a failure left behind
        terminal.close()
    text = terminal.text()
    assert "Traceback" not in text and "\x1b" not in text, text
    assert "stopping..." in text
    # The children's logs are for a person here: text lines (the parent's terminal is theirs),
    # a handful before the banner, none while it idles, and nothing above info at all.
    lines = text.splitlines()
    logged = [line for line in lines if TEXT_LINE.match(line)]
    assert logged and not [line for line in lines if line.startswith("{")], text
    assert [line for line in logged if line.split()[1] in ALARMING] == [], text
    banner, stop = lines.index("Sitewire is running."), lines.index("stopping...")
    assert not [line for line in lines[banner:stop] if TEXT_LINE.match(line)], text


class Terminal:
    """A pseudo-terminal for a process's stdin, stdout and stderr, as a shell gives it. A
    thread collects what it shows (a pty whose buffer is full blocks its writers)."""

    def __init__(self) -> None:
        self._master, self._slave = pty.openpty()
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)

    def run(
        self, cmd: list[str], env: dict[str, str], ignore_sigint: bool = False
    ) -> subprocess.Popen[bytes]:
        """`ignore_sigint`: started as a non-interactive shell starts a job with `&`."""
        slave = self._slave

        def ignore() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        proc = subprocess.Popen(
            cmd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=ignore if ignore_sigint else None,
        )  # fmt: skip
        os.close(slave)
        self._reader.start()
        return proc

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: no process has the terminal open any more
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        self._reader.join(5)
        os.close(self._master)


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], out: Terminal) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, out.text()
        time.sleep(0.2)


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


def test_a_killed_stack_takes_its_processes_with_it_and_the_next_one_stops_cleanly(
    tmp_path: Path,
) -> None:
    """`sitewire run` killed outright (kill -9, the OOM killer): its ingest, gateways and Redis
    stop on their own, PostgreSQL is left for the next stack of the same folder, which takes
    it over and stops it on Ctrl-C (pgserver alone kept it running for ever)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    data_dir = tmp_path / ".sitewire"
    ingest, gateway = free_ports(2)
    cmd = [sys.executable, "-m", "workers.cli", "run", "--data-dir", str(data_dir),
           "--ingest-port", str(ingest), "--gateway-port", str(gateway), "--no-demo"]  # fmt: skip
    started: set[int] = set()
    terminals = [Terminal(), Terminal()]
    try:
        first = terminals[0].run(cmd, env)
        _wait_for(lambda: "Press Ctrl-C to stop." in terminals[0].text(), first, terminals[0])
        assert "demo.sitewire.dev" not in terminals[0].text()  # --no-demo: no site, no links
        started = _processes(first.pid, data_dir)
        postgres = {p for p in started if "postgres" in Path(f"/proc/{p}/cmdline").read_text()}
        first.kill()
        first.wait()
        deadline = time.monotonic() + 30
        while _alive(started - postgres) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(started - postgres), terminals[0].text()
        second = terminals[1].run(cmd, env)
        _wait_for(lambda: "Press Ctrl-C to stop." in terminals[1].text(), second, terminals[1])
        started |= _processes(second.pid, data_dir)
        os.killpg(second.pid, signal.SIGINT)
        assert second.wait(30) == 0, terminals[1].text()
        deadline = time.monotonic() + 10
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(started), terminals[1].text()
        assert "Traceback" not in terminals[1].text()
    finally:
        _kill(started)  # only what a failure left behind
        for terminal in terminals:
            terminal.close()
