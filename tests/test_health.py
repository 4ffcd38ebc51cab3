from collections.abc import Callable

import httpx

from app.settings import Settings
from tests.processes import AppProcess
from tests.support import sample
from workers.embedded import free_port


def test_both_roles_answer_health_and_readiness(spawn: Callable[..., AppProcess]) -> None:
    for role in ("ingest", "gateway"):
        proc = spawn(role)
        health = httpx.get(f"{proc.url}/healthz").json()
        assert health == {"status": "ok", "role": role}  # nothing about the host
        ready = httpx.get(f"{proc.url}/readyz")
        assert ready.status_code == 200
        expected = {"status": "ready", "role": role, "postgres": "ok", "redis": "ok"}
        if role == "gateway":  # it serves while either store answers (docs/operations.md)
            expected["serving"] = "ok"
        assert ready.json() == expected
        assert httpx.get(f"{proc.internal_url}/readyz").json() == expected


def test_metrics_and_the_replica_name_only_on_the_internal_port(
    spawn: Callable[..., AppProcess],
) -> None:
    for role in ("ingest", "gateway"):
        proc = spawn(role)
        public = httpx.get(f"{proc.url}/metrics")
        assert public.status_code == 404 and public.json()["error"]["code"] == "not_found"
        metrics = httpx.get(f"{proc.internal_url}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert f"sitewire_{role}_" in metrics.text
        health = httpx.get(f"{proc.internal_url}/healthz").json()
        assert health["role"] == role and health["instance"].endswith(f":{proc.pid}")
        # The internal listener serves nothing of the public API.
        other = "/script.js" if role == "ingest" else "/dashboard/example.com"
        assert httpx.get(f"{proc.url}{other}").status_code != 404
        assert httpx.get(f"{proc.internal_url}{other}").status_code == 404


def test_sigterm_stops_a_process(spawn: Callable[..., AppProcess]) -> None:
    proc = spawn("ingest")
    assert proc.stop(timeout=15) == 0


def test_metrics_say_which_servers_answer_and_what_the_process_uses(
    spawn: Callable[..., AppProcess], settings: Settings
) -> None:
    """Probed at each scrape, so an outage shows even when no request needs the server; and
    the process's CPU and memory, which the dashboard sets beside frames and viewers."""
    for role in ("ingest", "gateway"):
        text = httpx.get(f"{spawn(role).internal_url}/metrics").text
        assert sample(text, f'sitewire_{role}_server_up{{server="postgres"}}') == 1
        assert sample(text, f'sitewire_{role}_server_up{{server="redis"}}') == 1
        assert sample(text, "process_cpu_seconds_total") > 0
        assert sample(text, "process_resident_memory_bytes") > 0
    # Both roles start without Redis (ingest stores and acks; the gateway serves from storage).
    nowhere = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for role in ("ingest", "gateway"):
        text = httpx.get(f"{spawn(role, nowhere).internal_url}/metrics", timeout=10).text
        assert sample(text, f'sitewire_{role}_server_up{{server="postgres"}}') == 1
        assert sample(text, f'sitewire_{role}_server_up{{server="redis"}}') == 0
