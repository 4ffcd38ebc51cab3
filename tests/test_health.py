from collections.abc import Callable

import httpx

from tests.processes import AppProcess


def test_both_roles_answer_health_and_readiness(spawn: Callable[..., AppProcess]) -> None:
    for role in ("ingest", "gateway"):
        proc = spawn(role)
        health = httpx.get(f"{proc.url}/healthz").json()
        assert health["status"] == "ok" and health["role"] == role and health["instance"]
        ready = httpx.get(f"{proc.url}/readyz")
        assert ready.status_code == 200
        expected = {"status": "ready", "role": role, "postgres": "ok", "redis": "ok"}
        if role == "gateway":  # it serves while either store answers (docs/operations.md)
            expected["serving"] = "ok"
        assert ready.json() == expected
        metrics = httpx.get(f"{proc.url}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")


def test_sigterm_stops_a_process(spawn: Callable[..., AppProcess]) -> None:
    proc = spawn("ingest")
    assert proc.stop(timeout=15) == 0
