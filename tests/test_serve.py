"""workers/serve.py: the gateway's drain before uvicorn's shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import uvicorn
from starlette.types import Receive, Scope, Send

from app.gateway import app as gateway
from app.settings import Settings
from workers.serve import _Server, listening_socket, server_config

ROOT = Path(__file__).resolve().parent.parent


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("not served in these tests")


async def test_a_signal_during_the_drain_is_not_taken_for_a_second_ctrl_c() -> None:
    """SIGINT, then SIGTERM while draining (a terminal's Ctrl-C and a supervisor's stop):
    the drain's end must not count as one more SIGINT, which uvicorn takes for a force-quit
    that skips the lifespan's shutdown (and logs its cancelled task's traceback)."""
    released = asyncio.Event()
    server = _Server(uvicorn.Config(_app, log_config=None), drain=released.wait)
    server._loop = asyncio.get_running_loop()
    server.handle_exit(signal.SIGINT, None)  # begins the drain
    await asyncio.sleep(0)
    server.handle_exit(signal.SIGTERM, None)  # shuts down now
    assert server.should_exit and not server.force_exit
    released.set()
    assert server._drain_task is not None
    await server._drain_task
    assert not server.force_exit
    assert server._captured_signals == []  # exit code 0, no re-raised signal


async def test_the_first_signal_drains_then_shuts_down() -> None:
    released = asyncio.Event()
    server = _Server(uvicorn.Config(_app, log_config=None), drain=released.wait)
    server._loop = asyncio.get_running_loop()
    server.handle_exit(signal.SIGINT, None)
    await asyncio.sleep(0)
    assert not server.should_exit  # still serving while viewers are told to leave
    released.set()
    assert server._drain_task is not None
    await server._drain_task
    assert server.should_exit and not server.force_exit
    assert server._captured_signals == []


def test_the_listen_backlog_is_the_setting_on_both_listens() -> None:
    """uvicorn calls listen(2) again on the sockets it is given, with its own backlog (2048)
    unless told: SITEWIRE_LISTEN_BACKLOG must reach both calls (the second one wins)."""
    settings = Settings.from_env({"SITEWIRE_SECRET": "s" * 40, "SITEWIRE_LISTEN_BACKLOG": "1234"})
    app = gateway.create_app(settings)
    assert server_config(app, app, settings, "127.0.0.1", 0).backlog == 1234
    with listening_socket("127.0.0.1", 0, False, settings.listen_backlog) as sock:
        assert sock.getsockname()[1] > 0  # bound and listening (the kernel keeps the backlog)


def test_a_server_settles_its_heap_once_started_with_the_thresholds_given(tmp_path: Path) -> None:
    """app/heap.py: after startup, the heap is frozen and the collector's thresholds are the
    role's (workers/serve.py); without thresholds, CPython's defaults. Run in a child: freezing
    this test process would change how every later test collects."""
    script = """
import asyncio, gc, sys
import uvicorn
from workers.serve import _Server

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

async def main(settle):
    thresholds = (1234, 5, 678) if settle else None
    server = _Server(uvicorn.Config(app, log_config=None, port=0), None, thresholds)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print(gc.get_freeze_count() > 0, *gc.get_threshold())
    server.should_exit = True
    await serving

asyncio.run(main(sys.argv[1] == "1"))
"""
    path = tmp_path / "settle.py"
    path.write_text(script)
    found = []
    for settle in ("1", "0"):
        done = subprocess.run(
            [sys.executable, str(path), settle], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        found.append(done.stdout.split())
    assert found == [["True", "1234", "5", "678"], ["False", "700", "10", "10"]]
