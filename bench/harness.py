"""What every bench scenario shares: the processes under test and their environment (`Env`),
the load generators (`LoadGen`, the C programs), and the results table's row (`Row`).

bench/run.py (scenarios 0-5 and the table) and bench/scale.py (scenario 6) both build on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app import tokens
from workers.embedded import free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-" + "b" * 32
PAD = "x" * 60  # brings an event to ~300 bytes
CORES = os.cpu_count() or 1


def pinned(core: int | None) -> list[str]:
    """The command prefix that pins a process to `core` (None: not pinned)."""
    return ["taskset", "-c", str(core)] if CORES >= 2 and core is not None else []


@dataclass
class Row:
    scenario: str
    metric: str
    ours: float
    naive: float | None = None
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> str:
        if self.naive in (None, 0) or self.naive != self.naive:
            return ""
        return f"{self.ours / self.naive:.2f}x"


@dataclass
class Env:
    database_url: str
    redis_url: str
    prefix: str
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Each Sitewire process's private metrics port, by its public port.
    internal: dict[int, int] = field(default_factory=dict)

    def environ(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            SITEWIRE_KEY_PREFIX=self.prefix,
            SITEWIRE_SECRET=SECRET,
            SITEWIRE_RATE_SITE_PER_SEC="0",
            SITEWIRE_RATE_IP_PER_MIN="0",
            SITEWIRE_LOG_LEVEL="WARNING",
        )
        env.update(extra)  # a scenario may set any of the above its own way
        return env

    def start(
        self,
        argv: list[str],
        port: int,
        core: int | None,
        extra: dict[str, str] | None = None,
        ready_port: int | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `python -m ARGV` with `extra` in its environment and wait until it answers
        on `ready_port` (default `port`; replicas sharing a port are told apart by their private
        ports). `preexec` runs in the child before it starts (bench/scale.py raises the child's
        file limit there)."""
        log = (self.logs / f"{argv[0]}-{ready_port or port}.log").open("ab")
        cmd = [*pinned(core), sys.executable, "-m", *argv]
        env = self.environ(**(extra or {}))
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT, preexec_fn=preexec)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                path = "/readyz" if argv[0] == "workers.cli" else "/docs"
                url = f"http://127.0.0.1:{ready_port or port}{path}"
                if httpx.get(url, timeout=1).status_code < 500:
                    return proc
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited; see {log.name}")
            time.sleep(0.1)
        raise RuntimeError(f"{argv} did not start")

    def role(
        self, role: str, core: int | None = 0, **extra: str
    ) -> tuple[subprocess.Popen[bytes], int]:
        """A Sitewire process on a free port, with its metrics on a private one
        (`self.metrics_url(port)`)."""
        port, internal = free_ports(2)
        self.internal[port] = internal
        argv = ["workers.cli", role, "--port", str(port), "--internal-port", str(internal)]
        return self.start(argv, port, core, extra), port

    def metrics_url(self, port: int) -> str:
        return f"http://127.0.0.1:{self.internal[port]}/metrics"

    def naive(self, core: int = 0) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        argv = ["bench.naive", "--port", str(port), "--redis", self.redis_url]
        return self.start([*argv, "--prefix", self.prefix], port, core), port

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)


class LoadGen:
    """The viewers process, pinned to core 1: bench/viewers.c (compiled on first use), or with
    `kind="picows"` the Python one (bench/loadgen.py). Same arguments, same control protocol."""

    def __init__(self, urls: list[str], count: int, kind: str | None = None) -> None:
        kind = kind or os.environ.get("SITEWIRE_BENCH_VIEWERS", "c")
        binary = viewers_binary() if kind == "c" else None
        if binary is not None:
            program = [str(binary)]
        else:
            program = [sys.executable, "-m", "bench.loadgen", "viewers"]
        args = [*pinned(1), *program, "--count", str(count)]
        for url in urls:
            args += ["--url", url]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        self.ready = self._read()
        if self.ready.get("open", count) < count:  # the picows viewers raise instead
            self.close()
            raise RuntimeError(f"only {self.ready['open']} of {count} viewers connected")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("load generator exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def command(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def c_program(name: str) -> Path | None:
    """bench/NAME.c compiled (again when the source is newer), in bench/.build; None, with a
    warning, when there is no C compiler."""
    source = ROOT / "bench" / f"{name}.c"
    binary = ROOT / "bench" / ".build" / name
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        try:
            subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"bench: cannot build bench/{name}.c ({exc})", file=sys.stderr)
            return None
    return binary


def viewers_binary() -> Path | None:
    """bench/viewers.c compiled; None when it cannot be (the picows viewers are used instead)."""
    return c_program("viewers")


def write_cost(quick: bool) -> dict[str, Any] | None:
    """The host's floor per fan-out write (bench/writes.c): a frame to each of 1,000 loopback
    TCP connections from C. None without a C compiler."""
    binary = c_program("writes")
    if binary is None:
        return None
    rounds = "20" if quick else "300"
    try:
        done = subprocess.run(
            [str(binary), "--rounds", rounds], capture_output=True, check=True, timeout=60
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"bench: bench/writes.c failed ({exc})", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def host_cpu_s() -> float:
    """CPU seconds every core of this host has spent busy since boot (/proc/stat: all but
    idle and iowait), whoever spent them."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stream_urls(port: int, sites: list[str]) -> list[str]:
    return [
        f"ws://127.0.0.1:{port}/v1/sites/{s}/stream?token={tokens.issue(SECRET, s, 86400)}"
        for s in sites
    ]
