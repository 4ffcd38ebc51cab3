"""Start real Sitewire processes on free ports, wait until ready, stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from workers.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


class AppProcess:
    """One `sitewire ROLE` process. Its output goes to a log file shown when it fails. The
    worker has no public port: it listens on its private one only, for /metrics."""

    def __init__(
        self, role: str, env: dict[str, str], log_dir: Path, port: int | None = None
    ) -> None:
        self.role = role
        self.port = port or free_port()
        # Metrics and probes (app.web.health): a port of its own, never the public one.
        self.internal_port = free_port(avoid={self.port})
        self.env = env
        self.log_path = log_dir / f"{role}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> AppProcess:
        cmd = [sys.executable, "-m", "workers.cli", self.role]
        if self.role != "worker":
            cmd += ["--port", str(self.port)]
        cmd += ["--internal-port", str(self.internal_port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **self.env}, stdout=log, stderr=log, cwd=ROOT
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        probe = f"{self.internal_url}/metrics" if self.role == "worker" else f"{self.url}/readyz"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited early:\n{self.log()}")
            try:
                if httpx.get(probe, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.role} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def restarted(self) -> AppProcess:
        """A new process of the same role on the same port (after this one stopped)."""
        return AppProcess(self.role, self.env, self.log_path.parent, self.port).start()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
