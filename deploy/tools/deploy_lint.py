#!/usr/bin/env python3
"""Checks of deploy/ that no off-the-shelf tool does; run by .ci/deploy-checks.sh.

  promql-rules OUT        every PromQL query of the Grafana dashboard and the prometheus-adapter rules, written
                          as a Prometheus rules file, so `promtool check rules OUT` parses each with Prometheus'
                          own parser
  metrics [--scrape FILE] metric names used by the dashboard, the rules, the adapter and the HPA: each raw
                          (non-recorded) name must be one the router declares (router/src/metrics.rs, once it
                          exists) and, with --scrape, appear in that /metrics text of a running router
  k8s FILE...             kustomize outputs: the ServiceMonitor against the prometheus-operator schema with
                          unknown fields rejected (kubernetes-validate has no CRD schemas), and the cross-object
                          facts no schema knows (grace period vs drain timeout, selectors, probes, GPU + shm)
  self-test               feeds each check above a broken input and fails unless the check rejects it

Needs PyYAML, jsonschema, promql-parser and cloudcoil-models-prometheus-operator (installed by the CI script).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tessera-dashboard.json"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
ADAPTER_CONFIG = DEPLOY / "k8s" / "prometheus-adapter" / "config.yaml"
HPA = DEPLOY / "k8s" / "base" / "hpa.yaml"
ROUTER_SRC = ROOT / "router" / "src"
ROUTER_METRICS = ROUTER_SRC / "metrics.rs"

# Series Prometheus itself produces for every target.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series that TGI's published Grafana dashboard (assets/tgi_grafana.json in TGI's repository) queries: a
# Tessera scrape must hold each, so that dashboard works unmodified.
TGI_DASHBOARD_SERIES = (
    "tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_batch_concat",
    "tgi_request_skipped_tokens_bucket", "tgi_request_queue_duration_bucket",
    "tgi_batch_inference_duration_bucket", "tgi_batch_forward_duration_bucket",
    "tgi_request_generated_tokens_sum", "tgi_request_generated_tokens_count",
    "tgi_request_generated_tokens_bucket", "tgi_request_input_length_bucket",
)


class CheckError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# PromQL sources


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus would see."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    # Variables only stand inside regex label matchers here; ".*" is what "All" expands to.
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every label_values() variable of the dashboard."""
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p.get('title')!r} target {t.get('refId')}", grafana_to_promql(t["expr"])))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
        if not m:
            raise CheckError(f"variable {v['name']}: only label_values(selector, label) queries are checked: {query!r}")
        out.append((f"variable {v['name']}", grafana_to_promql(m.group(1))))
    return out


def adapter_queries(config: dict) -> list[tuple[str, str]]:
    """prometheus-adapter rules as plain PromQL: the Go templates filled the way the adapter fills them."""
    out = []
    for i, rule in enumerate(config.get("rules", [])):
        series = rule["seriesQuery"].strip().strip("'")
        out.append((f"adapter rule {i} seriesQuery", series))
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", series).group(0)
        group_by = ",".join(o["resource"] for o in rule.get("resources", {}).get("overrides", {}).values()) or "pod"
        filled = (rule["metricsQuery"].replace("<<.Series>>", name)
                  .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"tessera-a|tessera-b"')
                  .replace("<<.GroupBy>>", group_by))
        if "<<" in filled:
            raise CheckError(f"adapter rule {i}: unsupported template in metricsQuery: {rule['metricsQuery']!r}")
        out.append((f"adapter rule {i} metricsQuery", filled))
    return out


def rule_expressions(paths) -> tuple[list[tuple[str, str]], set[str]]:
    """(where, expr) of every rule, and the names the recording rules define."""
    exprs, recorded = [], set()
    for path in paths:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                exprs.append((f"{path.name}: {name}", rule["expr"]))
                if "record" in rule:
                    recorded.add(rule["record"])
    return exprs, recorded


def promql_rules_file(queries: list[tuple[str, str]]) -> str:
    rules = [{"record": f"deploy_lint:query_{i}", "expr": q} for i, (_, q) in enumerate(queries)]
    return "# Generated by deploy/tools/deploy_lint.py: one rule per dashboard/adapter query.\n" + yaml.safe_dump(
        {"groups": [{"name": "deploy-lint-queries", "rules": rules}]}, sort_keys=False, width=1000)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (parsed with promql-parser, not matched by regex)."""
    import promql_parser

    names: set[str] = set()

    def visit(node):
        if node is None:
            return
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)
            return
        if isinstance(node, promql_parser.MatrixSelector):
            return visit(node.vector_selector)
        if isinstance(node, promql_parser.Call):
            for a in node.args:
                visit(a)
            return
        if isinstance(node, promql_parser.AggregateExpr):
            visit(node.expr)
            visit(node.param)
            return
        if isinstance(node, promql_parser.BinaryExpr):
            visit(node.lhs)
            visit(node.rhs)
            return
        if isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            return visit(node.expr)
        if isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
            return
        raise CheckError(f"unknown PromQL node {type(node).__name__} in {expr!r}")

    try:
        visit(promql_parser.parse(expr))
    except ValueError as e:
        raise CheckError(f"PromQL does not parse: {expr!r}: {e}") from None
    return names


# ---------------------------------------------------------------------------------------------------------
# metrics


def scraped_names(text: str) -> tuple[set[str], dict[str, str]]:
    """Sample names and TYPE declarations of a Prometheus text exposition."""
    samples, types = set(), {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if not m:
            raise CheckError(f"scrape: not a sample line: {line!r}")
        samples.add(m.group(0))
    return samples, types


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def declared_in_router(name: str, sources: str) -> bool:
    return f'"{name}"' in sources or f'"{base_name(name)}"' in sources


def used_metrics() -> tuple[dict[str, list[str]], set[str]]:
    """raw metric name -> where it is used; and the names our recording rules define."""
    rule_exprs, recorded = rule_expressions(RULE_FILES)
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    adapter = yaml.safe_load(ADAPTER_CONFIG.read_text())
    queries += adapter_queries(adapter) + rule_exprs
    used: dict[str, list[str]] = {n: ["TGI's Grafana dashboard"] for n in TGI_DASHBOARD_SERIES}
    for where, q in queries:
        for n in metric_names(q):
            used.setdefault(n, []).append(where)
    # The HPA asks the adapter for metrics by the names the adapter's rules serve them as.
    served = {r.get("name", {}).get("as") or re.match(r"\w+", r["seriesQuery"].strip("'")).group(0)
              for r in adapter.get("rules", [])}
    for doc in yaml.safe_load_all(HPA.read_text()):
        for m in doc["spec"].get("metrics", []):
            if m["type"] == "Pods":
                name = m["pods"]["metric"]["name"]
                if name not in served:
                    raise CheckError(f"hpa.yaml: Pods metric {name} is not served by any prometheus-adapter rule")
                used.setdefault(name, []).append("hpa.yaml")
    return used, recorded


def check_metrics(scrape: Path | None, router_src: Path = ROUTER_SRC) -> list[str]:
    used, recorded = used_metrics()
    raw = {n: w for n, w in used.items() if n not in recorded and n not in PROMETHEUS_BUILTINS}
    problems = []
    for n, where in sorted(raw.items()):
        if not re.fullmatch(r"(tgi|tessera)_[a-z0-9_]+", n):
            problems.append(f"{n}: not a router metric name (tgi_*/tessera_*), used by {where[0]}")
    notes = []
    metrics_rs = router_src / "metrics.rs"
    if metrics_rs.exists():
        sources = "\n".join(p.read_text() for p in sorted(router_src.rglob("*.rs")))
        for n, where in sorted(raw.items()):
            if not declared_in_router(n, sources):
                problems.append(f"{n}: used by {where[0]} but not declared in router/src (metrics.rs)")
    else:
        notes.append(f"{metrics_rs} does not exist: names not checked against the router's source")
    if scrape is not None:
        samples, types = scraped_names(scrape.read_text())
        for n, where in sorted(raw.items()):
            if n not in samples:
                problems.append(f"{n}: used by {where[0]} but absent from the scrape {scrape}")
            # A name with a TYPE line of its own (the counter tgi_request_count) is not a histogram's
            # `_count` series.
            elif n not in types and n.endswith(HISTOGRAM_SUFFIXES) and types.get(base_name(n)) != "histogram":
                problems.append(f"{n}: used as a histogram series but {base_name(n)} has TYPE {types.get(base_name(n))}")
    for note in notes:
        print(f"metrics: note: {note}")
    print(f"metrics: {len(raw)} router metric names checked ({len(recorded)} recorded names, "
          f"scrape: {scrape or 'none'})")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Kubernetes


def _strict(schema):
    """Reject unknown properties everywhere, as the API server does for a CRD's structural schema."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


def servicemonitor_schema() -> dict:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = _strict(ServiceMonitor.model_json_schema(by_alias=True))
    schema["properties"]["apiVersion"] = {"const": "monitoring.coreos.com/v1"}
    schema["properties"]["kind"] = {"const": "ServiceMonitor"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


def validate_servicemonitor(doc: dict, schema: dict) -> list[str]:
    import jsonschema

    v = jsonschema.Draft202012Validator(schema)
    return [f"servicemonitor/{doc['metadata'].get('name')}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in v.iter_errors(doc)]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_k8s_docs(docs: list[dict], source: str, schema: dict) -> list[str]:
    problems = []
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    valid_monitors = []
    for sm in by_kind.get("ServiceMonitor", []):
        errors = validate_servicemonitor(sm, schema)
        problems += errors
        if not errors:
            valid_monitors.append(sm)
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    for dep in by_kind.get("Deployment", []):
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        if not _matches(dep["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"deployment/{name}: selector does not match its pod labels")
        spec = pod["spec"]
        for c in spec["containers"]:
            env = {}
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef", {}).get("name")
                if ref not in configmaps:
                    problems.append(f"deployment/{name}: envFrom ConfigMap {ref} is not in the output")
                env.update(configmaps.get(ref, {}))
            env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
            # The launcher drains for GRACEFUL_TERMINATION_TIMEOUT after SIGTERM, which comes after preStop;
            # the kubelet must not SIGKILL before both are over.
            drain = int(env.get("GRACEFUL_TERMINATION_TIMEOUT", "90"))
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace < drain + pre_stop:
                problems.append(f"deployment/{name}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} "
                                f"+ GRACEFUL_TERMINATION_TIMEOUT {drain}")
            port = int(env.get("PORT", "3000"))
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if ports.get("http") != port:
                problems.append(f"deployment/{name}: container port http {ports.get('http')} != PORT {port}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c.get(probe, {}).get("httpGet")
                if not get or get.get("path") != "/health" or get.get("port") not in ("http", port):
                    problems.append(f"deployment/{name}: {probe} is not an httpGet of /health on the http port")
            if env.get("HOSTNAME") != "0.0.0.0":
                problems.append(f"deployment/{name}: HOSTNAME must be 0.0.0.0 (the runtime sets it to the pod name)")
            gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            if gpus:
                if int(env.get("NUM_SHARD", "0")) != gpus:
                    problems.append(f"deployment/{name}: NUM_SHARD {env.get('NUM_SHARD')} != nvidia.com/gpu {gpus}")
                if env.get("DEVICE") != "cuda":
                    problems.append(f"deployment/{name}: GPU limits but DEVICE={env.get('DEVICE')}")
                shm = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
                vols = {v["name"]: v for v in spec.get("volumes", [])}
                if not shm or vols.get(shm[0], {}).get("emptyDir", {}).get("medium") != "Memory":
                    problems.append(f"deployment/{name}: GPU pod without a memory-backed /dev/shm for NCCL")
        for kind in ("Service", "PodDisruptionBudget"):
            for obj in by_kind.get(kind, []):
                sel = obj["spec"]["selector"]
                sel = sel.get("matchLabels", sel) if kind == "PodDisruptionBudget" else sel
                if not _matches(sel, labels):
                    problems.append(f"{kind.lower()}/{obj['metadata']['name']}: selector matches no pod of {name}")
    deployments = {d["metadata"]["name"] for d in by_kind.get("Deployment", [])}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            problems.append(f"hpa/{hpa['metadata']['name']}: scaleTargetRef {ref['kind']}/{ref['name']} not in the output")
    services = by_kind.get("Service", [])
    # Cross-checks read only ServiceMonitors whose shape the schema already accepted.
    for sm in valid_monitors:
        sel = sm["spec"]["selector"].get("matchLabels", {})
        targets = [s for s in services if _matches(sel, s["metadata"].get("labels", {}))]
        if not targets:
            problems.append(f"servicemonitor/{sm['metadata']['name']}: selector matches no Service")
        for ep in sm["spec"]["endpoints"]:
            if not all(ep.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in targets):
                problems.append(f"servicemonitor/{sm['metadata']['name']}: port {ep.get('port')} missing on a selected Service")
    return [f"{source}: {p}" for p in problems]


def check_k8s(files: list[Path]) -> list[str]:
    schema = servicemonitor_schema()
    problems = []
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        problems += check_k8s_docs(docs, str(f), schema)
        print(f"k8s: {f}: {len(docs)} objects checked "
              f"({sum(d['kind'] == 'ServiceMonitor' for d in docs)} ServiceMonitor against its schema)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# self-test: every check must reject a broken input


def self_test(k8s_file: Path) -> list[str]:
    failures = []
    docs = [d for d in yaml.safe_load_all(k8s_file.read_text()) if d]
    schema = servicemonitor_schema()
    if check_k8s_docs(docs, "ok", schema):
        failures.append(f"the unmodified {k8s_file} does not pass")

    def mutated(kind, fn):
        out = copy.deepcopy(docs)
        for d in out:
            if d["kind"] == kind:
                fn(d)
        return out

    cases = {
        "ServiceMonitor with a misspelt field": mutated(
            "ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update({"pathh": "/metrics"})),
        "ServiceMonitor with a wrongly typed field": mutated(
            "ServiceMonitor", lambda d: d["spec"].update({"endpoints": {"port": "http"}})),
        "grace period shorter than the drain": mutated(
            "Deployment", lambda d: d["spec"]["template"]["spec"].update({"terminationGracePeriodSeconds": 30})),
        "ServiceMonitor port not on the Service": mutated(
            "ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update({"port": "metrics"})),
    }
    for what, broken in cases.items():
        if not check_k8s_docs(broken, what, schema):
            failures.append(f"k8s check accepted: {what}")
    try:
        metric_names("sum(rate(tgi_request_count[5m])")
        failures.append("PromQL parse accepted an unbalanced parenthesis")
    except CheckError:
        pass
    if metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~".*"}[5m]))) / b') != {"a_bucket", "b"}:
        failures.append("metric_names did not find exactly a_bucket and b")
    # A scrape that lacks one used name must fail the metrics check.
    used, recorded = used_metrics()
    raw = sorted(n for n in used if n not in recorded and n not in PROMETHEUS_BUILTINS)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp, "full.prom")
        lines = []
        histograms = {base_name(n) for n in raw if n.endswith("_bucket")}
        for n in raw:
            b = base_name(n)
            if b in histograms:
                lines.append(f"# TYPE {b} histogram")
            else:
                lines.append(f"# TYPE {n} counter")
            lines.append(f'{n}{{le="1"}} 1' if n.endswith("_bucket") else f"{n} 1")
        full.write_text("\n".join(lines) + "\n")
        empty_router = Path(tmp, "src")
        empty_router.mkdir()
        if check_metrics(full, empty_router):
            failures.append("metrics check rejected a scrape holding every used name")
        partial = Path(tmp, "partial.prom")
        partial.write_text("\n".join(l for l in lines if raw[0] not in l) + "\n")
        if not check_metrics(partial, empty_router):
            failures.append(f"metrics check accepted a scrape without {raw[0]}")
        suffixed = Path(tmp, "suffixed.prom")
        suffixed.write_text(re.sub(r"^(# TYPE )?(tgi_request_count)\b", r"\1\2_total", full.read_text(), flags=re.M))
        if not check_metrics(suffixed, empty_router):
            failures.append("metrics check accepted tgi_request_count exported as tgi_request_count_total")
        (empty_router / "metrics.rs").write_text('pub const X: &str = "tgi_request_count";\n')
        if not check_metrics(None, empty_router):
            failures.append("metrics check accepted a router metrics.rs that declares almost nothing")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("promql-rules")
    p.add_argument("out", type=Path)
    p = sub.add_parser("metrics")
    p.add_argument("--scrape", type=Path)
    p = sub.add_parser("k8s")
    p.add_argument("files", type=Path, nargs="+")
    p = sub.add_parser("self-test")
    p.add_argument("k8s_file", type=Path, help="a kustomize output holding a Deployment and a ServiceMonitor")
    args = ap.parse_args()
    try:
        if args.cmd == "promql-rules":
            queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
            queries += adapter_queries(yaml.safe_load(ADAPTER_CONFIG.read_text()))
            args.out.write_text(promql_rules_file(queries))
            print(f"promql-rules: {len(queries)} dashboard/adapter queries written to {args.out}")
            return 0
        if args.cmd == "metrics":
            problems = check_metrics(args.scrape)
        elif args.cmd == "k8s":
            problems = check_k8s(args.files)
        else:
            problems = self_test(args.k8s_file)
            print(f"self-test: {'ok' if not problems else 'FAILED'}")
    except CheckError as e:
        problems = [str(e)]
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
