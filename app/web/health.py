"""Health and metrics, shared by both roles, split by who may ask.

Public (the role's own port, reachable by load balancers and the internet):
- /healthz: the process is alive (no I/O). Says nothing about the host.
- /readyz: 200 when every server the role *needs* answers; the body reports each server, so
  an operator also sees optional ones (ingest keeps working with Redis down).

Internal (a second, private listener: `--internal-port`; nothing else is served there):
- /metrics: Prometheus text format from the app's own registry.
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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.servers import Status
from app.web.responses import API_OPTIONS, install_error_handlers, json_response

Checks = Callable[[], Awaitable[dict[str, Status]]]


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
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        app = FastAPI(title=f"Sitewire {self.role} (internal)", **API_OPTIONS)
        app.add_api_route("/healthz", alive, include_in_schema=False)
        app.add_api_route("/readyz", self._ready, include_in_schema=False)
        app.add_api_route("/metrics", metrics, include_in_schema=False)
        install_error_handlers(app)
        return app

    async def _alive(self) -> Response:
        return json_response({"status": "ok", "role": self.role})

    async def _ready(self) -> Response:
        results = await self._checks()()
        ready = all(results.get(name) == "ok" for name in self._required)
        body = {"status": "ready" if ready else "unavailable", "role": self.role, **results}
        return json_response(body, status_code=200 if ready else 503)
