"""Health and metrics, shared by both roles, split by who may ask.

Public (the role's own port, reachable by load balancers and the internet):
- /healthz: the process is alive (no I/O). Says nothing about the host.
- /readyz: 200 when every server the role *needs* answers; the body reports each server, so
  an operator also sees optional ones (ingest keeps working with Redis down).

Internal (a second, private listener: `--internal-port`; nothing else is served there):
- /metrics: Prometheus text format from the app's own registry, the process's own metrics
  (CPU, memory, descriptors) and `sitewire_<role>_server_up{server}`, probed at each scrape.
- /healthz: as above, plus which replica answered (host:pid).
- /readyz: as above.

Metrics and the replica's name stay off the public port: they tell an attacker the load, the
error rates and the host names (docs/decisions.md).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    ProcessCollector,
    generate_latest,
)

from app.servers import Status
from app.web.responses import API_OPTIONS, install_error_handlers, json_response

Checks = Callable[[], Awaitable[dict[str, Status]]]

#: The backing servers among a role's checks, exported as `sitewire_<role>_server_up{server}`.
SERVERS = ("postgres", "redis")


class Health:
    """One role's probes. `checks()` returns the probe coroutine function of the running app
    (resolved per request because the resources only exist once the lifespan has started)."""

    def __init__(
        self,
        role: str,
        checks: Callable[[], Checks],
        required: frozenset[str],
        registry: CollectorRegistry,
    ) -> None:
        self.role = role
        self._checks = checks
        self._required = required
        self._registry = registry
        # Probed at every scrape, not only when a request needs the server: on a quiet
        # deployment an outage would otherwise show in no metric, so no alert could fire.
        self.server_up = Gauge(
            f"sitewire_{role}_server_up",
            "1 when the backing server answered this scrape's probe, else 0",
            ["server"],
            registry=registry,
        )
        # A role's own registry has none of the default one's process metrics; the dashboard
        # needs CPU beside frames/s (a saturated gateway) and memory beside viewers.
        ProcessCollector(registry=registry)

    def public_router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/healthz", self._alive, include_in_schema=False)
        router.add_api_route("/readyz", self._ready, include_in_schema=False)
        return router

    def internal_app(self) -> FastAPI:
        """The internal listener's whole app: metrics and the probes, nothing else."""
        # Which replica answered: several may share one port (SO_REUSEPORT) or one Service.
        instance = f"{socket.gethostname()}:{os.getpid()}"

        async def alive() -> Response:
            return json_response({"status": "ok", "role": self.role, "instance": instance})

        async def metrics() -> Response:
            await self._probe_servers()
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        app = FastAPI(title=f"Sitewire {self.role} (internal)", **API_OPTIONS)
        app.add_api_route("/healthz", alive, include_in_schema=False)
        app.add_api_route("/readyz", self._ready, include_in_schema=False)
        app.add_api_route("/metrics", metrics, include_in_schema=False)
        install_error_handlers(app)
        return app

    async def _alive(self) -> Response:
        return json_response({"status": "ok", "role": self.role})

    async def _probe_servers(self) -> None:
        """Each probe waits at most PROBE_TIMEOUT_S, so a hung server slows a scrape by about
        a second per server (well inside Prometheus's 10 s scrape timeout) and shows as 0."""
        results = await self._checks()()
        for server in SERVERS:
            if server in results:
                self.server_up.labels(server).set(1 if results[server] == "ok" else 0)

    async def _ready(self) -> Response:
        results = await self._checks()()
        ready = all(results.get(name) == "ok" for name in self._required)
        body = {"status": "ready" if ready else "unavailable", "role": self.role, **results}
        return json_response(body, status_code=200 if ready else 503)
