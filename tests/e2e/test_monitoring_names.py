# The chart's Grafana dashboard and PrometheusRule (helm/smrd, metrics.dashboard and
# metrics.prometheusRule) name only metrics smrd serves: every name in their rendered queries is
# checked against what real processes (3 replicas, 1 gateway, after some requests) answer on
# /metrics, by role: a query for role="server" must name a replica's series, role="client" a
# gateway's. A renamed metric breaks this test, not a production dashboard.
import json
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from smrd.apps.kvclient import KVClient

from helm_render import by_kind, one, render

OBSERVABILITY = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                             "dashboard": {"enabled": True}}}
# A metric name in PromQL, with its {selector} when it has one. Grafana's $__rate_interval and
# the label names inside selectors and by (...) never start with smrd_.
USE = re.compile(r"\b(smrd_[a-zA-Z0-9_]+)\b(\{[^}]*\})?")
# Any other name used as a series (an identifier followed by a selector or a range) would be a
# metric smrd does not serve (e.g. Prometheus' own `up`).
SERIES = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{|\[)")
FUNCTIONS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def _queries() -> list[str]:
    docs = render(OBSERVABILITY)
    (cm,) = [c for c in by_kind(docs, "ConfigMap") if "smrd.json" in c["data"]]
    dash = json.loads(cm["data"]["smrd.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    rule = one(docs, "PrometheusRule")
    exprs += [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    return exprs


def _served(port: int) -> set[str]:
    """Every sample name a process serves (counters with _total, histograms' _bucket/_sum/_count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_every_dashboard_and_alert_metric_is_served(make_cluster):
    exprs = _queries()
    assert len(exprs) > 30, "the dashboard and the rules were rendered"
    cluster = make_cluster(replicas=3, gateways=1, framing="line").start()
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        for i in range(20):
            assert c.request(f"PUT k{i} v") == b"OK"
    served = {"server": set.intersection(*(_served(cluster.metrics_port(i)) for i in range(3))),
              "client": _served(cluster.gateway_metrics_port(0))}
    # Histograms: each of _bucket, _sum and _count is served under the base name's family.
    for role in served:
        for name in list(served[role]):
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix):
                    base = name[: -len(suffix)]
                    assert {base + s for s in ("_bucket", "_sum", "_count")} <= served[role], base
    used, missing = set(), []
    for expr in exprs:
        for name, selector in USE.findall(expr):
            role = re.search(r'role="(server|client)"', selector or "")
            where = [role.group(1)] if role else ["server", "client"]
            used.add(name)
            if not any(name in served[r] for r in where):
                missing.append((name, where, expr))
        others = {n for n, _ in SERIES.findall(expr) if not n.startswith("smrd_")} - FUNCTIONS_AND_KEYWORDS
        assert not others, f"not an smrd metric: {others} in {expr}"
    assert not missing, "\n".join(f"{n} (role {'/'.join(w)}) not served, in: {e}" for n, w, e in missing)
    # The queries do cover what the issue lists (a typo'd panel would drop out of `used`).
    for name in ("smrd_requests_replied_total", "smrd_request_latency_seconds_bucket", "smrd_is_leader",
                 "smrd_view_changes_total", "smrd_known_commit_instance", "smrd_app_up", "smrd_app_restarts_total",
                 "smrd_divergences_total", "smrd_wal_syncs_total", "smrd_state_transfer_progress_ratio",
                 "smrd_connections_refused_total"):
        assert name in used, name
