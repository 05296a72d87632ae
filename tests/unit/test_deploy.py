"""Checks of deploy/ and the Dockerfile against the daemon they deploy.

* The Grafana dashboard and the alert rules use only metrics a real daemon exports (read from the
  /metrics of a real one-node and a real three-node cluster), with labels it really sets.
* promtool accepts the alert rules, passes their unit tests (deploy/prometheus/alerts_test.yml),
  accepts the scrape config and parses every dashboard query (skipped without promtool: it comes
  from Debian's ``prometheus`` package).
* The Kubernetes manifests validate against the Kubernetes JSON schemas, offline (the
  ``kubernetes-validate`` package bundles them); the ServiceMonitor CRD against a small schema here.
* ``systemd-analyze verify`` accepts the unit (where systemd-analyze exists).
* The Dockerfile installs the daemon without torch and runs ``snapshotd``.
* Every flag, environment variable and TOML key given to the daemon anywhere in deploy/ is a real
  setting: it goes through ``snapshotd.common.config.build_config``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from snapshotd.common.config import Config, ConfigError, build_config, peer_endpoints

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "snapshotd-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
UNIT = DEPLOY / "systemd" / "snapshotd.service"
EXAMPLE_TOML = DEPLOY / "systemd" / "snapshotd.toml"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Oldest Kubernetes the manifests claim (native sidecars are on by default from 1.29).
K8S_MIN_VERSION = "1.30"
#: Labels Prometheus itself puts on scraped series (target labels, relabelled ones).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "node", "cluster", "service",
                 "endpoint", "container"}
#: Series Prometheus makes itself for every target.
SYNTHETIC_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
FIELDS = set(Config.__dataclass_fields__)


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed (pip install PyYAML, or "
                               "kubernetes-validate, which pulls it in)")


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in _yaml().safe_load_all(path.read_text()) if d]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH: install Debian's prometheus package "
                    "(apt-get install -y --no-install-recommends prometheus)")
    return path


# ---------------------------------------------------------------------------- PromQL parsing

_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "double_exponential_smoothing", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time",
    "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh",
    "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "atan2", "inf", "nan", "start", "end"}
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_IDENT = r"[A-Za-z_:][A-Za-z0-9_:]*"
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")


def _strip_grafana(expr: str) -> str:
    """Grafana's $variables and ${variables} replaced by something PromQL-neutral."""
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", "1m", expr)


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and numbers left out)."""
    s = re.sub(_STRING, '""', _strip_grafana(expr))
    s = re.sub(r"\{[^{}]*\}", " ", s)               # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)             # range and subquery selectors
    s = _GROUPING.sub(" ", s)                       # by (...), on (...), group_left (...)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in re.finditer(rf"(?<![A-Za-z0-9_:.])({_IDENT})(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS or name in _FUNCTIONS:
            continue
        names.add(name)
    return names


def promql_selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for each ``metric{...}`` selector of an expression."""
    for m in re.finditer(rf"(?<![A-Za-z0-9_:.])({_IDENT})\s*\{{([^{{}}]*)\}}", expr):
        matchers = [(lab, op, json.loads(val)) for lab, op, val in _MATCHER.findall(m.group(2))]
        yield m.group(1), matchers


def promql_grouping_labels(expr: str) -> set[str]:
    labels = set()
    for m in _GROUPING.finditer(re.sub(_STRING, '""', expr)):
        labels |= {x.strip() for x in m.group(2).split(",") if x.strip()}
    return labels


@pytest.mark.timeout(10)
def test_promql_metric_extraction_on_tricky_expressions():
    cases = {
        'sum by (le) (rate(a_bucket{instance=~"$instance", x="y(z)"}[$__rate_interval]))':
            {"a_bucket"},
        "histogram_quantile(0.99, sum by (le, instance) (rate(b_seconds_bucket[5m])))":
            {"b_seconds_bucket"},
        "c_total offset 5m / on (instance) group_left (kind) d_bytes > bool 1e3":
            {"c_total", "d_bytes"},
        'count(e == 0) or vector(0) and f unless ignoring (rank) g{job="and"}': {"e", "f", "g"},
        "max(h:recorded:rate5m) - min_over_time(i[1h:5m]) * -Inf": {"h:recorded:rate5m", "i"},
        "absent(up{job=~\"snapshotd.*\"})": {"up"},
    }
    for expr, want in cases.items():
        assert promql_metrics(expr) == want, expr
    assert promql_grouping_labels("sum by (a, b) (x) / on(c) group_left y") == {"a", "b", "c"}
    assert list(promql_selectors('x{a="1", b=~"2"} + y')) == [("x", [("a", "=", "1"),
                                                                     ("b", "=~", "2")])]


# ---------------------------------------------------------------------------- real /metrics

def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _parse_exposition(text: str, names: dict[str, set[str]], values: dict[str, set[str]]) -> None:
    """Add every series name the text holds (with the labels each carries) to ``names``."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                                                                 "_created"],
                "gauge": [""], "untyped": [""], "summary": ["_sum", "_count", "_created"]}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, [""]):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
        if family.type == "histogram":
            names[family.name + "_bucket"].add("le")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Any]:
    """Series names (-> label names) and label values served by real daemons, after some saves.

    One stand-alone node, and a three-node RS(2,1) cluster (peer metrics exist only with peers),
    where every node saves one rank and the version gets protected."""
    torch = pytest.importorskip("torch")
    from snapshotd.tools.localcluster import LocalCluster
    from snapshotd_client import SnapshotClient

    names: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    base = tmp_path_factory.mktemp("deploy")
    single = LocalCluster(1, str(base / "c1"), args=["--memory-limit", "1MiB"])
    trio = LocalCluster(3, str(base / "c3"), k=2, m=1,
                        args=["--insecure", "--memory-limit", "256MiB"])
    try:
        single.start()
        client = SnapshotClient(single.specs[0].control, job="j", rank=0)
        client.save(1, {"x": torch.ones(4)}).result()
        # One save over the 1 MiB budget, so that a rejection (with its reason label) is counted.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # "a snapshot failed", as it should
            with contextlib.suppress(Exception):   # the refusal is what we want
                client.save(2, {"x": torch.ones(1 << 20)}).result()
        _wait(lambda: 'reason="memory_full"' in _scrape(single.specs[0].metrics_port), 10,
              "the over-budget save to be refused")
        _parse_exposition(_scrape(single.specs[0].metrics_port), names, values)

        trio.start()
        ports = [s.metrics_port for s in trio.specs]

        def peers_up() -> bool:
            lines = [line for p in ports for line in _scrape(p).splitlines()
                     if line.startswith("snapshotd_peer_up{")]
            return len(lines) == 6 and all(line.endswith(" 1.0") for line in lines)

        # A version committed before the peers' first heartbeat would stay unprotected.
        _wait(peers_up, 30, "the three daemons to see each other")
        clients = [SnapshotClient(s.control, job="j", rank=0) for s in trio.specs]
        for fut in [c.save(1, {"x": torch.ones(4)}) for c in clients]:
            fut.result()
        _wait(lambda: "snapshotd_protected_snapshot_age_seconds{" in _scrape(ports[0]), 30,
              "the saved version to be protected")
        for port in ports:
            _parse_exposition(_scrape(port), names, values)
    finally:
        trio.stop()
        single.stop()
    return {"names": names, "values": values}


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    exprs = [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_]\w*\s*\)\s*", query)
        if m:
            exprs.append(m.group(1))
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    doc = _yaml().safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _check_exprs(exprs: list[str], exported: dict[str, Any]) -> None:
    names, values = exported["names"], exported["values"]
    # The daemon's `job` label (training job) is stored as `exported_job` by Prometheus.
    allowed_labels = set().union(*names.values()) | {"exported_job"} | TARGET_LABELS
    problems = []
    for expr in exprs:
        used = promql_metrics(expr)
        if not used:
            problems.append(f"no metric found in {expr!r}")
        for name in sorted(used - set(names) - SYNTHETIC_SERIES):
            hint = ""
            if name + "_bucket" in names:
                hint = " (a histogram: use its _bucket, _sum or _count series)"
            elif name + "_total" in names:
                hint = " (a counter: use its _total series)"
            problems.append(f"{name} is not exported by snapshotd{hint}: {expr!r}")
        for label in sorted(promql_grouping_labels(expr) - allowed_labels):
            problems.append(f"label {label!r} is on no snapshotd series: {expr!r}")
        for metric, matchers in promql_selectors(expr):
            own = names.get(metric, set())
            for label, op, value in matchers:
                if label == "job" and metric in names and "job" in own:
                    problems.append(f"{metric}{{job=...}} is the scrape job; the training job "
                                    f"is exported_job: {expr!r}")
                if metric in names and label not in (own | {"exported_job"} | TARGET_LABELS):
                    problems.append(f"{metric} has no label {label!r}: {expr!r}")
                if op == "=" and label in ("state", "kind", "direction") and \
                        value not in values.get(label, set()):
                    problems.append(f"{label}={value!r} never appears on {metric}: {expr!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(180)
def test_dashboard_uses_only_exported_metrics(exported):
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    _check_exprs(exprs, exported)
    used = set().union(*(promql_metrics(e) for e in exprs))
    # Every figure docs/design.md section 7 names is on the dashboard.
    for name in ("snapshotd_protected_snapshot_age_seconds", "snapshotd_snapshot_age_seconds",
                 "snapshotd_versions", "snapshotd_memory_used_bytes",
                 "snapshotd_memory_limit_bytes", "snapshotd_memory_headroom_bytes",
                 "snapshotd_commit_duration_seconds_bucket",
                 "snapshotd_open_duration_seconds_bucket",
                 "snapshotd_encode_duration_seconds_bucket",
                 "snapshotd_rebuild_duration_seconds_bucket", "snapshotd_peer_bytes_total",
                 "snapshotd_peer_up", "snapshotd_rebuilds_total",
                 "snapshotd_checksum_failures_total", "snapshotd_rejected_requests_total"):
        assert name in used, f"the dashboard shows nothing of {name}"


@pytest.mark.timeout(180)
def test_alert_rules_use_only_exported_metrics(exported):
    rules = _alert_rules()
    alerts = {r["alert"] for r in rules}
    assert {"SnapshotTooOld", "SnapshotParityDegraded", "SnapshotdPeerDown",
            "SnapshotdMemoryHeadroomLow", "SnapshotdChecksumFailures", "SnapshotdInsecurePeers",
            "SnapshotdDown"} <= alerts
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80
    _check_exprs([r["expr"] for r in rules], exported)


# ---------------------------------------------------------------------------- promtool

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.timeout(60)
def test_promtool_check_rules():
    out = _run([_promtool(), "check", "rules", str(ALERTS)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_promtool_alert_unit_tests():
    out = _run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_promtool_check_config(tmp_path):
    promtool = _promtool()
    yaml = _yaml()
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: p\n    kubernetes_sd_configs:\n"
                     "      - role: pod\n")
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert ALERTS.name in config["rule_files"]
    if _run([promtool, "check", "config", str(probe)]).returncode != 0:
        # Debian's promtool is built without Kubernetes service discovery. Check everything
        # else, the kubernetes job's relabelling included, with a static target in its place.
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["localhost:9400"]}]
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    out = _run([promtool, "check", "config", str(checked)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each dashboard query, Grafana variables filled in, as a recording rule for promtool."""
    promtool = _promtool()
    yaml = _yaml()
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
        expr = re.sub(r'"\$\{?[A-Za-z_]\w*\}?"', '".*"', expr)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run([promtool, "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------- Kubernetes

SERVICE_MONITOR_SCHEMA = {
    # The part of monitoring.coreos.com/v1 ServiceMonitor these manifests use; unknown fields
    # fail, as they would in the CRD's structural schema.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": {"type": "object",
                                               "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object",
                                    "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array",
                                                                    "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "targetPort": {},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                "separator": {"type": "string"},
                                "targetLabel": {"type": "string"},
                                "regex": {"type": "string"},
                                "modulus": {"type": "integer"},
                                "replacement": {"type": "string"},
                                "action": {"enum": ["replace", "keep", "drop", "hashmod",
                                                    "labelmap", "labeldrop", "labelkeep",
                                                    "lowercase", "uppercase", "keepequal",
                                                    "dropequal"]}}}},
                        "metricRelabelings": {"type": "array"}}}},
            }},
    },
}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    files = sorted(K8S.glob("*.yaml"))
    assert {"daemonset.yaml", "statefulset.yaml", "service.yaml", "configmap.yaml",
            "secret-keys.yaml", "servicemonitor.yaml", "sidecar-pod.yaml"} <= {
                f.name for f in files}
    return [(f.name, doc) for f in files for doc in _yaml_docs(f)]


@pytest.mark.timeout(120)
def test_kubernetes_manifests_match_the_schemas():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install "
        "kubernetes-validate==1.37.0: it bundles the Kubernetes JSON schemas)")
    import jsonschema

    versions = [K8S_MIN_VERSION, kv.latest_version()]
    for name, doc in _manifests():
        if doc["kind"] == "ServiceMonitor":
            # A CRD: not in the Kubernetes schemas; checked against the subset above.
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(f"{name} {doc['kind']} (Kubernetes {version}): "
                                     f"{exc.message} at {list(exc.path)}") from None


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("DaemonSet", "StatefulSet", "Deployment", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def _is_daemon(container: dict[str, Any]) -> bool:
    return container["name"] == "snapshotd"


@pytest.mark.timeout(60)
def test_kubernetes_manifests_fit_together():
    docs = _manifests()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    service = next(s for s in by_kind["Service"] if s["metadata"]["name"] == "snapshotd")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"peer": 7600,
                                                                        "metrics": 9400}
    monitor = by_kind["ServiceMonitor"][0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {"metrics"}
    assert by_kind["StatefulSet"][0]["spec"]["serviceName"] == "snapshotd"
    config_maps = {c["metadata"]["name"] for c in by_kind["ConfigMap"]}
    secrets = {s["metadata"]["name"] for s in by_kind["Secret"]}

    uids = set()
    daemons = trainers = 0
    for name, doc in docs:
        spec = _pod_spec(doc)
        if spec is None:
            continue
        where = f"{name} {doc['kind']} {doc['metadata']['name']}"
        if "selector" in doc["spec"] and "matchLabels" in doc["spec"]["selector"]:
            assert doc["spec"]["selector"]["matchLabels"].items() <= \
                doc["spec"]["template"]["metadata"]["labels"].items(), where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for vol in volumes.values():
            if "configMap" in vol:
                assert vol["configMap"]["name"] in config_maps, where
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets, where
        uids.add(spec["securityContext"]["runAsUser"])
        for c in _containers(spec):
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            if c["name"] == "socket-dir":
                continue
            assert "/dev/shm" in mounts, f"{where} {c['name']}: no shared /dev/shm"
            assert "/run/snapshotd" in mounts, f"{where} {c['name']}: no socket volume"
            shm = mounts["/dev/shm"]
            assert shm.get("hostPath", {}).get("path") == "/dev/shm" or \
                shm.get("emptyDir", {}).get("medium") == "Memory", where
            if "hostPath" in shm:
                assert spec.get("hostPID") is True, f"{where}: the daemon checks trainer pids"
            else:
                assert spec.get("shareProcessNamespace") is True, where
            if _is_daemon(c):
                daemons += 1
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert ports["metrics"] == 9400, where
                for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                    assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, where
                assert c["resources"]["limits"]["memory"], where
            else:
                trainers += 1
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("SNAPSHOTD_ENDPOINT") == "ipc:///run/snapshotd/control.sock", where
    assert daemons >= 4 and trainers >= 3
    assert len(uids) == 1, f"daemon and trainers must share one UID, got {uids}"


# ---------------------------------------------------------------------------- systemd

def _unit_entries() -> list[tuple[str, str, str]]:
    section, out = "", []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


@pytest.mark.timeout(30)
def test_systemd_unit_settings():
    entries = _unit_entries()
    service = {k: v for s, k, v in entries if s == "Service"}
    assert service["Type"] == "simple"              # the daemon does not call sd_notify
    assert service["Restart"] == "on-failure" and service["RestartSec"]
    assert service["KillSignal"] == "SIGTERM" and service["TimeoutStopSec"]
    assert service["RuntimeDirectory"] == "snapshotd"
    assert service["User"] and service["User"] != "root"
    assert service["MemoryMax"] and service["LimitNOFILE"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert {"/dev/shm", "/run/snapshotd"} <= set(service["ReadWritePaths"].split())
    # These hide or delete the segments other processes share.
    for key in ("PrivateDevices", "PrivateIPC", "DynamicUser", "ProtectProc", "PrivatePIDs"):
        assert key not in service, f"{key} would hide /dev/shm or trainer pids"
    assert service.get("RemoveIPC", "no") == "no"


@pytest.mark.timeout(60)
def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not on PATH (it comes with systemd)")
    daemon = Path(sys.executable).with_name("snapshotd")
    if not daemon.exists():
        daemon = Path(shutil.which("snapshotd") or "")
    assert daemon.is_file(), "the snapshotd entry point is not installed (pip install -e .)"
    # verify checks that ExecStart's binary exists: point it at this environment's snapshotd.
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/snapshotd " in text
    unit = tmp_path / "snapshotd.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/snapshotd ", f"ExecStart={daemon} "))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"}, check=False)
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if "snapshotd.service" in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


# ---------------------------------------------------------------------------- Dockerfile

def _docker_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for one path: the last matching pattern wins; `!` re-includes."""
    import fnmatch

    ignored = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat) or (
                    pat.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat[3:])):
                ignored = not negate
                break
    return ignored


@pytest.mark.timeout(30)
def test_dockerfile_builds_a_torch_free_daemon_image():
    steps = _docker_instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["snapshotd"]
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    exposed = {p for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert {"7600", "9400"} <= exposed
    installs = []
    for word, rest in steps:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            tokens = shlex.split(command)
            if "pip" in " ".join(tokens[:2]) and "install" in tokens:
                installs.append(tokens[tokens.index("install") + 1:])
    assert installs, "no pip install in the Dockerfile"
    for args in installs:
        packages = [a for a in args if not a.startswith("-")]
        assert packages == ["."], f"the image must pip install the daemon package only: {args}"
        assert not any("torch" in a or "client" in a for a in args), args

    # What `pip install .` needs is in the build context; the client and the venv are not.
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for word, rest in steps:
        if word == "COPY" and "--from=" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert not _dockerignored(src, patterns), f"{src} is left out by .dockerignore"
    assert not _dockerignored("snapshotd/daemon.py", patterns)
    for path in ("client/pyproject.toml", ".venv/bin/python", "tests/unit/test_deploy.py",
                 ".git/HEAD", "snapshotd/__pycache__/x.pyc", "snapshotd.egg-info/PKG-INFO"):
        assert _dockerignored(path, patterns), f"{path} would be sent to docker build"

    # And the daemon package itself pulls no torch (closure of its installed requirements).
    seen, todo = set(), ["snapshotd"]
    while todo:
        name = re.split(r"[\s\[<>=!~;(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [r for r in requires if "extra ==" not in r]
    assert "torch" not in seen and "snapshotd-client" not in seen, sorted(seen)


# ---------------------------------------------------------------------------- daemon settings

def _flag_names() -> set[str]:
    import argparse

    from snapshotd.common.config import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {s for a in parser._actions for s in a.option_strings}


def _check_daemon_args(argv: list[str], environ: dict[str, str], where: str) -> Config:
    flags = _flag_names()
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in
               flags]
    assert not unknown, f"{where}: not snapshotd flags: {unknown}"
    for name in environ:
        if name.startswith("SNAPSHOTD_") and name != "SNAPSHOTD_CONFIG":
            assert name[len("SNAPSHOTD_"):].lower() in FIELDS, f"{where}: {name} is no setting"
    try:
        config = build_config(argv, environ=environ)
        peer_endpoints(config)
    except ConfigError as exc:
        raise AssertionError(f"{where}: {exc}") from None
    return config


@pytest.mark.timeout(30)
def test_example_toml_and_unit_flags_are_real_settings():
    keys = set(tomllib.loads(EXAMPLE_TOML.read_text()))
    assert {"node_slot", "control", "shm_dir", "memory_limit", "keep", "metrics_port", "listen",
            "peers", "nodes", "k", "m", "keys"} <= keys
    assert keys <= FIELDS, f"not config fields: {sorted(keys - FIELDS)}"
    exec_start = next(v for s, k, v in _unit_entries() if k == "ExecStart")
    argv = shlex.split(exec_start)[1:]
    assert argv == ["--config", "/etc/snapshotd/snapshotd.toml"]
    config = _check_daemon_args(["--config", str(EXAMPLE_TOML)], {}, "systemd unit")
    assert config.control == "ipc:///run/snapshotd/control.sock"
    assert config.metrics_port == 9400 and not config.insecure and config.keys
    assert len(peer_endpoints(config)) == config.nodes


def _shell_exec_argv(script: str) -> list[str]:
    """The arguments of the `exec snapshotd ...` line of a container's shell script."""
    script = script.replace('"$slot"', "1").replace('"${HOSTNAME##*-}"', "2")
    m = re.search(r"exec snapshotd (.+)", " ".join(script.split()))
    assert m, script
    return shlex.split(m.group(1))


@pytest.mark.timeout(30)
def test_kubernetes_daemon_settings_are_real(tmp_path):
    configmap = next(d for _, d in _manifests() if d["kind"] == "ConfigMap")
    toml_path = tmp_path / "snapshotd.toml"
    toml_path.write_text(configmap["data"]["snapshotd.toml"])
    base = _check_daemon_args(["--config", str(toml_path)], {}, "configmap.yaml")
    slots = dict(line.split() for line in configmap["data"]["slots"].splitlines() if line.strip())
    assert sorted(int(s) for s in slots.values()) == sorted(peer_endpoints(base))
    checked = 0
    for name, doc in _manifests():
        spec = _pod_spec(doc)
        if spec is None:
            continue
        for c in _containers(spec):
            env = {e["name"]: e.get("value", "3") for e in c.get("env", [])}
            if not _is_daemon(c):
                assert not [n for n in env if n.startswith("SNAPSHOTD_")
                            and n != "SNAPSHOTD_ENDPOINT"], f"{name}: daemon settings in a trainer"
                continue
            if c.get("command", [""])[0] == "/bin/sh":
                argv = _shell_exec_argv(c["args"][0])
            else:
                assert "command" not in c, f"{name}: the image's entrypoint is snapshotd"
                argv = list(c["args"])
            argv = [str(toml_path) if a == "/etc/snapshotd/snapshotd.toml" else a for a in argv]
            config = _check_daemon_args(argv, env, f"{name} {c['name']}")
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert config.control == "ipc:///run/snapshotd/control.sock", name
            assert config.shm_dir.startswith("/dev/shm/"), name
            assert config.metrics_port == 9400, name
            if peer_endpoints(config):
                assert config.keys in mounts and not config.insecure, name
            checked += 1
    assert checked >= 4


@pytest.mark.timeout(60)
def test_every_torchrun_trainer_manifest_sets_the_rendezvous_setting():
    """pytorch issue 135712: restarted workers must not read the previous attempt's keys."""
    seen = 0
    for name, doc in _manifests():
        spec = _pod_spec(doc)
        for container in _containers(spec) if spec else []:
            launch = " ".join(container.get("command", []) + container.get("args", []))
            if "torchrun" not in launch:
                continue
            seen += 1
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1", (name, container["name"])
    assert seen == 3
