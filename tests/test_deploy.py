"""deploy/ is validated offline: a broken manifest fails CI."""

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from workers.cli import main as cli

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_workloads_have_probes_non_root_and_known_commands() -> None:
    for deployment in by_kind("Deployment") + by_kind("Job"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["args"][0] in cli.commands  # a real `sitewire` subcommand
            if container["args"][0] in ("ingest", "gateway"):
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
                # Metrics only on the internal port, which no Service exposes.
                port = container["args"][container["args"].index("--internal-port") + 1]
                assert {"name": "metrics", "containerPort": int(port)} in container["ports"]


def test_gateway_grace_period_covers_prestop_and_drain() -> None:
    [gateway] = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "sitewire-gateway"]
    [config] = by_kind("ConfigMap")
    pod = gateway["spec"]["template"]["spec"]
    prestop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(config["data"]["SITEWIRE_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= prestop + drain + 5


def test_selectors_services_pdb_hpa_and_ingress_line_up() -> None:
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    for service in services.values():
        assert any(
            service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        )
    [pdb] = by_kind("PodDisruptionBudget")
    gateway_labels = deployments["sitewire-gateway"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= gateway_labels.items()
    [hpa] = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sitewire-gateway"
    [ingress] = by_kind("Ingress")
    assert (
        int(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"])
        >= 3600
    )
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["name"] in services


def test_compose_file_is_valid_and_has_the_replicas() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    PyCompose.from_yaml(text)  # raises ValueError on anything the Compose spec refuses
    services = yaml.safe_load(text)["services"]
    assert services["ingest"]["deploy"]["replicas"] == 2
    assert services["gateway"]["deploy"]["replicas"] == 3
    assert {"postgres", "redis", "lb", "migrate", "worker"} <= services.keys()
    for name in ("ingest", "gateway", "worker", "migrate"):
        assert services[name]["command"][0] in cli.commands


def test_compose_validation_rejects_a_broken_file() -> None:
    with pytest.raises(ValueError):
        PyCompose.from_yaml("services:\n  web:\n    image: x\n    replicas_typo: 2\n")


def test_load_balancer_supports_websockets_and_sse() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_set_header Upgrade $http_upgrade" in conf
    assert "proxy_buffering off" in conf and "proxy_read_timeout 3600s" in conf


def test_image_is_slim_and_non_root() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "COPY migrations" in dockerfile
