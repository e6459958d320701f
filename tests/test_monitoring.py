"""infra/k8s/monitoring/ tied to the code: every metric that the Grafana dashboard and the alert rules query is one
that the project's code or Ray declares, the names read from their sources (never typed a second time), and the
PodMonitor selects the Ray pods that KubeRay makes of infra/k8s's objects, on the port their metrics agent serves.

How a metric's name reaches Prometheus is written once, here (EXPORTED_AS), as Ray 2.60 does it: the node's
metrics agent prefixes ``ray_``, a Counter gets ``_total``, a Histogram ``_bucket``, ``_sum`` and ``_count``, a
Gauge stays as it is; tag keys become labels, beside Ray's own (SessionName, NodeAddress, WorkerId, ...) and
Serve's (application, deployment, replica) in a Serve replica. The last test checks those rules against a real
metrics agent."""

from __future__ import annotations

import ast
import difflib
import itertools
import json
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import ray
import requests
import yaml
from helpers import selects
from kuberay_crd import ray_cluster_spec
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "infra" / "k8s" / "monitoring"
RAY_ROOT = Path(ray.__file__).parent

# --------------------------------------------------------------------------------------------------------
# Where metrics are declared: the constructor calls in the sources, read with Python's own parser
# --------------------------------------------------------------------------------------------------------

# ray.util.metrics' classes, ray.serve.metrics' (subclasses of the same names) and the metrics agent's Gauge.
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
# Where Ray declares the metrics the dashboard uses: Serve's (ray_serve_*), Ray Data's (ray_data_*) and the
# node's (ray_node_*, the reporter agent's).
RAY_SOURCES = ("serve", "data/_internal", "dashboard/modules/reporter")
# A part of an f-string name that the scanner cannot resolve (Serve's f"serve_num_{protocol_name}_requests"):
# one word, so that a misspelling around it is still caught.
HOLE = "[a-z0-9]+"
# Ray's export rules: a declared name -> the names Prometheus scrapes (regular expressions, like the name).
EXPORTED_AS = {
    "counter": lambda name: [f"ray_{name.removesuffix('_total')}_total"],
    "gauge": lambda name: [f"ray_{name}"],
    "histogram": lambda name: [f"ray_{name}_bucket", f"ray_{name}_sum", f"ray_{name}_count"],
}


@dataclass(frozen=True)
class Declared:
    kind: str  # counter, gauge or histogram
    pattern: str  # a regular expression of the name given to the constructor
    where: str  # file:line


def declared_metrics(path: Path) -> list[Declared]:
    """The metrics that ``path`` constructs: calls of a Counter, Gauge or Histogram whose name (the first
    argument, or ``name=``) is a string, a module constant, an f-string, or a variable that a comprehension or a
    for loop takes from a literal (a dict's keys or items, a list, a tuple) in the same function or module.
    Calls whose name is anything else are skipped (collections.Counter's, names built elsewhere)."""
    text = path.read_text()
    if not re.search(rf"\b(?:{'|'.join(KINDS)})\(", text):
        return []  # most files: no need to parse them
    tree = ast.parse(text, str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        kind = KINDS.get(getattr(call.func, "attr", getattr(call.func, "id", None)))
        name = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "name"), None)
        if kind is None or name is None:
            continue
        for pattern in _patterns(name, parents, tree):
            found.append(Declared(kind, pattern, f"{path}:{call.lineno}"))
    return found


def _patterns(node: ast.AST, parents: dict, tree: ast.Module) -> list[str]:
    """The regular expressions of the strings ``node`` can be ([] if it is not a string the scanner can read)."""
    if isinstance(node, ast.Constant):
        return [re.escape(node.value)] if isinstance(node.value, str) else []
    if isinstance(node, ast.Name):
        return [p for value in _values_of(node, parents, tree) for p in _patterns(value, parents, tree)]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            inner = part.value if isinstance(part, ast.FormattedValue) else part
            parts.append(_patterns(inner, parents, tree) or [HOLE])
        return ["".join(p) for p in itertools.product(*parts)]
    return []


def _values_of(name: ast.Name, parents: dict, tree: ast.Module) -> list[ast.AST]:
    """What a name stands for: the elements a comprehension or a for loop around it takes it from, or the
    value of a module-level assignment."""
    node = name
    while node in parents:
        node = parents[node]
        comprehension = isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp)
        loops = node.generators if comprehension else [node] if isinstance(node, ast.For) else []
        for loop in loops:
            targets = loop.target.elts if isinstance(loop.target, ast.Tuple) else [loop.target]
            for i, target in enumerate(targets):
                if isinstance(target, ast.Name) and target.id == name.id:
                    return _elements(loop.iter, i if isinstance(loop.target, ast.Tuple) else None, node, parents, tree)
    return [a.value for a in tree.body if isinstance(a, ast.Assign) and _assigns(a, name.id)]


def _elements(it: ast.AST, index: int | None, at: ast.AST, parents: dict, tree: ast.Module) -> list[ast.AST]:
    """The elements of a literal that ``it`` iterates (``index``: of each pair of ``.items()``)."""
    method = it.func.attr if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) else None
    literal = it.func.value if method in ("items", "keys", "values") else it
    if isinstance(literal, ast.Name):  # the literal a name was given, in the enclosing function or the module
        scope = at
        while scope in parents and not isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            scope = parents[scope]
        assigned = [a.value for a in ast.walk(scope) if isinstance(a, ast.Assign) and _assigns(a, literal.id)]
        assigned += [a.value for a in tree.body if isinstance(a, ast.Assign) and _assigns(a, literal.id)]
        literal = assigned[0] if assigned else None
    if isinstance(literal, ast.Dict):
        keys, values = list(literal.keys), list(literal.values)
        return values if method == "values" or (method == "items" and index == 1) else keys
    if isinstance(literal, ast.List | ast.Tuple | ast.Set):
        return list(literal.elts)
    return []


def _assigns(assign: ast.Assign, name: str) -> bool:
    return any(isinstance(t, ast.Name) and t.id == name for t in assign.targets)


@cache
def exported() -> dict[str, list[Declared]]:
    """Every metric name pattern Prometheus can scrape from the project and from Ray -> its declarations."""
    files = sorted((REPO / "pipelines").rglob("*.py"))
    for source in RAY_SOURCES:
        files += sorted(p for p in (RAY_ROOT / source).rglob("*.py") if "tests" not in p.parts)
    names: dict[str, list[Declared]] = {}
    for path in files:
        for d in declared_metrics(path):
            for name in EXPORTED_AS[d.kind](d.pattern):
                names.setdefault(name, []).append(d)
    return names


def unknown(names: set[str]) -> list[str]:
    """The names no declaration exports, each with the nearest names that are."""
    patterns = [re.compile(p) for p in exported()]
    constants = [p.replace("\\", "") for p in exported()]  # for the hint only
    return [
        f"{n} (nearest: {', '.join(difflib.get_close_matches(n, constants, 3, 0.8)) or 'none'})"
        for n in sorted(names)
        if not any(p.fullmatch(n) for p in patterns)
    ]


# --------------------------------------------------------------------------------------------------------
# What the dashboard and the rules query: metric names out of PromQL
# --------------------------------------------------------------------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}  # fmt: skip
TOKEN = re.compile(r"(?P<number>\d[\d.]*(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)|(?P<word>[a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads. A small tokenizer, not a parser: strings go first, then label
    matchers ``{...}``, ranges and subqueries ``[...]``, label lists (``by (...)``, ``on (...)``, ...) and
    Grafana's variables; what is left are function names (a word before ``(``), keywords, numbers and durations,
    and metric names. What it does not know it takes for a metric name (the binary operator ``atan2``, say): a
    false alarm, never a name missed. Refused: a metric named by ``{__name__=...}``, unbalanced brackets."""
    if "__name__" in expr:
        raise ValueError(f"a metric named by __name__ is not read by this tokenizer: {expr}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    for opening, closing in ("()", "{}", "[]"):
        if text.count(opening) != text.count(closing):
            raise ValueError(f"unbalanced {opening}{closing} in: {expr}")
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for token in TOKEN.finditer(text):
        word = token.group("word")
        if word and word.lower() not in PROMQL_WORDS and not text[token.end() :].lstrip().startswith("("):
            names.add(word)
    return names


def grafana_variable_query(query: str | dict) -> str:
    """The PromQL in a Grafana query variable: ``label_values(selector, label)``'s selector, or
    ``query_result(expr)``'s expression."""
    query = query["query"] if isinstance(query, dict) else query
    if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query):
        return m.group(1)
    if m := re.fullmatch(r"\s*query_result\((.*)\)\s*", query):
        return m.group(1)
    raise ValueError(f"a variable query this test does not read: {query}")


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a row's folded panels


def dashboard() -> dict:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_queries(board: dict) -> dict[str, str]:
    """Where -> PromQL, of every panel target and query variable."""
    queries = {
        f"panel {p['title']!r} {t['refId']}": t["expr"] for p in _panels(board["panels"]) for t in p.get("targets", [])
    }
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries[f"variable {var['name']}"] = grafana_variable_query(var["query"])
    return queries


def rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def not_exported(queries: dict[str, str]) -> list[str]:
    """``where: name (nearest: ...)`` for every metric a query reads that nothing exports (recording rules'
    names count as exported)."""
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    return [f"{where}: {problem}" for where, expr in queries.items()
            for problem in unknown(metric_names(expr) - recorded)]  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------------


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported():
    queries = dashboard_queries(dashboard())
    queries.update({f"alert {r.get('alert') or r['record']}": r["expr"] for r in rules()})
    assert len(queries) > 30
    assert not_exported(queries) == []


def test_a_misspelt_or_mistyped_metric_is_caught():
    """The check can fail: a name off by a letter, a gauge queried as a counter, a histogram without its
    suffix, an f-string's name with a wrong part."""
    good = {"ray_crossvit_train_images_per_second", "ray_crossvit_requests_total", "ray_crossvit_queue_ms_bucket",
            "ray_crossvit_rollout_error_rate", "ray_serve_num_http_requests_total", "ray_data_output_rows"}  # fmt: skip
    assert unknown(good) == []
    bad = {"ray_crossvit_train_images_per_secnd", "ray_crossvit_train_epoch_seconds_total", "ray_crossvit_queue_ms",
           "ray_crossvit_rollout_eror_rate", "ray_serve_num_http_request_total", "crossvit_requests_total"}  # fmt: skip
    assert [u.split()[0] for u in unknown(bad)] == sorted(bad)
    assert "nearest: ray_crossvit_train_images_per_second" in unknown({"ray_crossvit_train_images_per_secnd"})[0]


def test_the_tokenizer_reads_metric_names_only():
    expr = (
        'histogram_quantile(0.95, sum by (version, le) (rate(ray_a_bucket{x=~"$c", y="b{c}"}[$__rate_interval])))'
        " / on (version) group_left sum(ray_b_total offset 5m) > bool 1e3 and time() - ray_c @ start() unless"
        " ray_d[5m:1m]"
    )
    assert metric_names(expr) == {"ray_a_bucket", "ray_b_total", "ray_c", "ray_d"}
    with pytest.raises(ValueError, match="unbalanced"):
        metric_names("sum(rate(ray_a_total[5m])")
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__="ray_a"}')
    assert grafana_variable_query({"query": "label_values(ray_node_cpu_count{a='b'}, ray_io_cluster)"}) == (
        "ray_node_cpu_count{a='b'}"
    )


def test_the_scanner_reads_the_names_where_the_code_declares_them():
    """Constants, a comprehension over a dict of constants (pipelines/train/metrics.py), an f-string over a
    dict's keys (pipelines/serve/evidence.py), Ray's f-strings with a part left open."""
    from pipelines.label.model import ERRORS, ROWS
    from pipelines.serve.model import CHECKS, LAST_OK
    from pipelines.train.metrics import EPOCH_S, EPOCHS_DONE, IMAGES_PER_S, PROGRESS

    declared = {
        "gauge": (IMAGES_PER_S, EPOCH_S, EPOCHS_DONE, PROGRESS, LAST_OK, "crossvit_rollout_agreement"),
        "counter": (ROWS, ERRORS, CHECKS, "crossvit_requests", f"serve_num_{HOLE}_requests"),
        "histogram": ("crossvit_request_ms",),
    }
    for kind, names in declared.items():
        for name in names:
            assert set(EXPORTED_AS[kind](name)) <= exported().keys(), name


def test_the_dashboard_is_one_grafana_loads_from_the_sidecar():
    """The shape kube-prometheus-stack's Grafana expects: a Prometheus datasource variable that every query
    uses, unique panel ids, a panel for each thing the issue lists; shipped as a ConfigMap its sidecar picks up."""
    board = dashboard()
    assert board["schemaVersion"] >= 41 and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(board["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    graphs = [p for p in panels if p["type"] != "row"]
    for p in graphs:
        for source in (p["datasource"], *(t["datasource"] for t in p["targets"])):
            assert source == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all('ray_io_cluster=~"$cluster"' in t["expr"] for t in p["targets"]), p["title"]
    queried = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in graphs}
    wanted = {  # what the issue lists -> a metric a panel must show it with
        "training images/s": "ray_crossvit_train_images_per_second",
        "epoch time": "ray_crossvit_train_epoch_seconds",
        "Ray Data throughput": "ray_data_output_rows",
        "Serve requests by outcome and version": "ray_crossvit_requests_total",
        "latency": "ray_crossvit_request_ms_bucket",
        "batch size": "ray_crossvit_batch_images_bucket",
        "queue time": "ray_crossvit_queue_ms_bucket",
        "labeling rows/s": "ray_crossvit_label_rows_total",
        "labeling errors": "ray_crossvit_label_errors_total",
        "registry watch": "ray_crossvit_registry_last_ok_timestamp_seconds",
    }
    assert [item for item, metric in wanted.items() if not any(metric in q for q in queried.values())] == []
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "namespace" not in kustomization  # the overlay that includes this folder gives it
    assert all((MONITORING / f).is_file() for f in kustomization["resources"])
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == ["dashboard.json"] and generated["options"]["labels"] == {"grafana_dashboard": "1"}


def test_every_alert_waits_and_says_what_to_do():
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {"CrossvitTrainingStalled", "CrossvitServeErrorRate",
                                            "CrossvitRegistryWatchFailing"}  # fmt: skip
    for alert in alerts:
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), alert["alert"]
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert {"summary", "description", "runbook"} <= alert["annotations"].keys(), alert["alert"]


# What KubeRay v1.5.1 makes of a pod template (github.com/ray-project/kuberay, ray-operator/controllers/ray/common/
# pod.go at v1.5.1): labelPod gives every Ray pod these labels, over the template's own, which may replace all but
# ray.io/node-type, ray.io/group and ray.io/cluster; and DefaultHeadPodTemplate / DefaultWorkerPodTemplate give
# the Ray container (the first) a port named `metrics`, 8080, where it declares none, which `ray start` exports
# on (--metrics-export-port) unless rayStartParams names another.
KUBERAY_FIXED_LABELS = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")
KUBERAY_METRICS_PORT = ("metrics", 8080)


def kuberay_pod_labels(template: dict, node_type: str, group: str, cluster: str) -> dict[str, str]:
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels.update(template.get("metadata", {}).get("labels", {}))
    labels.update(zip(KUBERAY_FIXED_LABELS, (node_type, group, cluster)))
    return labels


def ray_pod_templates() -> list[tuple[str, dict, dict, dict[str, str]]]:
    """(where, rayStartParams, pod template, the pod's labels) of every head and worker group of the RayClusters,
    RayJobs and RayServices in infra/k8s (kustomize patches, which have no head group, are skipped)."""
    found = []
    for path in sorted((REPO / "infra" / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or not str(doc.get("apiVersion", "")).startswith("ray.io/"):
                continue
            _, cluster = ray_cluster_spec(doc) or (None, None)
            if not cluster or "headGroupSpec" not in cluster:
                continue
            name = f"{doc['metadata']['name']}-xxxxx" if doc["kind"] != "RayCluster" else doc["metadata"]["name"]
            head = cluster["headGroupSpec"]
            groups = [("head", "headgroup", head), *(("worker", g["groupName"], g) for g in cluster.get(
                "workerGroupSpecs", []))]  # fmt: skip
            for node_type, group, group_spec in groups:
                labels = kuberay_pod_labels(group_spec["template"], node_type, group, name)
                where = f"{path.relative_to(REPO)} {doc['kind']} {doc['metadata']['name']} {group}"
                found.append((where, group_spec.get("rayStartParams", {}), group_spec["template"], labels))
    return found


def test_the_podmonitor_scrapes_every_ray_pod_of_infra_k8s_on_its_metrics_port():
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert "namespaceSelector" not in monitor["spec"]  # the Ray pods' namespace: the overlay's
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    templates = ray_pod_templates()
    assert {where.split()[1] for where, *_ in templates} == {"RayCluster", "RayJob", "RayService"}
    for where, params, template, labels in templates:
        assert selects(monitor["spec"]["selector"], labels), where
        ray_container = template["spec"]["containers"][0]
        ports = {p.get("name"): p["containerPort"] for p in ray_container.get("ports", [])}
        agent_port = int(params.get("metrics-export-port", KUBERAY_METRICS_PORT[1]))
        if endpoint["port"] in ports:  # declared: on the port Ray's agent listens on
            assert ports[endpoint["port"]] == agent_port, where
        else:  # KubeRay adds it
            assert (endpoint["port"], agent_port) == KUBERAY_METRICS_PORT, where
    # and nothing else: KubeRay's submitter pods (a RayJob's `ray job submit`) carry no ray.io/node-type
    assert not selects(monitor["spec"]["selector"], {"job-name": "crossvit-train", "app.kubernetes.io/name": "kuberay"})


def samples(port: int) -> list[Sample]:
    """A node's metrics agent as Prometheus reads it: every sample (name, labels, value)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def cluster_total(name: str, **labels: str) -> float:
    """A metric summed over its samples with these labels on every live node of the cluster (ray.init'ed)."""
    return sum(
        s.value
        for node in ray.nodes()
        if node["Alive"]
        for s in samples(node["MetricsExportPort"])
        if s.name == name and labels.items() <= s.labels.items()
    )


@ray.remote(num_cpus=0)
class _Recorder:
    """A Ray worker that records the project's own gauges (a run's LiveMetrics) and counters (labeling's
    RowCounts), and a histogram. A worker's metrics reach its node's agent at its next report (10 s), or as it
    exits: this one is made to exit."""

    def record(self) -> str:
        from ray.util import metrics

        from pipelines.label.model import RowCounts
        from pipelines.train.metrics import LiveMetrics

        live = LiveMetrics("monitoring-test")
        live.epoch({"images_per_s": 123.0, "epoch_s": 4.5, "epoch": 0})
        live.close()
        RowCounts("monitoring-test", 7).count([None, None, "undecodable"])
        metrics.Histogram("crossvit_monitoring_test_ms", description="a probe", boundaries=[1, 10]).observe(3)
        return ray.get_runtime_context().get_node_id()


def test_a_real_metrics_agent_exports_the_names_the_rules_say(ray_cluster):
    """The export rules above, and the project's names, against the session cluster's metrics agent."""
    from pipelines.label.model import ERRORS, ROWS
    from pipelines.train.metrics import IMAGES_PER_S, PROGRESS, RUN_TAG

    recorder = _Recorder.remote()
    node = ray.get(recorder.record.remote())
    recorder.__ray_terminate__.remote()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node)
    run = {RUN_TAG: "monitoring-test"}
    wanted = {
        **{name: run for name in EXPORTED_AS["gauge"](IMAGES_PER_S) + EXPORTED_AS["gauge"](PROGRESS)},
        **{name: {"model": "monitoring-test", "version": "7"} for name in EXPORTED_AS["counter"](ROWS)},
        **{name: {"problem": "undecodable"} for name in EXPORTED_AS["counter"](ERRORS)},
        **{name: {} for name in EXPORTED_AS["histogram"]("crossvit_monitoring_test_ms")},
    }
    deadline = time.monotonic() + 30
    while True:
        found = samples(port)
        missing = [n for n, labels in wanted.items() if not any(
            s.name == n and labels.items() <= s.labels.items() for s in found)]  # fmt: skip
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert missing == [], sorted({s.name for s in found if "crossvit" in s.name})
    assert cluster_total(EXPORTED_AS["counter"](ROWS)[0], model="monitoring-test") == 3
    assert cluster_total(EXPORTED_AS["counter"](ERRORS)[0], model="monitoring-test", problem="undecodable") == 1
    assert cluster_total(EXPORTED_AS["gauge"](IMAGES_PER_S)[0], **run) == 123
