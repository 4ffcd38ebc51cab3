"""The dashboard, the alerts and the autoscaler's adapter (deploy/grafana, deploy/prometheus)
are checked offline: the rules by promtool (syntax and their unit tests), every query by
promtool's parser, and every metric and label they name against what real ingest and gateway
processes export. A renamed metric fails here, not on an operator's empty panel."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.gateway.metrics import GatewayMetrics
from app.ingest.metrics import IngestMetrics
from tests.processes import ROOT, AppProcess
from tests.support import unavailable
from workers.metrics import WorkerMetrics

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
ADAPTER = PROMETHEUS / "adapter-values.yaml"
SCRAPE = PROMETHEUS / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "sitewire.json"
OPERATIONS = ROOT / "docs" / "operations.md"

#: Labels the scrape gives every series (deploy/prometheus/prometheus.yml), not the code.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})
#: Grafana's variables, as a query is sent with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
#: What the issue asks the dashboard to show (#20 item 4), by the metric that shows it.
DASHBOARD_MUST_SHOW = {
    "viewers": "sitewire_gateway_connections",
    "frames": "sitewire_gateway_frames_total",
    "events delivered": "sitewire_gateway_delivered_events_total",
    "replay reads": "sitewire_gateway_replay_reads_total",
    "gap notices": "sitewire_gateway_gap_notices_total",
    "pub/sub reconnects": "sitewire_gateway_redis_reconnects_total",
    "slow-viewer closes": "sitewire_gateway_closes_total",
    "ingest acks": "sitewire_ingest_accepted_events_total",
    "ingest 503s": "sitewire_ingest_rejected_events_total",
    "ingest latency": "sitewire_ingest_commit_seconds_bucket",
    "commit sizes": "sitewire_ingest_commit_batch_events_bucket",
}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        unavailable("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run(
        ["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def variable_queries() -> list[tuple[str, str]]:
    """(selector, label) of each `label_values(selector, label)` variable."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"])
            assert match, variable["query"]
            found.append((match[1], match[2]))
    return found


def adapter_queries() -> list[str]:
    """The adapter's queries as it sends them for one pod (its <<.Templates>> filled)."""
    queries = []
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        series = rule["seriesQuery"]
        [metric] = re.findall(r"^\w+", series)
        filled = (
            rule["metricsQuery"]
            .replace("<<.Series>>", metric)
            .replace("<<.LabelMatchers>>", 'namespace="sitewire",pod="sitewire-gateway-0"')
            .replace("<<.GroupBy>>", "pod")
        )
        queries += [series, filled]
    return queries


# -- what a PromQL query names --------------------------------------------------------------

STRING = r'"(?:[^"\\]|\\.)*"'
MATCHER = re.compile(rf"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*({STRING})")
SELECTOR = re.compile(rf'([A-Za-z_][\w:]*)?\s*\{{((?:[^{{}}"]|{STRING})*)\}}')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# A name that is not a function call, a number's exponent or part of a longer name.
BARE_NAME = re.compile(r"(?<![\w:.])([A-Za-z_][\w:]*)(?![\w:])(?!\s*\()")
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


@dataclass(frozen=True)
class Selector:
    name: str | None  # None: chosen by a __name__ matcher
    matchers: tuple[tuple[str, str, str], ...] = ()


@dataclass
class Query:
    text: str
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # by, without, on, ignoring


def parse(text: str) -> Query:
    """The selectors and grouping labels of a PromQL query; enough for the queries shipped
    here (which promtool's parser also reads: test_every_query_is_valid_promql)."""
    query = Query(text)
    expr = text
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges

    def selector(match: re.Match[str]) -> str:
        matchers = tuple((k, op, v[1:-1]) for k, op, v in MATCHER.findall(match[2]))
        query.selectors.append(Selector(match[1], matchers))
        return " "

    expr = SELECTOR.sub(selector, expr)
    for labels in GROUPING.findall(expr):
        query.grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    expr = re.sub(STRING, " ", GROUPING.sub(" ", expr))
    for name in BARE_NAME.findall(expr):
        if name.lower() not in KEYWORDS:
            query.selectors.append(Selector(name))
    return query


def problems(query: Query, known: dict[str, frozenset[str]], source: str) -> list[str]:
    """What in `query` no process exports: metric names, label names, and label values the
    code never writes (`source`: the text of app/)."""
    found: list[str] = []
    named: set[str] = set()
    for sel in query.selectors:
        names = _resolve(sel, known)
        if not names:
            found.append(f"no such metric: {sel.name or sel.matchers}")
            continue
        named |= names
        labels = TARGET_LABELS.union(*(known[n] for n in names))
        for label, op, value in sel.matchers:
            if label == "__name__" or label in TARGET_LABELS:
                continue
            if label not in labels:
                found.append(f"{sorted(names)} has no label {label}")
            for one in value.split("|") if op == "=~" else [value]:
                if f'"{one}"' not in source:
                    found.append(f"the code never sets {label}={one!r}")
    labels = TARGET_LABELS.union(*(known[n] for n in named))
    found += [f"no metric of the query has label {label}" for label in query.grouping - labels]
    return [f"{p} in: {query.text}" for p in found]


def _resolve(sel: Selector, known: dict[str, frozenset[str]]) -> set[str]:
    if sel.name is not None:
        return {sel.name} if sel.name in known else set()
    patterns = [v for k, op, v in sel.matchers if k == "__name__" and op == "=~"]
    return {n for n in known for p in patterns if re.fullmatch(p, n)}


# -- what the processes export ----------------------------------------------------------------


def series_names(family: str, kind: str) -> list[str]:
    """The series a family of `kind` is exposed as (the _created gauges have their own)."""
    if kind == "counter":
        return [family.removesuffix("_total") + "_total"]
    if kind == "histogram":
        return [f"{family}_bucket", f"{family}_sum", f"{family}_count"]
    if kind == "summary":
        return [family, f"{family}_sum", f"{family}_count"]
    return [family]


def exposed(text: str) -> dict[str, set[str]]:
    """Series names in a /metrics text, each with the label names its samples carry."""
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            for name in series_names(family, kind):
                found.setdefault(name, set()).update({"le"} if name.endswith("_bucket") else ())
        elif line and not line.startswith("#"):
            match = re.match(r"([\w:]+)(?:\{(.*)\})?\s", line)
            assert match, line
            found.setdefault(match[1], set()).update(re.findall(r'(\w+)="', match[2] or ""))
    return found


def declared() -> dict[str, set[str]]:
    """Label names of the roles' metrics, from the objects the apps build: a labelled metric
    is in /metrics only once some label value was used, so the text alone cannot say."""
    registry = CollectorRegistry()
    objects = [
        *vars(IngestMetrics(registry)).values(),
        *vars(GatewayMetrics(registry)).values(),
        *vars(WorkerMetrics(registry, 3600)).values(),
    ]
    found: dict[str, set[str]] = {}
    for metric in objects:
        for family in metric.describe():
            for name in series_names(family.name, family.type):
                bucket = {"le"} if name.endswith("_bucket") else set()
                found[name] = set(metric._labelnames) | bucket
    return found


# -- tests -----------------------------------------------------------------------------------


def test_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", ALERTS_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_unit_tested_and_links_its_runbook() -> None:
    lines = OPERATIONS.read_text().splitlines()
    headings = {_slug(line.lstrip("#")) for line in lines if line.startswith("#")}
    cases = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check.get("exp_alerts")
    }
    rules = alert_rules()
    assert len(rules) >= 5
    for rule in rules:
        name = rule["alert"]
        assert name in fired, f"{name} is never shown firing in {ALERTS_TEST.name}"
        assert re.fullmatch(r"\d+m", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in headings, name


def _slug(heading: str) -> str:
    """A Markdown heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_dashboard_is_a_grafana_dashboard_showing_what_operators_need() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 39 and doc["uid"] == "sitewire" and doc["id"] is None
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == ["Gateway", "Ingest", "Storage and Redis"]
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    for panel in panels(doc):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
                assert 'instance=~"$instance"' in target["expr"], target["expr"]
    text = "\n".join(dashboard_queries())
    for what, metric in DASHBOARD_MUST_SHOW.items():
        assert re.search(rf"\b{metric}\b", text), f"no panel shows {what} ({metric})"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard and adapter query, as recording rules."""
    queries = dashboard_queries() + adapter_queries() + [sel for sel, _ in variable_queries()]
    rules = []
    for i, query in enumerate(queries):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"sitewire_check:query_{i}", "expr": query})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    checked = promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_queries_name_only_metrics_and_labels_the_processes_export(
    spawn: Callable[..., AppProcess],
) -> None:
    known: dict[str, set[str]] = {}
    texts = []
    for role in ("ingest", "gateway", "worker"):
        text = httpx.get(f"{spawn(role).internal_url}/metrics", timeout=10).text
        texts.append(text)
        for name, labels in exposed(text).items():
            known.setdefault(name, set()).update(labels)
    # Exported before anything happened: a panel shows 0, not "No data", and a new gateway
    # pod reports its viewers to the autoscaler before its first one.
    ingest, gateway, _ = texts
    assert 'sitewire_ingest_rejected_events_total{code="storage_unavailable"} 0.0' in ingest
    assert 'sitewire_gateway_connections{transport="websocket"} 0.0' in gateway
    assert 'sitewire_gateway_closes_total{reason="stale"} 0.0' in gateway
    code = declared()
    assert code.keys() <= known.keys(), "the processes export the metric classes' metrics"
    for name, labels in code.items():
        known[name] |= labels
    frozen = {name: frozenset(labels) for name, labels in known.items()}
    # Label values: written in the code, or exported from the start (`reason="stale"`).
    code_files = [*(ROOT / "app").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]
    source = "\n".join([*(p.read_text() for p in code_files), *texts])
    queries = [parse(q) for q in dashboard_queries() + adapter_queries()]
    queries += [parse(rule["expr"]) for rule in alert_rules()]
    for selector, label in variable_queries():
        query = parse(selector)
        query.grouping.add(label)
        queries.append(query)
    assert all(q.selectors for q in queries)
    found = [p for q in queries for p in problems(q, frozen, source)]
    assert not found, "\n".join(found)


def test_the_query_check_finds_a_wrong_name_label_or_value() -> None:
    known = {
        "sitewire_x_total": frozenset({"reason"}),
        "sitewire_x_bucket": frozenset({"le"}),
    }
    source = 'labels("slow")'

    def check(text: str) -> list[str]:
        return problems(parse(text), known, source)

    assert not check('sum by (instance, le) (rate(sitewire_x_bucket{job=~"$job"}[5m]))')
    assert not check('rate(sitewire_x_total{reason="slow"}[5m]) > 1e3')
    assert not check('sum({__name__=~"sitewire_x_(total|bucket)"})')
    assert check("rate(sitewire_y_total[5m])")
    assert check('sum by (reason) (sitewire_x_bucket{instance="a"})')
    assert check('sitewire_x_total{code="slow"}')
    assert check('sitewire_x_total{reason=~"slow|fast"}')
    assert check('{__name__=~"sitewire_z.*"}')


def test_the_scrape_config_is_valid_and_gives_the_labels_queries_use(tmp_path: Path) -> None:
    config = yaml.safe_load(SCRAPE.read_text())
    [job] = config["scrape_configs"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"job", "namespace", "pod"} <= targets
    assert config["rule_files"] == [ALERTS.name]
    # Debian's promtool is built without Kubernetes discovery: check the rest with a static
    # target in its place.
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    checked = promtool("check", "config", tmp_path / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_gateway_autoscaler_follows_cpu_and_viewers_per_pod() -> None:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "gateway.yaml").read_text())
    [hpa] = [d for d in docs if d and d["kind"] == "HorizontalPodAutoscaler"]
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    pods = by_type["Pods"]["pods"]
    assert pods["target"]["type"] == "AverageValue" and int(pods["target"]["averageValue"]) > 0
    # The name the adapter serves, from a gauge the gateway exports (checked above).
    [rule] = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    assert rule["seriesQuery"].startswith("sitewire_gateway_connections{")


@pytest.mark.parametrize("path", [ALERTS, ALERTS_TEST, ADAPTER, SCRAPE])
def test_yaml_files_parse(path: Path) -> None:
    assert yaml.safe_load(path.read_text())
