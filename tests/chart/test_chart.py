"""Offline tests of the Helm chart helm/smrd: lint, render, schema-validate, policy-check, and the
cross-resource facts no schema can check. Needs helm-python-sdk, kubernetes-validate and checkov
(see docs/kubernetes.md, "Testing the chart"); `make install` installs all three, and a missing
tool fails its tests (a skipped check would pass silently). Never talks to a cluster: there is
none here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from smrd.config import load_config
from smrd.hosts import parse_hosts

import helm_python  # noqa: E402  (pip install helm-python-sdk==0.2.2; make install does)
import kubernetes_validate  # noqa: E402

# The rendering itself is shared with tests/podlab (tests/helm_render.py).
from helm_render import CHART, NAMESPACE, RELEASE, SCENARIOS, by_kind, one, render  # noqa: E402
from helm_render import load_values as _values  # noqa: E402

KUBE_VERSIONS = ("1.29", "1.37")

# checkov checks skipped on the RENDERED manifests, each with its reason. Everything else must pass.
CHECKOV_SKIPS = {
    "CKV_K8S_8": "liveness probe: the app container has none on purpose (smrd's /healthz and /readyz "
                 "cover it; a TCP probe would itself be a request in close framing); the helm test "
                 "pod is one-shot",
    "CKV_K8S_9": "readiness probe: same reasons as CKV_K8S_8 (smrd's /readyz includes 'app reachable')",
    "CKV_K8S_15": "pullPolicy Always: IfNotPresent is right for immutable version tags and local images",
    "CKV_K8S_21": "default namespace: rendered manifests carry no metadata.namespace; helm sets it at install",
    "CKV_K8S_43": "image digest: users pin by tag (image.tag); a digest cannot be known at chart time",
    "CKV2_K8S_6": "NetworkPolicy: peers must reach each other and clients the gateway; a policy is "
                  "site-specific (ingress controller, monitoring namespace) and left to the operator",
}


ids = [p.stem.removeprefix("values-") for p in SCENARIOS]


def test_every_scenario_is_present():
    names = set(ids)
    for want in ("3-replicas", "5-replicas", "framing-close", "framing-line", "framing-length",
                 "framing-http", "hooks-on", "hooks-off", "nodeport", "loadbalancer", "security"):
        assert want in names


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_strict_lint(scenario):
    result = helm_python.lint(str(CHART), _values(scenario), strict=True, kube_version="v1.31.0")
    bad = [m for m in result["messages"] if m["severity"] >= 2]
    assert not bad and not result["errors"], (bad, result["errors"])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_manifests_match_kubernetes_schemas(scenario):
    kv = kubernetes_validate
    docs = render(_values(scenario))
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service", "ConfigMap",
                                          "PodDisruptionBudget"}
    for version in KUBE_VERSIONS:
        for doc in docs:
            kv.validate(doc, version, strict=True)  # raises with the offending path


def _checkov() -> list[str] | None:
    exe = os.environ.get("CHECKOV") or shutil.which("checkov")
    if exe:
        return [exe]
    if subprocess.run([sys.executable, "-c", "import checkov"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "checkov.main"]
    return None


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_checkov_on_rendered_manifests(scenario, tmp_path):
    cmd = _checkov()
    if cmd is None:
        pytest.fail("checkov not found: run `make install` (it puts checkov==3.3.30 in .venv-checkov) "
                    "or set CHECKOV=/path/to/checkov")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(render(_values(scenario)), sort_keys=False))
    proc = subprocess.run(
        [*cmd, "-f", str(rendered), "--framework", "kubernetes", "--skip-download", "--quiet",
         "--compact", "-o", "json", "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    out = json.loads(proc.stdout)
    reports = out if isinstance(out, list) else [out]
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0, proc.stdout[-2000:]
    assert summary["passed"] > 20, summary  # checkov really ran checks (no false green)
    failed = [(c["check_id"], c["check_name"], c["resource"])
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed


# --- facts a schema cannot check -----------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_selectors_match_pod_labels(scenario):
    docs = render(_values(scenario))
    for kind in ("StatefulSet", "Deployment"):
        for w in by_kind(docs, kind):
            sel = w["spec"]["selector"]["matchLabels"]
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert sel.items() <= labels.items(), (kind, sel, labels)
    sts, dep = one(docs, "StatefulSet"), one(docs, "Deployment")
    pod_labels = {"replica": sts["spec"]["template"]["metadata"]["labels"],
                  "gateway": dep["spec"]["template"]["metadata"]["labels"]}
    for svc in by_kind(docs, "Service"):
        sel = svc["spec"]["selector"]
        matches = [c for c, labels in pod_labels.items() if sel.items() <= labels.items()]
        assert len(matches) == 1, (svc["metadata"]["name"], sel)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels["replica"].items()
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels["gateway"].items()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_replica_pod_shape(scenario):
    values = _values(scenario)
    docs = render(values)
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert pod["shareProcessNamespace"] is True
    assert [c["name"] for c in pod["containers"]] == ["smrd", "app"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
    smrd = pod["containers"][0]
    assert smrd["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert smrd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert smrd["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in smrd["volumeMounts"]}
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in smrd["env"]}
    assert mounts[claim] == env["SMRD_DATA_DIR"]
    hooks = (values.get("app") or {}).get("hooks") or {}
    assert ("SMRD_SNAPSHOT_REQUEST" in env) == bool(hooks.get("enabled"))
    if hooks.get("enabled"):
        assert env["SMRD_SNAPSHOT_REQUEST"] == hooks["snapshot"]
        assert "{state}" in env["SMRD_RESTORE_REQUEST"]
    for spec in [pod] + [d["spec"]["template"]["spec"] for d in by_kind(docs, "Deployment")]:
        assert spec.get("enableServiceLinks") is False, "Service links would inject SMRD_* variables"
    security = (values.get("security") or {}).get("enabled", False)
    assert ("curve-key" in mounts) == security
    if security:
        assert all(m.get("readOnly") for m in smrd["volumeMounts"] if m["name"].startswith("curve-"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_pdb_keeps_a_quorum(scenario):
    docs = render(_values(scenario))
    n = one(docs, "StatefulSet")["spec"]["replicas"]
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == n // 2 + 1


@pytest.mark.parametrize("n", [3, 5, 7, 63])
def test_pdb_and_hosts_for_replica_counts(n):
    docs = render({"replicaCount": n})
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == n // 2 + 1
    hosts = parse_hosts(one(docs, "ConfigMap")["data"]["hosts.conf"])
    assert [r.id for r in hosts.replicas.values()] == list(range(n))
    assert hosts.quorum == one(docs, "PodDisruptionBudget")["spec"]["minAvailable"]


def _hosts_and_names(docs):
    sts = one(docs, "StatefulSet")
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and headless[0]["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == headless[0]["metadata"]["name"]
    n, name, svc = sts["spec"]["replicas"], sts["metadata"]["name"], sts["spec"]["serviceName"]
    dns = [f"{name}-{i}.{svc}.{NAMESPACE}.svc.cluster.local" for i in range(n)]
    return sts, headless[0], parse_hosts(one(docs, "ConfigMap")["data"]["hosts.conf"]), dns


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_hosts_conf_lists_exactly_the_pods(scenario):
    docs = render(_values(scenario))
    _, _, hosts, dns = _hosts_and_names(docs)
    assert [(r.id, r.host) for r in hosts.replicas.values()] == list(enumerate(dns))
    assert hosts.warnings == ()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_ports_agree(scenario):
    docs = render(_values(scenario))
    sts, headless, hosts, _ = _hosts_and_names(docs)
    smrd_c, app_c = sts["spec"]["template"]["spec"]["containers"]
    cports = {p["name"]: p["containerPort"] for p in smrd_c["ports"]}
    sports = {p["name"]: (p["port"], p["targetPort"]) for p in headless["spec"]["ports"]}
    for r in hosts.replicas.values():
        assert (r.peer_port, r.client_port, r.metrics_port) == (cports["peer"], cports["client"], cports["metrics"])
    for name, (port, target) in sports.items():
        assert port == cports[name] and target == name
    env = {e["name"]: e.get("value") for e in smrd_c["env"]}
    assert int(env["SMRD_APP_PORT"]) == app_c["ports"][0]["containerPort"]
    args = " ".join(app_c.get("args", []))
    assert str(app_c["ports"][0]["containerPort"]) in args
    dep = one(docs, "Deployment")
    gw = dep["spec"]["template"]["spec"]["containers"][0]
    gports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    (gline,) = hosts.gateways.values()
    assert (gline.port, gline.metrics_port) == (gports["gateway"], gports["metrics"])
    gsvc = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    assert len(gsvc) == 1 and gsvc[0]["spec"]["ports"][0]["targetPort"] == "gateway"
    want_type = ((_values(scenario).get("gateway") or {}).get("service") or {}).get("type", "ClusterIP")
    assert gsvc[0]["spec"]["type"] == want_type


def _pod_env(container: dict, pod_name: str) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
    return env


def _at(value, curve):
    return value.replace("/etc/smrd-curve", str(curve)) if curve is not None else value


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_smrd_accepts_the_rendered_configuration(scenario, tmp_path):
    """hosts.conf and the SMRD_* environment, exactly as rendered, pass smrd's own validation."""
    values = _values(scenario)
    curve = None
    if (values.get("security") or {}).get("enabled"):
        # In a cluster the keys come from a Secret and a ConfigMap; here smrd's own key format
        # stands in for them at a temporary path.
        import zmq
        curve = tmp_path / "curve"
        (curve / "key").mkdir(parents=True)
        (curve / "allow").mkdir()
        names = [f"replica-{i}" for i in range(values.get("replicaCount", 3))] + ["gateway-0"]
        for name in names:
            public, secret = zmq.curve_keypair()
            (curve / "key" / f"{name}.key").write_text(secret.decode() + "\n")
            (curve / "allow" / f"{name}.pub").write_text(public.decode() + "\n")
    docs = render(values)
    sts = one(docs, "StatefulSet")
    hosts_file = tmp_path / "hosts.conf"
    hosts_file.write_text(one(docs, "ConfigMap")["data"]["hosts.conf"])
    smrd_c = sts["spec"]["template"]["spec"]["containers"][0]
    script = smrd_c["args"][0]
    assert smrd_c["command"] == ["/bin/sh", "-c"] and "--role server" in script
    for i in range(sts["spec"]["replicas"]):
        pod = f"{sts['metadata']['name']}-{i}"
        env = _pod_env(smrd_c, pod)
        replica_id = int(env["POD_NAME"].rsplit("-", 1)[1])  # what "${POD_NAME##*-}" gives
        env = {k: _at(v, curve) for k, v in env.items() if k.startswith("SMRD_")}
        env["SMRD_DATA_DIR"] = str(tmp_path / f"data-{i}")
        cfg = load_config({"role": "server", "hosts": str(hosts_file), "id": replica_id}, env)
        assert cfg.settings.id == i
        assert cfg.metrics_port == cfg.hosts.replicas[i].metrics_port
        assert cfg.settings.framing == (values.get("settings") or {}).get("framing", "line")
    gw = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert gw["args"][:2] == ["--role", "client"]
    env = {k: _at(v, curve) for k, v in _pod_env(gw, "gw").items() if k.startswith("SMRD_")}
    cfg = load_config({"role": "client", "hosts": str(hosts_file)}, env)
    assert cfg.metrics_port == cfg.hosts.gateways[0].metrics_port


def test_test_hook_targets_the_gateway_service():
    docs = render({})
    (pod,) = [d for d in by_kind(docs, "Pod")]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    svc = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"][0]
    assert env["GW_HOST"].split(".")[0] == svc["metadata"]["name"]
    assert int(env["GW_PORT"]) == svc["spec"]["ports"][0]["port"]


def test_long_release_names_are_truncated():
    cfg = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    text = cfg.install(str(CHART), "r" * 53, {}, dry_run="client")["manifest"]
    for d in (d for d in yaml.safe_load_all(text) if d):
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]
    hosts = parse_hosts([d for d in yaml.safe_load_all(text) if d and d["kind"] == "ConfigMap"][0]["data"]["hosts.conf"])
    assert len(hosts.replicas) == 3


# --- bad values fail, with a message that says what is wrong ---------------------------------

BROKEN = [
    ({"replicaCount": 0}, "/replicaCount': value must be one of 3, 5, 7"),
    ({"replicaCount": 4}, "/replicaCount': value must be one of 3, 5, 7"),
    ({"replicaCount": "3"}, "/replicaCount'"),
    ({"settings": {"framing": "bogus"}}, "/settings/framing': value must be one of 'close', 'line', 'length', 'http'"),
    ({"settings": {"durability": "sometimes"}}, "/settings/durability': value must be one of 'fsync', 'nosync', 'memory'"),
    ({"ports": {"peer": 70000, "client": 11001, "metrics": 9100, "gateway": 8080, "gatewayMetrics": 9200}},
     "/ports/peer': maximum: got 70,000, want 65,535"),
    ({"app": {"port": 0}}, "/app/port': minimum: got 0, want 1"),
    ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type': value must be one of"),
    ({"security": {"enabled": True}}, "/security/existingSecret': minLength"),
    ({"app": {"hooks": {"enabled": True, "snapshot": "SNAPSHOT", "restore": "RESTORE"}}},
     "/app/hooks/restore': 'RESTORE' does not match pattern"),
]


@pytest.mark.parametrize("values,message", BROKEN, ids=[str(v) for v, _ in BROKEN])
def test_broken_values_are_refused_clearly(values, message):
    result = helm_python.lint(str(CHART), values, strict=True, kube_version="v1.31.0")
    assert any(message in e for e in result["errors"]), result["errors"]
    with pytest.raises(helm_python.HelmError, match="values don't meet the specifications"):
        render(values)


def test_template_checks_behind_the_schema(tmp_path):
    """Without the schema (helm --skip-schema-validation) the templates still refuse an even
    replica count and port clashes, with their own message."""
    chart = tmp_path / "smrd"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    cfg = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    for values, message in (({"replicaCount": 4}, "replicaCount must be an odd integer >= 3"),
                            ({"replicaCount": 1}, "replicaCount must be an odd integer >= 3"),
                            ({"app": {"port": 11000}}, "must differ")):
        with pytest.raises(helm_python.HelmError, match=message):
            cfg.install(str(chart), RELEASE, values, dry_run="client")
