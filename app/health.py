"""/healthz, /readyz and /metrics, shared by both roles.

- /healthz: the process is alive (no I/O).
- /readyz: 200 when every server the role *needs* answers; the body reports each server, so
  an operator also sees optional ones (ingest keeps working with Redis down).
- /metrics: Prometheus text format from the app's own registry.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.connections import Status
from app.responses import json_response

Checks = Callable[[], Awaitable[dict[str, Status]]]


def health_router(
    role: str, checks: Callable[[], Checks], required: frozenset[str], registry: CollectorRegistry
) -> APIRouter:
    """`checks()` returns the probe coroutine function of the running app (resolved per request
    because the resources only exist once the lifespan has started)."""
    router = APIRouter()
    # Which replica answered: several may share one port (SO_REUSEPORT) or one Service.
    instance = f"{socket.gethostname()}:{os.getpid()}"

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return json_response({"status": "ok", "role": role, "instance": instance})

    @router.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        results = await checks()()
        ready = all(results.get(name) == "ok" for name in required)
        body = {"status": "ready" if ready else "unavailable", "role": role, **results}
        return json_response(body, status_code=200 if ready else 503)

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
