"""Commands refuse what cannot work in one line, with a non-zero exit and no traceback, before
they start anything (docs/operations.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from workers.embedded import free_port, free_ports


def sitewire(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def refused(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode != 0, done.stdout + done.stderr
    assert fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--ingest-port", "9301", "--gateway-port", "9301"], "must differ from --gateway-port"),
        (["--gateway-port", "9302", "--demo-port", "9302"], "must differ from --demo-port"),
        (["--ingest-port", "70000"], "70000 is not in the range 1<=x<=65535"),
        (["--demo-port", "0"], "0 is not in the range"),
    ],
)
def test_run_refuses_ports_it_cannot_use(args: list[str], fragment: str) -> None:
    refused(sitewire("run", "--data-dir", "/nonexistent/never-made", *args), fragment)


def test_a_role_on_a_port_in_use_says_so_in_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for args in (["--port", str(port)], ["--port", str(free_port()), "--internal-port",
                                              str(port)]):  # fmt: skip
            done = sitewire(
                "ingest", "--host", "127.0.0.1", *args,
                DATABASE_URL="postgresql://x/y", REDIS_URL="redis://127.0.0.1:1",
            )  # fmt: skip
            refused(done, f"cannot listen on 127.0.0.1:{port}: Address already in use")
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.embedded
def test_run_with_an_unreachable_database_says_so_in_one_line(tmp_path: os.PathLike[str]) -> None:
    ingest, gateway, nowhere = free_ports(3)
    done = sitewire(
        "run", "--data-dir", str(tmp_path), "--no-demo",
        "--ingest-port", str(ingest), "--gateway-port", str(gateway),
        DATABASE_URL=f"postgresql://nobody@127.0.0.1:{nowhere}/x",
        REDIS_URL=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )  # fmt: skip
    refused(done, "sitewire: cannot prepare the database: ")


def test_ports_chosen_together_differ() -> None:
    """Two ports taken one at a time once came out the same (the kernel handed a just-closed
    port out again), and a process was refused its private port: chosen together, they
    differ, and one chosen beside others avoids them."""
    from workers.embedded import free_ports

    for _ in range(20):
        ports = free_ports(8)
        assert len(set(ports)) == 8
        assert free_port(avoid=set(ports)) not in ports
