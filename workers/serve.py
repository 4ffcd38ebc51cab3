"""Run one role's ASGI app under uvicorn, with a gateway drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Literal

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from app import heap, logs
from app.gateway import app as gateway
from app.gateway.transports.websocket import MAX_CLIENT_FRAME, protocol_class
from app.ingest import app as ingest
from app.settings import Settings
from app.web import http

Role = Literal["ingest", "gateway"]
log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, plus: a drain step before shutdown, and exit code 0 after a clean
    stop (uvicorn re-raises the signal, so the process would otherwise "die" of SIGTERM)."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[], Awaitable[None]] | None,
        heap_thresholds: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._heap_thresholds = heap_thresholds
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._heap_thresholds is not None:
            # The app's startup is done: what exists now lives as long as we do.
            heap.settle(self._heap_thresholds)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None and not self._draining and self._loop is not None:
            # First signal: drain (tell viewers to reconnect elsewhere), then shut down.
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain, sig)
            return
        self._exit(sig, frame)

    def _start_drain(self, sig: int) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        assert self._drain is not None
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed; shutting down anyway")
        # A signal that came during the drain has already begun the shutdown: exiting again
        # would count as a second signal, which for SIGINT is uvicorn's force-quit (it skips
        # the lifespan's shutdown, whose cancelled task then logs a CancelledError traceback).
        if not self.should_exit:
            self._exit(sig, None)

    def _exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def listening_socket(host: str, port: int, reuse_port: bool, backlog: int) -> socket.socket:
    """The listening socket. With `reuse_port`, several processes bind the same port and the
    kernel spreads new connections across them: replicas behind one port, no proxy. `backlog`
    is listen(2)'s (the kernel caps it at net.core.somaxconn)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"sitewire: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Listeners:
    """One server, two listening sockets: a request that arrives on the internal one (metrics
    and probes, app.web.health) goes to the role's internal app, everything else (the lifespan
    included) to the role's app. One server, so one set of signal handlers and one shutdown."""

    def __init__(self, app: ingest.IngestApp | gateway.GatewayApp, internal_port: int) -> None:
        self.app = app
        self.internal_port = internal_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] == self.internal_port:
            await self.app.internal(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def serve(
    role: Role,
    settings: Settings,
    host: str,
    port: int,
    reuse_port: bool = False,
    internal: tuple[str, int] | None = None,
) -> None:
    """Serve `role` on host:port; with `internal` (host, port), metrics and probes there too."""
    logs.configure(role, settings.log_level, settings.log_format)
    app: ingest.IngestApp | gateway.GatewayApp = (
        ingest.create_app(settings) if role == "ingest" else gateway.create_app(settings)
    )
    sockets = [listening_socket(host, port, reuse_port, settings.listen_backlog)]
    entry: ASGIApp = app
    if internal is not None:
        # Never shared with other replicas: each process's metrics must be its own.
        sockets.append(listening_socket(*internal, False, settings.listen_backlog))
        entry = Listeners(app, internal[1])
    config = server_config(app, entry, settings, host, port, internal[1] if internal else None)
    drain = None
    if role == "gateway":

        async def drain() -> None:
            await app.state.gateway.drain()

    # Each role's measured thresholds (app/heap.py).
    thresholds = heap.THRESHOLDS if role == "ingest" else heap.GATEWAY_THRESHOLDS
    _Server(config, drain, thresholds).run(sockets=sockets)


def server_config(
    app: ingest.IngestApp | gateway.GatewayApp,
    entry: ASGIApp,
    settings: Settings,
    host: str,
    port: int,
    internal_port: int | None = None,
) -> uvicorn.Config:
    """uvicorn's configuration for `app` (served through `entry`; `internal_port` is the
    listener for metrics and probes)."""
    direct = app.direct() if isinstance(app, ingest.IngestApp) else {}
    return uvicorn.Config(
        entry,
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # access logs would record client IPs and viewer tokens
        # Per-message compression costs ~64 KiB per connection; off (docs/decisions.md).
        ws_per_message_deflate=False,
        # The gateway's WebSocket streams are served by our own protocol class (no ASGI, no
        # task per idle viewer: app.gateway.transports.websocket); ingest has no WebSocket
        # endpoint and keeps uvicorn's sans-I/O one, the leanest of its implementations.
        ws=protocol_class(app.websockets)
        if isinstance(app, gateway.GatewayApp)
        else "websockets-sansio",
        # Frames up to 16x the protocol limit reach the app (closed with FRAME_TOO_LARGE);
        # larger ones are refused by the transport itself (1009). Keepalive pings are the
        # gateway's own (settings.ping_interval_s / ping_timeout_s).
        ws_max_size=16 * MAX_CLIENT_FRAME,
        # Bounds uvicorn lacks (header and body deadlines, header size), and ingest's event
        # endpoints served without ASGI: app/web/http.py.
        http=http.protocol_class(settings, direct, internal_port),
        # X-Forwarded-For is believed only from SITEWIRE_TRUSTED_PROXIES (app.ingest.enrich);
        # uvicorn's own handling would believe it from 127.0.0.1 whatever that setting says.
        proxy_headers=False,
        timeout_keep_alive=settings.keepalive_s,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
        server_header=False,
        # uvicorn listens on the sockets again, with this backlog (its default is 2048, which
        # silently replaced the one above until the bench's reconnect storms showed it).
        backlog=settings.listen_backlog,
    )
