"""Offline tests of the Helm chart helm/smrd: lint, render, schema-validate, policy-check, and the
cross-resource facts no schema can check. Needs helm-python-sdk, kubernetes-validate and checkov
(see docs/kubernetes.md, "Testing the chart"); `make install` installs all three, and a missing
tool fails its tests (a skipped check would pass silently). Never talks to a cluster: there is
none here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from smrd.config.settings import load_config
from smrd.config.hosts import parse_hosts

import helm_python  # noqa: E402  (pip install helm-python-sdk==0.2.2; make install does)
import kubernetes_validate  # noqa: E402

# The rendering itself is shared with tests/podlab (tests/helm_render.py).
from helm_render import CHART, NAMESPACE, RELEASE, SCENARIOS, by_kind, one, render  # noqa: E402
from helm_render import hosts_configmap, render_files  # noqa: E402
from smrd.ops import kube  # noqa: E402
from helm_render import load_values as _values  # noqa: E402
from chart import crd_schemas  # noqa: E402
import kube_stand_in  # noqa: E402

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
}
# CKV2_K8S_6 (every pod has a NetworkPolicy): checked where the chart renders its policies
# (networkPolicy.enabled), skipped where a scenario turns them off. Two one-shot pods listen on no
# port and have none: the key Job (a pre-install hook: it runs before any policy of the release
# exists) and the helm test pod.
NETPOL_CHECK = "CKV2_K8S_6"
NO_POLICY_NEEDED = ("component-keygen", "test-connection")


ids = [p.stem.removeprefix("values-") for p in SCENARIOS]


def test_every_scenario_is_present():
    names = set(ids)
    for want in ("3-replicas", "5-replicas", "scaled-up", "membership-manual", "framing-close",
                 "framing-line", "framing-length", "framing-http", "hooks-on", "hooks-off", "nodeport",
                 "loadbalancer", "security-own-keys", "insecure", "spread-hard", "observability", "app-data"):
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
            if crd_schemas.is_crd(doc):
                continue  # kubernetes-validate has the built-in kinds only: see below
            kv.validate(doc, version, strict=True)  # raises with the offending path
    for doc in docs:
        if crd_schemas.is_crd(doc):
            crd_schemas.validate(doc)


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
    values = _values(scenario)
    rendered.write_text(yaml.safe_dump_all(render(values), sort_keys=False))
    skips = list(CHECKOV_SKIPS)
    if not (values.get("networkPolicy") or {}).get("enabled", True):
        skips.append(NETPOL_CHECK)
    proc = subprocess.run(
        [*cmd, "-f", str(rendered), "--framework", "kubernetes", "--skip-download", "--quiet",
         "--compact", "-o", "json", "--skip-check", ",".join(skips)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    out = json.loads(proc.stdout)
    reports = out if isinstance(out, list) else [out]
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0, proc.stdout[-2000:]
    assert summary["passed"] > 20, summary  # checkov really ran checks (no false green)
    failed = [(c["check_id"], c["check_name"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    exempt = [f for f in failed if f[0] == NETPOL_CHECK and any(n in f[2] for n in NO_POLICY_NEEDED)]
    assert not [f for f in failed if f not in exempt], failed
    if NETPOL_CHECK not in skips:  # it ran: the policy-less one-shot pods show it
        assert exempt, failed


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
    # smrd ends an app it must reset (docs/app-contract.md): it sees the app's processes (the
    # shared PID namespace above) and may signal them (one user for both containers).
    assert pod["securityContext"]["runAsUser"]
    assert not any("runAsUser" in c["securityContext"] for c in pod["containers"])
    data = ((values.get("app") or {}).get("data") or {}).get("mountPath", "")
    app = pod["containers"][1]
    app_mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert env.get("SMRD_APP_DATA_PATHS") == (data or None)
    if data:
        assert mounts["app-data"] == app_mounts["app-data"] == data
        volume = next(v for v in pod["volumes"] if v["name"] == "app-data")
        assert "emptyDir" in volume, "kept across container restarts, gone with the pod"
    else:
        assert "app-data" not in mounts and "app-data" not in app_mounts
    security = _security_on(values)
    assert ("curve-key" in mounts) == security
    if security:
        assert all(m.get("readOnly") for m in smrd["volumeMounts"] if m["name"].startswith("curve-"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_pdb_keeps_a_quorum(scenario):
    docs = render(_values(scenario))
    n = one(docs, "StatefulSet")["spec"]["replicas"]
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == n // 2 + 1


@pytest.mark.parametrize("n,max_replicas", [(1, 7), (2, 7), (3, 7), (4, 7), (5, 7), (7, 7), (63, 64)])
def test_pdb_and_hosts_for_replica_counts(n, max_replicas):
    docs = render({"replicaCount": n, "maxReplicas": max_replicas,
                   "membership": {"bootstrapVoters": min(n, 3)}})
    assert one(docs, "StatefulSet")["spec"]["replicas"] == n
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == n // 2 + 1
    hosts = parse_hosts(hosts_configmap(docs)["data"]["hosts.conf"])
    assert [r.id for r in hosts.replicas.values()] == list(range(max_replicas))


def _max_replicas(values: dict) -> int:
    return values.get("maxReplicas", 7)


def _hosts_and_names(docs, max_replicas):
    """The StatefulSet, the headless Service, hosts.conf, and the DNS names of the candidate
    replicas 0..maxReplicas-1 (the first `replicas` of them are the StatefulSet's pods)."""
    sts = one(docs, "StatefulSet")
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and headless[0]["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == headless[0]["metadata"]["name"]
    name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
    dns = [f"{name}-{i}.{svc}.{NAMESPACE}.svc.cluster.local" for i in range(max_replicas)]
    return sts, headless[0], parse_hosts(hosts_configmap(docs)["data"]["hosts.conf"]), dns


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_hosts_conf_lists_the_candidate_pods(scenario):
    """hosts.conf lists maxReplicas candidates, replica id = ordinal, whatever replicaCount is;
    the StatefulSet's pods are the first replicaCount of them."""
    values = _values(scenario)
    docs = render(values)
    sts, _, hosts, dns = _hosts_and_names(docs, _max_replicas(values))
    assert [(r.id, r.host) for r in hosts.replicas.values()] == list(enumerate(dns))
    assert sts["spec"]["replicas"] <= hosts.n
    assert hosts.warnings == ()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_ports_agree(scenario):
    docs = render(_values(scenario))
    sts, headless, hosts, _ = _hosts_and_names(docs, _max_replicas(_values(scenario)))
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
    gsvc = [s for s in by_kind(docs, "Service") if s["spec"]["ports"][0]["targetPort"] == "gateway"]
    assert len(gsvc) == 1
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


def _security_on(values) -> bool:
    """CURVE: on by default (values.yaml security.enabled)."""
    return (values.get("security") or {}).get("enabled", True)


def _curve_keys(values, tmp_path):
    """With security on, a stand-in for the Secret and the allow-list ConfigMap: smrd's own key
    format at a temporary path (the directory that replaces /etc/smrd-curve); else None."""
    if not _security_on(values):
        return None
    curve = tmp_path / "curve"
    if not (values.get("security") or {}).get("existingSecret"):
        # The chart's key Job makes them: run it as rendered, mount what it stored.
        docs = render(values)
        objects = kube_stand_in.run_key_job(one(docs, "Job"), tmp_path)
        spec = one(docs, "StatefulSet")["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        kube_stand_in.mount(objects, "secrets", vols["curve-key"]["secret"]["secretName"], curve / "key")
        kube_stand_in.mount(objects, "configmaps", vols["curve-allow"]["configMap"]["name"], curve / "allow")
        return curve
    import zmq
    (curve / "key").mkdir(parents=True)
    (curve / "allow").mkdir()
    # Every candidate's public key is in the allow-list (a pod may join later).
    for name in [f"replica-{i}" for i in range(_max_replicas(values))] + ["gateway-0"]:
        public, secret = zmq.curve_keypair()
        (curve / "key" / f"{name}.key").write_text(secret.decode() + "\n")
        (curve / "allow" / f"{name}.pub").write_text(public.decode() + "\n")
    return curve


def _at(value, curve):
    return value.replace("/etc/smrd-curve", str(curve)) if curve is not None else value


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_smrd_accepts_the_rendered_configuration(scenario, tmp_path):
    """hosts.conf and the SMRD_* environment, exactly as rendered, pass smrd's own validation."""
    values = _values(scenario)
    curve = _curve_keys(values, tmp_path)
    docs = render(values)
    sts = one(docs, "StatefulSet")
    hosts_file = tmp_path / "hosts.conf"
    hosts_file.write_text(hosts_configmap(docs)["data"]["hosts.conf"])
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
        boot = (values.get("membership") or {}).get("bootstrapVoters", 3)
        assert cfg.settings.voters == tuple(range(boot))
        assert cfg.settings.auto_join is (values.get("membership") or {}).get("autoJoin", True)
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
    assert len(hosts.replicas) == 7  # maxReplicas candidates
    assert max(len(r.host.split(".")[0]) for r in hosts.replicas.values()) <= 63  # a DNS label


# --- scaling and membership (docs/kubernetes.md, "Scaling") --------------------------------

def _lines_that_differ(a: str, b: str) -> list[tuple[str, str]]:
    la, lb = a.splitlines(), b.splitlines()
    assert len(la) == len(lb)
    return [(x, y) for x, y in zip(la, lb) if x != y]


@pytest.mark.parametrize("base", [{}, _values(CHART / "ci" / "values-security-own-keys.yaml"),
                                  _values(CHART / "ci" / "values-hooks-on.yaml")],
                         ids=["default", "security", "hooks-on"])
def test_scaling_changes_only_the_replica_count(base):
    """`helm upgrade --reuse-values --set replicaCount=5` (and back to 3) changes the StatefulSet's
    replicas and the PDB, nothing else: hosts.conf and every pod template stay byte-identical, so
    Kubernetes restarts no pod; it only adds (or removes) the highest ordinals."""
    three, five = (render_files({**base, "replicaCount": n}, upgrade=True) for n in (3, 5))
    assert three.keys() == five.keys()
    changed = sorted(k for k in three if three[k] != five[k])
    assert changed == ["smrd/templates/NOTES.txt", "smrd/templates/pdb.yaml",
                       "smrd/templates/statefulset.yaml"]
    assert _lines_that_differ(three["smrd/templates/statefulset.yaml"],
                              five["smrd/templates/statefulset.yaml"]) == [("  replicas: 3", "  replicas: 5")]
    assert _lines_that_differ(three["smrd/templates/pdb.yaml"],
                              five["smrd/templates/pdb.yaml"]) == [("  minAvailable: 2", "  minAvailable: 3")]
    # The same through the whole rendering (install manifests, as dicts).
    d3, d5 = render({**base, "replicaCount": 3}), render({**base, "replicaCount": 5})
    s3, s5 = one(d3, "StatefulSet"), one(d5, "StatefulSet")
    assert (s3["spec"]["replicas"], s5["spec"]["replicas"]) == (3, 5)
    assert s3["spec"]["template"] == s5["spec"]["template"]
    assert hosts_configmap(d3) == hosts_configmap(d5)
    assert one(d3, "Deployment") == one(d5, "Deployment")
    # hosts.conf changes would still roll the pods: the checksum is of the rendered ConfigMap.
    annotation = s3["spec"]["template"]["metadata"]["annotations"]["checksum/hosts"]
    assert annotation == hashlib.sha256(three["smrd/templates/configmap.yaml"].encode()).hexdigest()
    assert one(d3, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/hosts"] == annotation


def test_pod_template_does_not_depend_on_replica_count():
    """No replicaCount anywhere in what a pod sees: the pod templates and hosts.conf of every
    count from 1 to maxReplicas are the same."""
    seen = set()
    for n in range(1, 8):
        files = render_files({"replicaCount": n}, upgrade=True)
        sts = yaml.safe_load(files["smrd/templates/statefulset.yaml"])
        seen.add((yaml.safe_dump(sts["spec"]["template"]), files["smrd/templates/configmap.yaml"],
                  files["smrd/templates/gateway-deployment.yaml"]))
    assert len(seen) == 1


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
def test_membership_settings_prestop_and_rbac(scenario):
    values = _values(scenario)
    membership = {"bootstrapVoters": 3, "autoJoin": True, "scaleDownLeave": True, "leaveTimeoutSeconds": 40,
                  **(values.get("membership") or {})}
    docs = render(values)
    sts = one(docs, "StatefulSet")
    name = sts["metadata"]["name"]
    pod = sts["spec"]["template"]["spec"]
    smrd_c, app_c = pod["containers"]
    env = {e["name"]: e.get("value") for e in smrd_c["env"]}
    assert env["SMRD_VOTERS"] == ",".join(map(str, range(membership["bootstrapVoters"])))
    assert env["SMRD_AUTO_JOIN"] == str(membership["autoJoin"]).lower()
    # Never a token for the whole pod (the app container must not get one).
    assert pod["automountServiceAccountToken"] is False
    assert "automountServiceAccountToken" not in one(docs, "Deployment")["spec"]["template"]["spec"] or \
        one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in one(docs, "Deployment")["spec"]["template"]["spec"]
    assert not any(m["mountPath"].startswith("/var/run/secrets") for m in app_c.get("volumeMounts", []))
    rbac = [d for kind in ("ServiceAccount", "Role", "RoleBinding") for d in by_kind(docs, kind)
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "replica"]
    if not membership["scaleDownLeave"]:
        assert rbac == [] and "lifecycle" not in smrd_c and "serviceAccountName" not in pod
        assert "SMRD_STATEFULSET" not in env
        assert not any(v.get("projected") for v in pod["volumes"])
        return
    # The preStop hook: leave only on a scale-down, within the grace period.
    script = smrd_c["lifecycle"]["preStop"]["exec"]["command"]
    assert script[:2] == ["/bin/sh", "-c"]
    assert "smrd admin leave --self --if-scaled-down -c /etc/smrd/hosts.conf" in script[2]
    assert f"--timeout {membership['leaveTimeoutSeconds']}" in script[2]
    assert pod["terminationGracePeriodSeconds"] >= membership["leaveTimeoutSeconds"] + 10
    # smrd.ops.kube finds this StatefulSet, by SMRD_STATEFULSET and by the pod's hostname alike.
    assert env["SMRD_STATEFULSET"] == name
    for i in range(sts["spec"]["replicas"]):
        assert kube.statefulset_name(i, environ={}, hostname=f"{name}-{i}") == name
    # The token, CA and namespace, where smrd.ops.kube reads them, in the smrd container only.
    (mount,) = [m for m in smrd_c["volumeMounts"] if m["mountPath"] == kube.SERVICE_ACCOUNT_DIR]
    assert mount["readOnly"] is True
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    paths = set()
    for src in vol["projected"]["sources"]:
        if "serviceAccountToken" in src:
            paths.add(src["serviceAccountToken"]["path"])
        if "configMap" in src:
            assert src["configMap"]["name"] == "kube-root-ca.crt"
            paths |= {i["path"] for i in src["configMap"]["items"]}
        if "downwardAPI" in src:
            (item,) = src["downwardAPI"]["items"]
            assert item["fieldRef"]["fieldPath"] == "metadata.namespace"
            paths.add(item["path"])
    assert paths == {"token", "ca.crt", "namespace"}
    # RBAC: one ServiceAccount for the replica pods, allowed exactly one GET of this StatefulSet.
    sa, role, binding = (one(docs, k, "replica") for k in ("ServiceAccount", "Role", "RoleBinding"))
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["statefulsets"],
                              "resourceNames": [name], "verbs": ["get"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]


@pytest.mark.parametrize("scenario", ["values-3-replicas.yaml", "values-security-own-keys.yaml"])
def test_prestop_command_runs_and_stays_outside_kubernetes(scenario, tmp_path):
    """The rendered preStop script, with the smrd container's rendered environment, is accepted by
    `smrd admin` and, with no Kubernetes API (as here: smrd.ops.kube says "not scaled down"), changes
    nothing and exits 0 at once. Paths under /etc/smrd* are mapped to temporary files."""
    values = _values(CHART / "ci" / scenario)
    curve = _curve_keys(values, tmp_path)
    docs = render(values)
    sts = one(docs, "StatefulSet")
    smrd_c = sts["spec"]["template"]["spec"]["containers"][0]
    (tmp_path / "hosts.conf").write_text(hosts_configmap(docs)["data"]["hosts.conf"])
    pod = f"{sts['metadata']['name']}-{sts['spec']['replicas'] - 1}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMRD_", "KUBERNETES_"))}
    env.update({k: _at(v, curve) for k, v in _pod_env(smrd_c, pod).items()})
    env["SMRD_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join([str(CHART.parents[1]), env.get("PYTHONPATH", "")])
    script = smrd_c["lifecycle"]["preStop"]["exec"]["command"][2]
    script = _at(script.replace("/etc/smrd/", f"{tmp_path}/"), curve)
    assert script.count(" smrd ") == 1
    script = script.replace(" smrd ", f" {sys.executable} -m smrd ")
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stays: its StatefulSet was not scaled down" in proc.stderr
    assert "membership is unchanged" in proc.stderr


def test_notes_warn_about_counts_that_tolerate_less():
    notes = {n: render_files({"replicaCount": n, "membership": {"bootstrapVoters": 1}})["smrd/templates/NOTES.txt"]
             for n in (1, 2, 3, 4, 5)}
    assert "WARNING: 1 replica(s) tolerate no crashed replica" in notes[1]
    assert "WARNING: 2 replica(s) tolerate no crashed replica" in notes[2]
    assert "WARNING: an even replica count (4)" in notes[4]
    assert "WARNING" not in notes[3] and "WARNING" not in notes[5]
    assert "--reuse-values --set replicaCount=5" in notes[3]


def _chart_with_fake_release(tmp_path, config_map: dict | None, statefulset: dict | None):
    """A copy of the chart whose upgrade check compares with the given objects instead of the
    running release's (what `lookup` would return in a cluster)."""
    chart = tmp_path / "smrd"
    shutil.copytree(CHART, chart)
    (chart / "fake").mkdir()
    (chart / "fake" / "cm.yaml").write_text(yaml.safe_dump(config_map) if config_map else "")
    (chart / "fake" / "sts.yaml").write_text(yaml.safe_dump(statefulset) if statefulset else "")
    (chart / "templates" / "zz-fake-upgrade.yaml").write_text(
        '{{- include "smrd.checkUnchanged" (dict "ctx" . "configMap" (.Files.Get "fake/cm.yaml" | fromYaml)'
        ' "statefulSet" (.Files.Get "fake/sts.yaml" | fromYaml)) }}\n')
    return chart


def _upgrade(chart, values):
    return helm_python.Chart.load(str(chart)).render(values, name=RELEASE, namespace=NAMESPACE,
                                                     is_install=False, is_upgrade=True)


def test_upgrade_keeps_candidates_and_bootstrap_voters(tmp_path):
    """maxReplicas and membership.bootstrapVoters are fixed for the cluster's life: an upgrade that
    changes them is refused with the value to use; scaling is not."""
    docs = render({})
    running_cm, running_sts = hosts_configmap(docs), one(docs, "StatefulSet")
    chart = _chart_with_fake_release(tmp_path / "a", running_cm, running_sts)
    _upgrade(chart, {"replicaCount": 5})
    _upgrade(chart, {"replicaCount": 1})
    with pytest.raises(helm_python.HelmError, match=re.escape(
            "maxReplicas=9, but this release's hosts.conf lists 7 replicas") + ".*--set maxReplicas=7"):
        _upgrade(chart, {"maxReplicas": 9})
    with pytest.raises(helm_python.HelmError, match=re.escape(
            "membership.bootstrapVoters=5 (voters 0,1,2,3,4), but this release started with voters 0,1,2") +
            ".*--set membership.bootstrapVoters=3"):
        _upgrade(chart, {"replicaCount": 5, "membership": {"bootstrapVoters": 5}})
    # Nothing running (install, helm template): nothing to compare with.
    _upgrade(_chart_with_fake_release(tmp_path / "b", None, None), {"maxReplicas": 9})


@pytest.mark.parametrize("old_count", [3, 5])
def test_upgrade_from_chart_0_1_0(tmp_path, old_count):
    """A release of chart 0.1.0 (hosts.conf = its replicaCount replicas, no SMRD_VOTERS: all of them
    voted) upgrades only with maxReplicas = bootstrapVoters = that count."""
    docs = render({"replicaCount": old_count, "maxReplicas": old_count,
                   "membership": {"bootstrapVoters": old_count}})
    cm, sts = hosts_configmap(docs), one(docs, "StatefulSet")
    smrd_c = sts["spec"]["template"]["spec"]["containers"][0]
    smrd_c["env"] = [e for e in smrd_c["env"] if e["name"] not in ("SMRD_VOTERS", "SMRD_AUTO_JOIN", "SMRD_STATEFULSET")]
    chart = _chart_with_fake_release(tmp_path, cm, sts)
    with pytest.raises(helm_python.HelmError, match=f"--set maxReplicas={old_count}"):
        _upgrade(chart, {"replicaCount": old_count})
    with pytest.raises(helm_python.HelmError, match=f"started with voters {','.join(map(str, range(old_count)))}"
                                                     f".*--set membership.bootstrapVoters={old_count}"):
        _upgrade(chart, {"replicaCount": old_count, "maxReplicas": old_count, "membership": {"bootstrapVoters": 2}})
    files = _upgrade(chart, {"replicaCount": old_count, "maxReplicas": old_count,
                             "membership": {"bootstrapVoters": old_count}})
    assert yaml.safe_load(files["smrd/templates/configmap.yaml"])["data"]["hosts.conf"].count("\nreplica ") == old_count


# --- bad values fail, with a message that says what is wrong ---------------------------------

BROKEN = [
    ({"replicaCount": 0}, "/replicaCount': minimum: got 0, want 1"),
    ({"replicaCount": 65}, "/replicaCount': maximum: got 65, want 64"),
    ({"replicaCount": "3"}, "/replicaCount'"),
    ({"maxReplicas": 0}, "/maxReplicas': minimum: got 0, want 1"),
    ({"maxReplicas": 65}, "/maxReplicas': maximum: got 65, want 64"),
    ({"membership": {"bootstrapVoters": 0}}, "/membership/bootstrapVoters': minimum: got 0, want 1"),
    ({"membership": {"bootstrapVoters": 3, "autoJoin": "yes"}}, "/membership/autoJoin'"),
    ({"membership": {"bootstrapVoters": 3, "voters": [0, 1, 2]}}, "additional properties 'voters' not allowed"),
    ({"membership": {"bootstrapVoters": None}}, "/membership': missing property 'bootstrapVoters'"),
    ({"settings": {"framing": "bogus"}}, "/settings/framing': value must be one of 'close', 'line', 'length', 'http'"),
    ({"settings": {"durability": "sometimes"}}, "/settings/durability': value must be one of 'fsync', 'nosync', 'memory'"),
    ({"ports": {"peer": 70000, "client": 11001, "metrics": 9100, "gateway": 8080, "gatewayMetrics": 9200}},
     "/ports/peer': maximum: got 70,000, want 65,535"),
    ({"app": {"port": 0}}, "/app/port': minimum: got 0, want 1"),
    ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type': value must be one of"),
    ({"spread": {"whenUnsatisfiable": "Never"}}, "/spread/whenUnsatisfiable': value must be one of 'ScheduleAnyway', 'DoNotSchedule'"),
    ({"networkPolicy": {"gatewayFrom": [{}]}}, "/networkPolicy/gatewayFrom/0': minProperties"),
    ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "/metrics/serviceMonitor/interval'"),
    ({"security": {"existingSecret": "Not_A_Name"}}, "/security/existingSecret'"),
    ({"app": {"hooks": {"enabled": True, "snapshot": "SNAPSHOT", "restore": "RESTORE"}}},
     "/app/hooks/restore': 'RESTORE' does not match pattern"),
]


@pytest.mark.parametrize("values,message", BROKEN, ids=[str(v) for v, _ in BROKEN])
def test_broken_values_are_refused_clearly(values, message):
    result = helm_python.lint(str(CHART), values, strict=True, kube_version="v1.31.0")
    assert any(message in e for e in result["errors"]), result["errors"]
    with pytest.raises(helm_python.HelmError, match="values don't meet the specifications"):
        render(values)


# Refused by the templates (smrd.validate): relations between values, which JSON Schema cannot
# compare, with a message that names both values and the way out. (`helm lint` only logs a
# template's `fail`; install, upgrade and template stop.)
REFUSED_BY_TEMPLATES = [
    ({"replicaCount": 8}, "replicaCount must be 1..maxReplicas, got replicaCount=8 with maxReplicas=7"),
    ({"replicaCount": 5, "maxReplicas": 3}, "replicaCount must be 1..maxReplicas, got replicaCount=5 with maxReplicas=3"),
    ({"maxReplicas": 5, "membership": {"bootstrapVoters": 6}},
     "membership.bootstrapVoters must be 1..maxReplicas, got 6 with maxReplicas=5"),
    ({"replicaCount": 3, "membership": {"bootstrapVoters": 5}},
     "membership.bootstrapVoters=5 is more than replicaCount=3 at install"),
    ({"server": {"terminationGracePeriodSeconds": 30}},
     "server.terminationGracePeriodSeconds=30 is too short for membership.leaveTimeoutSeconds=40"),
    ({"app": {"port": 11000}}, "must differ"),
]


@pytest.mark.parametrize("values,message", REFUSED_BY_TEMPLATES, ids=[str(v) for v, _ in REFUSED_BY_TEMPLATES])
def test_value_relations_are_refused_clearly(values, message):
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)


def test_relations_that_are_fine():
    # A scale-down below the bootstrap voters is an upgrade, not an install: allowed.
    files = render_files({"replicaCount": 1}, upgrade=True)
    assert "replicas: 1\n" in files["smrd/templates/statefulset.yaml"]
    # Without the preStop leave the grace period is the operator's business.
    render({"server": {"terminationGracePeriodSeconds": 5},
            "membership": {"bootstrapVoters": 3, "scaleDownLeave": False}})


def test_template_checks_behind_the_schema(tmp_path):
    """Without the schema (helm --skip-schema-validation) the templates still refuse counts out of
    range and port clashes, with their own message."""
    chart = tmp_path / "smrd"
    shutil.copytree(CHART, chart)
    (chart / "values.schema.json").unlink()
    cfg = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    for values, message in (({"replicaCount": 0}, "replicaCount must be 1..maxReplicas"),
                            ({"maxReplicas": 65, "replicaCount": 3}, "maxReplicas must be 1..64"),
                            ({"membership": {"bootstrapVoters": 0}}, "membership.bootstrapVoters must be 1..maxReplicas"),
                            ({"app": {"port": 11000}}, "must differ")):
        with pytest.raises(helm_python.HelmError, match=message):
            cfg.install(str(chart), RELEASE, values, dry_run="client")
