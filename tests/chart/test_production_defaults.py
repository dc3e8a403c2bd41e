"""The chart's production defaults and their switches (issue 19): replicas and gateways spread over
nodes, CURVE on with keys from the pre-install Job, NetworkPolicies port by port, and the
Prometheus Operator / Grafana objects. Offline, on the rendered manifests (tests/helm_render.py);
lint, schemas and checkov of every ci/ scenario are in test_chart.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from smrd.ops import cli, kube

from helm_render import CHART, NAMESPACE, by_kind, hosts_configmap, one, render
from chart import crd_schemas

import helm_python

DOCS = Path(__file__).resolve().parents[2] / "docs"
OBSERVABILITY = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}, "interval": "15s"},
                             "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}


def _pod(docs, kind):
    return one(docs, kind)["spec"]["template"]


def _matches(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


# --- spread --------------------------------------------------------------------------------------

def test_default_spreads_replicas_and_gateways_softly_over_nodes():
    docs = render({})
    for kind, other in (("StatefulSet", "Deployment"), ("Deployment", "StatefulSet")):
        pod = _pod(docs, kind)
        (c,) = pod["spec"]["topologySpreadConstraints"]
        assert (c["topologyKey"], c["whenUnsatisfiable"], c["maxSkew"]) == ("kubernetes.io/hostname", "ScheduleAnyway", 1)
        # It counts this component's pods of this release, and only those.
        assert _matches(c["labelSelector"], pod["metadata"]["labels"])
        assert not _matches(c["labelSelector"], _pod(docs, other)["metadata"]["labels"])
        assert c["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo"


def test_hard_spread_and_zones():
    docs = render({"spread": {"whenUnsatisfiable": "DoNotSchedule", "zone": {"enabled": True}}})
    replica = _pod(docs, "StatefulSet")["spec"]["topologySpreadConstraints"]
    assert [(c["topologyKey"], c["whenUnsatisfiable"]) for c in replica] == [
        ("kubernetes.io/hostname", "DoNotSchedule"), ("topology.kubernetes.io/zone", "ScheduleAnyway")]
    # Gateways are stateless: always soft, whatever the replicas' setting.
    gateway = _pod(docs, "Deployment")["spec"]["topologySpreadConstraints"]
    assert [(c["topologyKey"], c["whenUnsatisfiable"]) for c in gateway] == [
        ("kubernetes.io/hostname", "ScheduleAnyway"), ("topology.kubernetes.io/zone", "ScheduleAnyway")]


def test_spread_switches():
    docs = render({"spread": {"enabled": False}})
    assert "topologySpreadConstraints" not in _pod(docs, "StatefulSet")["spec"]
    assert "topologySpreadConstraints" not in _pod(docs, "Deployment")["spec"]
    docs = render({"spread": {"gateways": False}})
    assert _pod(docs, "StatefulSet")["spec"]["topologySpreadConstraints"]
    assert "topologySpreadConstraints" not in _pod(docs, "Deployment")["spec"]


def test_users_own_placement_wins():
    own = [{"maxSkew": 2, "topologyKey": "example.com/rack", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "demo"}},
            "matchLabelKeys": ["app.kubernetes.io/component"]}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "example.com/pool", "operator": "In", "values": ["smrd"]}]}]}}}
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "smrd", "effect": "NoSchedule"}]
    docs = render({"topologySpreadConstraints": own, "affinity": affinity, "tolerations": tolerations,
                   "nodeSelector": {"disktype": "ssd"}, "spread": {"whenUnsatisfiable": "DoNotSchedule"}})
    for kind in ("StatefulSet", "Deployment"):
        spec = _pod(docs, kind)["spec"]
        assert spec["topologySpreadConstraints"] == own  # theirs only: none of ours beside them
        assert spec["affinity"] == affinity and spec["tolerations"] == tolerations
        assert spec["nodeSelector"] == {"disktype": "ssd"}


# --- NetworkPolicy -------------------------------------------------------------------------------

def _policies(docs):
    """{component: policy} and the pods' labels by component."""
    labels = {"replica": _pod(docs, "StatefulSet")["metadata"]["labels"],
              "gateway": _pod(docs, "Deployment")["metadata"]["labels"]}
    out = {}
    for p in by_kind(docs, "NetworkPolicy"):
        selected = [c for c, lab in labels.items() if _matches(p["spec"]["podSelector"], lab)]
        assert len(selected) == 1, (p["metadata"]["name"], selected)
        out[selected[0]] = p
    return out, labels


def _who(rule, labels) -> set:
    """Which of our components a rule's `from` admits ({"anyone"} without a from)."""
    if "from" not in rule:
        return {"anyone"}
    who = set()
    for peer in rule["from"]:
        if "namespaceSelector" in peer or "ipBlock" in peer:
            who.add("selector")
        else:
            who |= {c for c, lab in labels.items() if _matches(peer["podSelector"], lab)}
    return who


def test_default_network_policies_port_by_port():
    docs = render({})
    policies, labels = _policies(docs)
    assert set(policies) == {"replica", "gateway"}
    replica_ports = {p["name"]: p["containerPort"] for p in _pod(docs, "StatefulSet")["spec"]["containers"][0]["ports"]}
    gateway_ports = {p["name"]: p["containerPort"] for p in _pod(docs, "Deployment")["spec"]["containers"][0]["ports"]}
    access = {}
    for component, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["protocol"] == "TCP"
                access[(component, port["port"])] = _who(rule, labels)
    assert access == {
        ("replica", replica_ports["peer"]): {"replica"},              # consensus: replicas only
        ("replica", replica_ports["client"]): {"gateway", "replica"},  # gateways; admin tools in replica pods
        ("replica", replica_ports["metrics"]): {"selector"},
        ("gateway", gateway_ports["gateway"]): {"anyone"},
        ("gateway", gateway_ports["metrics"]): {"selector"},
    }
    # The app port is nobody's: it is reached on the pod's loopback only.
    app_port = _pod(docs, "StatefulSet")["spec"]["containers"][1]["ports"][0]["containerPort"]
    assert ("replica", app_port) not in access
    # The metrics selector is the one in values.yaml: Prometheus Operator's pods, any namespace.
    metrics_rule = next(r for r in policies["replica"]["spec"]["ingress"]
                        if r["ports"][0]["port"] == replica_ports["metrics"])
    assert metrics_rule["from"] == [{"namespaceSelector": {},
                                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def test_network_policy_values():
    peer = {"ipBlock": {"cidr": "10.0.0.0/8"}}
    mon = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {}}
    # podSelector: null drops values.yaml's default (Helm merges maps): every pod of the namespace.
    docs = render({"networkPolicy": {"gatewayFrom": [peer], "metrics": {**mon, "podSelector": None}},
                   "ports": {"peer": 12000, "client": 12001, "metrics": 9101, "gateway": 8081, "gatewayMetrics": 9201}})
    policies, _ = _policies(docs)
    gw_rules = {r["ports"][0]["port"]: r for r in policies["gateway"]["spec"]["ingress"]}
    assert gw_rules[8081]["from"] == [peer]
    assert gw_rules[9201]["from"] == [mon]
    assert {r["ports"][0]["port"] for r in policies["replica"]["spec"]["ingress"]} == {12000, 12001, 9101}
    assert by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


# --- CURVE by default: the key Job ---------------------------------------------------------------

HOOK_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Job")


def _key_job_objects(docs):
    return {d["kind"]: d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "keygen"}


@pytest.mark.parametrize("max_replicas", [7, 3, 64])
def test_default_turns_curve_on_with_keys_from_a_hook_job(max_replicas):
    docs = render({"maxReplicas": max_replicas, "replicaCount": min(3, max_replicas)})
    objs = _key_job_objects(docs)
    assert set(objs) == set(HOOK_KINDS)
    for kind, obj in objs.items():
        ann = obj["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert set(ann["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
        # RBAC first (lower weight), then the Job.
        assert int(ann["helm.sh/hook-weight"]) < 0 if kind != "Job" else int(ann["helm.sh/hook-weight"]) == 0
    job = objs["Job"]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = cli.build_parser().parse_args(c["args"])  # smrd's own CLI accepts what the Job runs
    assert args.command == "keygen" and args.out is None
    # Every candidate 0..maxReplicas-1 (a scale-up pod finds its key) and the gateways' key.
    assert args.name == [f"replica-{i}" for i in range(max_replicas)] + ["gateway-0"]
    # ... stored where the pods mount them from.
    for kind in ("StatefulSet", "Deployment"):
        spec = _pod(docs, kind)["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["curve-key"]["secret"]["secretName"] == args.kube_secret
        assert vols["curve-allow"]["configMap"]["name"] == args.kube_configmap
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["SMRD_CURVE_SECRET_KEY"] == "/etc/smrd-curve/key/<name>.key"
    # Least RBAC: read only the two objects; create (which RBAC cannot limit by name) Secrets and
    # ConfigMaps; nothing else. Bound to the Job's own ServiceAccount.
    assert objs["Role"]["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [args.kube_secret], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [args.kube_configmap], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["create"]}]
    assert objs["RoleBinding"]["roleRef"]["name"] == objs["Role"]["metadata"]["name"]
    assert objs["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": objs["ServiceAccount"]["metadata"]["name"],
                                                "namespace": NAMESPACE}]
    assert pod["serviceAccountName"] == objs["ServiceAccount"]["metadata"]["name"]
    # The token where smrd.ops.keystore reads it, in the one container; never automounted.
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == kube.SERVICE_ACCOUNT_DIR and mount["readOnly"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True  # keygen writes no file
    # The Job's ServiceAccount is not the replicas' (which may only get their StatefulSet).
    assert one(docs, "ServiceAccount", "replica")["metadata"]["name"] != objs["ServiceAccount"]["metadata"]["name"]


def test_own_keys_or_security_off_need_no_job():
    own = render({"security": {"existingSecret": "mine", "publicKeysConfigMap": "my-allow"}})
    assert _key_job_objects(own) == {}
    vols = {v["name"]: v for v in _pod(own, "StatefulSet")["spec"]["volumes"]}
    assert vols["curve-key"]["secret"]["secretName"] == "mine"
    assert vols["curve-allow"]["configMap"]["name"] == "my-allow"
    off = render({"security": {"enabled": False}})
    assert _key_job_objects(off) == {}
    env = {e["name"] for e in _pod(off, "StatefulSet")["spec"]["containers"][0]["env"]}
    assert "SMRD_CURVE_SECRET_KEY" not in env


@pytest.mark.parametrize("security", [{"existingSecret": "mine"}, {"publicKeysConfigMap": "my-allow"}])
def test_half_of_your_own_keys_is_refused(security):
    with pytest.raises(helm_python.HelmError, match="existingSecret and security.publicKeysConfigMap go together"):
        render({"security": security})


# --- monitoring ----------------------------------------------------------------------------------

def test_monitoring_is_off_by_default():
    docs = render({})
    assert not [d for d in docs if crd_schemas.is_crd(d)]
    assert len(by_kind(docs, "ConfigMap")) == 1


def test_service_monitors_reach_every_metrics_port():
    docs = render(OBSERVABILITY)
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    pods = {"replica": _pod(docs, "StatefulSet"), "gateway": _pod(docs, "Deployment")}
    seen = set()
    for sm in monitors:
        crd_schemas.validate(sm)
        assert sm["metadata"]["labels"]["release"] == "kps"
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert sm["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]  # the dashboard's $release
        (ep,) = sm["spec"]["endpoints"]
        assert (ep["path"], ep["interval"]) == ("/metrics", "15s")
        (svc,) = [s for s in by_kind(docs, "Service") if _matches(sm["spec"]["selector"], s["metadata"]["labels"])]
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == ep["port"]]
        (component,) = [c for c, t in pods.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        container_ports = {p["name"] for p in pods[component]["spec"]["containers"][0]["ports"]}
        assert port["targetPort"] == "metrics" and "metrics" in container_ports
        seen.add(component)
    assert seen == {"replica", "gateway"}
    # /metrics never on the (maybe public) gateway Service.
    gw = [s for s in by_kind(docs, "Service") if s["spec"]["ports"][0]["targetPort"] == "gateway"][0]
    assert [p["name"] for p in gw["spec"]["ports"]] == ["gateway"]


def test_dashboard_configmap_for_the_grafana_sidecar():
    docs = render({"metrics": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "smrd"}}}})
    (cm,) = [c for c in by_kind(docs, "ConfigMap") if "smrd.json" in c["data"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "smrd"}
    dash = json.loads(cm["data"]["smrd.json"])
    assert dash["uid"] and [v["name"] for v in dash["templating"]["list"]] == ["datasource", "namespace", "release"]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("throughput", "latency", "leader", "view", "lag", "app health", "restarts", "divergence",
                  "wal fsync", "state transfer", "refused connections"):
        assert topic in titles, topic
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all('app_kubernetes_io_instance="$release"' in t["expr"] for t in p["targets"]), p["title"]
    custom = render({"metrics": {"dashboard": {"enabled": True, "labels": {"dashboards": "smrd", "grafana_dashboard": None}}}})
    (cm,) = [c for c in by_kind(custom, "ConfigMap") if "smrd.json" in c["data"]]
    assert cm["metadata"]["labels"]["dashboards"] == "smrd" and "grafana_dashboard" not in cm["metadata"]["labels"]


def test_prometheus_rule_alerts_are_the_documented_ones():
    docs = render(OBSERVABILITY)
    rule = one(docs, "PrometheusRule")
    crd_schemas.validate(rule)
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    for r in alerts:
        # Only this release's series.
        for selector in re.findall(r"smrd_[a-z_]+\{([^}]*)\}", r["expr"]):
            assert f'namespace="{NAMESPACE}"' in selector and 'app_kubernetes_io_instance="demo"' in selector, r
        assert r["labels"]["severity"] in ("critical", "warning")
    ops = (DOCS / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(Smrd[A-Za-z]+)` \|", ops, re.M))
    assert documented == {r["alert"] for r in alerts}
    # What docs/operations.md recommends alerting on, by name.
    exprs = " ".join(r["expr"] for r in alerts)
    for must in ("smrd_divergences_total", "smrd_execution_halted", "smrd_app_resets_total", "smrd_is_leader"):
        assert must in exprs


def test_crd_schemas_catch_a_misplaced_field():
    sm = by_kind(render(OBSERVABILITY), "ServiceMonitor")[0]
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        crd_schemas.validate(sm)
    rule = one(render(OBSERVABILITY), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        crd_schemas.validate(rule)


def test_hosts_conf_unchanged_by_the_new_objects():
    assert hosts_configmap(render(OBSERVABILITY)) == hosts_configmap(render({}))
    assert CHART.joinpath("dashboards", "smrd.json").is_file()
