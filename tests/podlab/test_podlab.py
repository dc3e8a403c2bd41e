"""The rendered Helm chart as pods (docs/kubernetes.md, "The pod lab").

helm/smrd is rendered with ci/values-3-replicas.yaml (3 replicas, the demo app, line framing) and
the chart's defaults: CURVE on and NetworkPolicies. The rendered key Job runs first (against the
stand-in API of tests/kube_stand_in.py), and its Secret and allow-list ConfigMap are mounted where
the pods' volumes say; the policies are enforced as iptables rules (lab.py, NETWORK POLICIES);
its StatefulSet pods (smrd + app, two processes in one network namespace), one pod of the
gateway Deployment and a client namespace run on a private bridge (tests/podlab/lab.py). The
rendered command lines, environment and hosts.conf are used as they are; the peers find each
other through the headless-service names of hosts.conf and the clients reach the gateway
through its Service name. Under a concurrent client workload the test partitions the leader's
pod with iptables, heals it, SIGKILLs the next leader's pod (both containers) and starts it again
from the same manifest on its kept volume, and kills and restarts the gateway pod; the history
must be linearizable with every key read back at the end, and the replicas' apps must end equal.
The chart's `helm test` pod runs too, against the Service.

The second test scales the release 3 -> 5 -> 3 (and pod 3 back on its kept volume) under load: pods
join by themselves, and deleted pods leave in their rendered preStop hook, which asks a stand-in
Kubernetes API server (kube_api.py) whether the StatefulSet was scaled down.

The first test also checks the policies (a stranger pod reaches neither a replica's peer port nor
its client port, a gateway not a peer port) and that a status query without a listed key gets no
answer. test_replica_key_rotation_under_load follows docs/security.md's rotation of a replica's key.

Two more kill ONE container of a replica pod under load and let the lab's kubelet restart it
(restartPolicy Always): the smrd container (the new smrd must end the app the old one fed, and
replay its log into the app the kubelet starts again), and the app container (smrd must notice
the new app and replay its log into it). Each victim heals within HEAL_BOUND_S, the history must
be linearizable and the apps equal. One more checks the lab's model of those restarts on a pod of
its own.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kube_stand_in
from helm_render import CHART, NAMESPACE, by_kind, hosts_configmap, load_values, one, render
from smrd.net.security import keygen
from smrd.config.settings import load_config
from smrd.config.hosts import parse_hosts
from smrd.testing.linearizability import check_operations

from smrd.ops.status import agreed_membership

from .lab import Lab, LabError, expand_vars, lab_namespaces, map_paths, missing_tools

pytestmark = [pytest.mark.podlab, pytest.mark.timeout(300)]

VALUES = CHART / "ci" / "values-3-replicas.yaml"


def _lab_values() -> dict:
    """The chart's values as CI renders them: CURVE and the NetworkPolicies on (the defaults)."""
    return load_values(VALUES)


def _key_job(docs, workdir: Path) -> tuple[dict, Path | None]:
    """The chart's key Job, a pre-install hook, run before any pod: its rendered command (parsed
    by smrd's own CLI) against the stand-in Kubernetes API (tests/kube_stand_in.py). Returns the
    Secret and the allow-list ConfigMap it made ({(plural, name): object}, for Lab(objects=...)),
    with the operator's own key for `smrd status` added to the allow-list as `ops.pub` (what
    docs/security.md asks of an operator), and that key's file; ({}, None) without CURVE."""
    jobs = by_kind(docs, "Job")
    if not jobs:
        return {}, None
    objects = kube_stand_in.run_key_job(one(docs, "Job"), workdir)
    ops = workdir / "ops-key"
    ops.mkdir(parents=True, exist_ok=True)
    key_path, _, public = keygen(str(ops), "ops")
    allow = _volume(docs, "curve-allow")["configMap"]["name"]
    objects[("configmaps", allow)]["data"]["ops.pub"] = public.decode() + "\n"
    return objects, Path(key_path)


def _volume(docs, name: str) -> dict:
    """The replica pods' volume `name`, as rendered."""
    vols = one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    return next(v for v in vols if v["name"] == name)


AGENT = Path(__file__).with_name("agent.py")
KUBE_API = Path(__file__).with_name("kube_api.py")  # a stand-in Kubernetes API server
KEYS = [f"k{i}" for i in range(6)]
CLIENTS = 6
PHASE_OPS = 300  # operations that must complete in each phase (before, during and after faults)
POLL = 0.05  # between two polls of a status or readiness endpoint (there is no event to wait on)


# A pod of someone else's in the release's namespace: labels no NetworkPolicy peer selects.
STRANGER = {"kind": "Pod", "metadata": {"name": "stranger", "labels": {"app.kubernetes.io/name": "stranger"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "command": ["sleep", "600"]}]}}
# TCP connects from inside a pod's network, in parallel: "open" (handshake done), "refused"
# (RST: nothing listens) or "dropped" (no answer within the timeout: a DROP rule).
REACH = """
import json, socket, sys, threading
out = {}
def probe(t):
    host, port = t.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(float(sys.argv[1]))
    try:
        s.connect((host, int(port))); out[t] = "open"
    except ConnectionRefusedError:
        out[t] = "refused"
    except (socket.timeout, TimeoutError):
        out[t] = "dropped"
    except OSError as e:
        out[t] = f"error {e}"
    finally:
        s.close()
ts = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[2:]]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def reach(lab: Lab, pod: str, targets: dict[str, tuple[str, int]], timeout=1.5) -> dict[str, str]:
    """{label: open|refused|dropped} of a TCP connect from pod's network to each (ip, port)."""
    addrs = {label: f"{ip}:{port}" for label, (ip, port) in targets.items()}
    out = lab.exec_in_pod(pod, [sys.executable, "-c", REACH, str(timeout), *addrs.values()])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    return {label: got[a] for label, a in addrs.items()}


def check_policies(lab: Lab, c: "Cluster", note):
    """The rendered NetworkPolicies, enforced: who reaches which port of a replica and a gateway.
    Every "dropped" is paired with an "open" to the same port from a pod the policy admits."""
    r0, r1 = (lab.pod(c.replica_pod[i]) for i in (0, 1))
    gw = lab.pod(c.gateway_pods[0])
    peer, client, metrics = (r1.container_port(n) for n in ("peer", "client", "metrics"))
    targets = {"peer": (r1.ip, peer), "client": (r1.ip, client), "metrics": (r1.ip, metrics),
               "gateway": (gw.ip, gw.container_port("gateway")), "gateway-metrics": (gw.ip, gw.container_port("metrics"))}
    seen = {who: reach(lab, pod, targets) for who, pod in
            (("stranger", "stranger"), ("gateway", gw.name), ("replica", r0.name))}
    expected = {
        "stranger": {"peer": "dropped", "client": "dropped", "metrics": "dropped", "gateway": "open",
                     "gateway-metrics": "dropped"},
        "gateway": {"peer": "dropped", "client": "open", "metrics": "dropped"},
        "replica": {"peer": "open", "client": "open", "metrics": "dropped", "gateway": "open"},
    }
    for who, want in expected.items():
        assert {k: seen[who][k] for k in want} == want, f"from the {who} pod: {seen[who]}"
    note(f"NetworkPolicies enforced (TCP connects to replica {r1.name} and gateway {gw.name}): {seen}")


class Agent:
    """The client-namespace process (agent.py): one JSON command per line, one answer per line."""

    def __init__(self, lab: Lab):
        self.stderr = open(lab.dir / "agent.log", "wb")
        self.proc = lab.client_process([sys.executable, str(AGENT)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def call(self, cmd, wait_s=30.0, **args):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=wait_s)
        except queue.Empty:
            pytest.fail(f"the client agent did not answer {cmd} within {wait_s} s")
        if line is None:
            self.stderr.flush()
            tail = Path(self.stderr.name).read_text(errors="replace")[-3000:]
            pytest.fail(f"the client agent exited ({self.proc.poll()}):\n{tail}")
        out = json.loads(line)
        if "error" in out:
            pytest.fail(f"client agent, {cmd}: {out['error']}")
        return out

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class Cluster:
    """What the test knows of the rendered release, and the waits it needs (all with deadlines)."""

    def __init__(self, lab: Lab, agent: Agent, docs, ops_key: Path | None = None):
        self.lab, self.agent = lab, agent
        # With CURVE: the operator's key and the allow-list ConfigMap, kept in sync on the "node"
        # (the client namespace) as a pod's volume is, for the test's status polls and CLIs.
        self.curve = None
        if ops_key is not None:
            allow = _volume(docs, "curve-allow")["configMap"]["name"]
            self.curve = (str(ops_key), str(lab.project("configmaps", allow, lab.dir / "ops-allow")))
        self.hosts_text = hosts_configmap(docs)["data"]["hosts.conf"]
        self.hosts_path = lab.dir / "hosts.conf"      # for `smrd status`, run by the client
        self.hosts_path.write_text(self.hosts_text)
        hosts = parse_hosts(self.hosts_text)
        # replica id -> pod: the first label of the replica's host name in hosts.conf. hosts.conf
        # lists maxReplicas candidates; the StatefulSet's pods are the first `replicas` of them.
        pods = set(lab.pods_of("StatefulSet", one(docs, "StatefulSet")["metadata"]["name"]))
        self.candidates = {i: r.host.split(".")[0] for i, r in hosts.replicas.items()}
        self.replica_pod = {i: pod for i, pod in self.candidates.items() if pod in pods}
        # The test's own status polls ask the running pods only (a candidate without a pod would
        # cost every poll its whole timeout); `smrd status` (the operator's) gets hosts.conf.
        self.pods_hosts_path = lab.dir / "hosts-pods.conf"
        self.set_active(set(self.replica_pod))
        self.gateway_pods = lab.pods_of("Deployment", one(docs, "Deployment")["metadata"]["name"])
        self.test_pods = lab.pods_of("Pod", one(docs, "Pod")["metadata"]["name"])  # `helm test`
        svc = one(docs, "Service", "gateway")
        self.gateway_service, self.gateway_port = svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]
        self.framing = next(e["value"] for e in one(docs, "StatefulSet")["spec"]["template"]["spec"]
                            ["containers"][0]["env"] if e["name"] == "SMRD_FRAMING")

    def set_active(self, ids):
        """The replica ids whose pods run (what status, leader and convergence look at)."""
        self.active = set(ids)
        self.pods_hosts_path.write_text("\n".join(
            line for line in self.hosts_text.splitlines()
            if not line.split() or line.split()[0] != "replica" or int(line.split()[1]) in self.active) + "\n")

    def status(self):
        """{replica id: status row or None}, from smrd's own status query in the client namespace."""
        curve = dict(zip(("curve_key", "curve_allow"), self.curve or ()))
        rows = self.agent.call("status", hosts=str(self.pods_hosts_path), timeout=0.5, **curve)["rows"]
        return {r["id"]: (r if r["reachable"] else None) for r in rows if r["id"] in self.active}

    def smrd_status_cli(self):
        """`smrd status -c hosts.conf`, the operator's command, run in the client namespace."""
        proc = self.lab.client_process([sys.executable, "-m", "smrd", "status", "-c", str(self.hosts_path),
                                        *self.curve_flags()],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, out
        return out.rstrip()

    def smrd_container(self, pod: str) -> str:
        """The container running smrd in a replica or gateway pod."""
        return self.lab.pod(pod).spec["containers"][0]["name"]

    def curve_flags(self) -> list[str]:
        return ["--curve-secret-key", self.curve[0], "--curve-public-keys", self.curve[1]] if self.curve else []

    def admin_members(self):
        """`smrd admin members -c hosts.conf`, run in the client namespace."""
        proc = self.lab.client_process([sys.executable, "-m", "smrd", "admin", "members", "-c", str(self.hosts_path),
                                        *self.curve_flags()],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, out
        return out.rstrip()

    def readyz(self, pod):
        p = self.lab.pod(pod)
        port = p.container_port("metrics")
        return self.agent.call("http", url=f"http://{p.ip}:{port}/readyz", timeout=1.0)

    def wait(self, what, predicate, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.lab.check_running()
            last = predicate()
            if last:
                return last
            time.sleep(POLL)
        pytest.fail(f"{what}: not within {timeout} s; last: {last}\n{self.status()}")

    def wait_ready(self, pods, timeout=60):
        def all_ready():
            codes = {p: self.readyz(p)["code"] for p in pods}
            return codes if all(c == 200 for c in codes.values()) else None
        return self.wait(f"readiness of {pods}", all_ready, timeout)

    def leader(self, timeout=30, among=None):
        """The replica id that a majority of the reachable replicas, all normal, agree leads."""
        n = len(self.active)

        def agreed():
            rows = [r for i, r in self.status().items() if r and (among is None or i in among)]
            normal = {(r["view"], r["leader"]) for r in rows if r["status"] == "normal"}
            if len(normal) == 1 and len(rows) > n // 2:
                return next(iter(normal))
            return None
        return self.wait("an agreed leader", agreed, timeout)

    def wait_caught_up(self, rid, timeout=60):
        """Replica rid is normal and has executed everything decided when the wait began."""
        target = max((r["commit"] for r in self.status().values() if r), default=0)
        assert target > 0

        def caught_up():
            me = self.status().get(rid)
            return bool(me and me["status"] == "normal" and me["executed"] >= target)
        self.wait(f"replica {rid} catching up to instance {target}", caught_up, timeout)

    def wait_converged(self, timeout=60):
        def converged():
            st = list(self.status().values())
            same = all(st) and len({(r["commit"], r["executed"]) for r in st}) == 1
            return st if same and st[0]["executed"] == st[0]["commit"] else None
        return self.wait("the replicas converging", converged, timeout)

    def progress(self, ops, timeout=60):
        out = self.agent.call("load_wait", timeout + 5, ops=ops, timeout=timeout)
        if not out["ok"]:
            self.lab.check_running()
            pytest.fail(f"no progress: {ops} more operations did not complete within {timeout} s "
                        f"({out}); status: {self.status()}")
        return out["done"]


def test_rendered_chart_as_pods_survives_partition_and_pod_kill(tmp_path):
    why = missing_tools()
    if why:
        pytest.fail("the pod lab cannot run: " + "; ".join(why))
    docs = render(_lab_values())
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert by_kind(docs, "NetworkPolicy") and by_kind(docs, "Job"), "CURVE and the policies are the defaults"
    report, lab = [], None
    t0 = time.monotonic()

    def note(text):
        report.append(f"{time.monotonic() - t0:6.1f} s  {text}")

    try:
        objects, ops_key = _key_job(docs, tmp_path / "key-job")
        with Lab([*docs, STRANGER], tmp_path / "lab", NAMESPACE, deployment_replicas=1, objects=objects) as lab:
            agent = Agent(lab)
            try:
                c = Cluster(lab, agent, docs, ops_key)
                assert c.framing == "line"
                # Every replica pod's host in the rendered hosts.conf is a name of the lab's DNS;
                # the candidates without a pod (ordinals >= replicaCount) are not, as in a cluster.
                hosts = {i: r.host for i, r in parse_hosts(c.hosts_text).replicas.items()}
                assert {hosts[i] for i in c.replica_pod} <= lab.all_names()
                assert not {h for i, h in hosts.items() if i not in c.replica_pod} & lab.all_names()
                assert len(c.replica_pod) == 3 and len(hosts) == 7
                for pod in [*c.replica_pod.values(), *c.gateway_pods]:
                    lab.start_pod(pod)
                c.wait_ready([*c.replica_pod.values(), *c.gateway_pods])
                view, leader = c.leader()
                note(f"{len(c.replica_pod) + len(c.gateway_pods)} pods ready with the key Job's keys, "
                     f"leader replica {leader} (view {view})")
                check_policies(lab, c, note)
                # CURVE is on: from the node (which every policy admits), a status query without a
                # listed key gets no answer; with the operator's key (c.status above) it does.
                plain = agent.call("status", hosts=str(c.pods_hosts_path), timeout=0.5)["rows"]
                assert not any(r["reachable"] for r in plain), plain
                note("CURVE on: a status query without a listed key is refused by every replica")
                note("`smrd status` from the client namespace:\n" + c.smrd_status_cli())
                # `helm test`: the chart's own test pod, a PUT/GET round trip through the Service.
                (test_pod,) = c.test_pods
                codes = lab.run_to_completion(test_pod)
                assert set(codes.values()) == {0}, lab.log_tail(test_pod)
                note(f"`helm test` pod {test_pod}: {lab.log_text(test_pod, 'round-trip').splitlines()[-1]}")

                agent.call("load_start", host=c.gateway_service, port=c.gateway_port,
                           framing=c.framing, clients=CLIENTS, keys=KEYS)
                done = [c.progress(PHASE_OPS)]

                def phase(text):
                    done.append(c.progress(PHASE_OPS))
                    note(f"{text}; {done[-1] - done[-2]} ops completed since the previous step")

                note(f"workload: {CLIENTS} clients through Service {c.gateway_service}:{c.gateway_port}; "
                     f"{done[-1]} ops completed")

                # 1. The leader's pod loses the network; the other two elect a leader and go on.
                victim = c.replica_pod[leader]
                lab.partition(victim)
                phase(f"partitioned {victim} (the leader)")
                view2, leader2 = c.leader(among=set(c.replica_pod) - {leader})
                assert leader2 != leader and view2 > view
                assert c.status()[leader] is None, "the partitioned replica still answers"
                note(f"replica {leader2} leads view {view2}; {victim} unreachable")
                lab.heal(victim)
                c.wait_ready([victim])
                c.wait_caught_up(leader)
                phase(f"healed {victim}: ready and caught up")

                # 2. The current leader's pod dies (both containers, SIGKILL) and is started again
                #    from the same manifest on its kept volume: it replays its log and catches up.
                _, leader3 = c.leader()
                victim = c.replica_pod[leader3]
                lab.kill_pod(victim)
                phase(f"killed pod {victim} (the leader, smrd and app)")
                _, leader4 = c.leader(among=set(c.replica_pod) - {leader3})
                assert leader4 != leader3
                lab.start_pod(victim)
                c.wait_ready([victim])
                c.wait_caught_up(leader3)
                second = lab.log_text(victim, "smrd").split("--- start 2:")[-1]
                replay = re.search(r"replaying (\d+) decided instances", second)
                assert replay and int(replay.group(1)) > 0, "the restarted replica did not replay its kept log"
                phase(f"replica {leader4} led meanwhile; restarted {victim} from the manifest on its "
                      f"kept volume: replayed {replay.group(1)} instances, ready, caught up")

                # 3. The gateway pod dies mid-request and comes back behind the same Service:
                #    requests in flight get no answer (they stay open in the history).
                (gateway,) = c.gateway_pods
                lab.kill_pod(gateway)
                lab.start_pod(gateway)
                c.wait_ready([gateway])
                phase(f"killed and restarted the gateway pod {gateway}")

                result = agent.call("load_finish", 120, host=c.gateway_service,
                                    port=c.gateway_port, framing=c.framing)
                note(f"workload stopped: {result['done']} ops acknowledged; {result['errors']} "
                     "client-side errors (no answer: kept open; never sent: dropped)")

                # Every key was read back through the Service as the last entries of the history:
                # a lost acknowledged write would make it non-linearizable.
                records = result["records"]
                check = check_operations(records)
                assert check.ok, str(check)
                unanswered = sum(1 for r in records if r["complete"] is None)
                note(f"linearizability: {len(records)} ops ({unanswered} unanswered, "
                     f"{len(KEYS)} final reads), 0 violations")
                assert result["done"] >= 6 * PHASE_OPS

                # The replicas' apps hold the same state (each read inside its pod, on 127.0.0.1).
                c.wait_converged()
                app_port = sts["spec"]["template"]["spec"]["containers"][1]["ports"][0]["containerPort"]
                scans = []
                for pod in c.replica_pod.values():
                    out = lab.exec_in_pod(pod, ["smrd", "kv", "--port", str(app_port), "--framing",
                                                c.framing, "SCAN"])
                    assert out.returncode == 0, out.stderr
                    scans.append(out.stdout)
                assert scans[0] == scans[1] == scans[2], "the replicas' apps diverged"
                note("replicas converged; their apps hold equal state")
                note("`smrd status` at the end:\n" + c.smrd_status_cli())
            except BaseException:
                for pod in lab.pods:
                    print(lab.log_tail(pod), file=sys.stderr)
                raise
            finally:
                agent.close()
    except LabError as e:
        pytest.fail(f"pod lab: {e}")
    finally:
        print("\n".join(["pod lab:", *report, *(["lab events:", *lab.events] if lab else [])]))


def _api_certificate(directory: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for the stand-in API server's address (the openssl command)."""
    cert, key = directory / "kube-api.crt", directory / "kube-api.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=kubernetes", "-addext", f"subjectAltName=IP:{ip}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_rendered_chart_scales_3_to_5_to_3_under_load(tmp_path):
    """`helm upgrade --set replicaCount=5`, then back to 3, as the StatefulSet controller and the
    kubelet would carry it out, under client load: pods 3 and 4 start (as rendered: the same pod
    template and hosts.conf as with 3) and join by themselves as learners, catch up and are
    promoted; then they are deleted, and their preStop hook (the rendered `smrd admin leave --self
    --if-scaled-down`, asking a stand-in Kubernetes API for the StatefulSet's replicas) takes each
    out of the membership before it stops. A plain restart's hook changes nothing. The history
    must be linearizable and the remaining replicas' apps equal."""
    why = missing_tools()
    if why:
        pytest.fail("the pod lab cannot run: " + "; ".join(why))
    if not shutil.which("openssl") or not shutil.which("unshare"):
        pytest.fail("the scaling scenario needs the openssl and unshare commands (apt-get install -y openssl util-linux)")
    values = _lab_values()
    docs3, docs5 = render(values), render({**values, "replicaCount": 5})
    # The upgrade restarts no pod: hosts.conf and the pod template do not depend on replicaCount.
    assert hosts_configmap(docs3) == hosts_configmap(docs5)
    assert one(docs3, "StatefulSet")["spec"]["template"] == one(docs5, "StatefulSet")["spec"]["template"]
    sts = one(docs5, "StatefulSet")
    report, lab, api = [], None, None
    t0 = time.monotonic()

    def note(text):
        report.append(f"{time.monotonic() - t0:6.1f} s  {text}")

    work = tmp_path / "lab"
    work.mkdir()
    client_ip = "10.213.0.2"  # the lab's client namespace, where the stand-in API server runs
    cert, key = _api_certificate(work, client_ip)
    replicas_file = work / "statefulset-replicas"
    replicas_file.write_text("3")
    kube_api = {"host": client_ip, "port": 6443, "token": "lab-token", "ca": cert.read_text()}
    try:
        # The lab holds the namespaces of all 5 pods (as rendered with replicaCount 5); pods 3 and
        # 4 do not run until the scale-up.
        objects, ops_key = _key_job(docs5, tmp_path / "key-job")
        with Lab(docs5, work, NAMESPACE, deployment_replicas=1, kube_api=kube_api, objects=objects) as lab:
            assert lab.client_ip == client_ip
            api = lab.client_process(
                [sys.executable, str(KUBE_API), "--listen", f"{client_ip}:6443", "--cert", str(cert),
                 "--key", str(key), "--token", kube_api["token"], "--namespace", NAMESPACE,
                 "--statefulset", sts["metadata"]["name"], "--replicas-file", str(replicas_file)],
                stdout=subprocess.PIPE, stderr=open(work / "kube-api.log", "wb"), text=True)
            assert api.stdout.readline().startswith("listening"), "the stand-in API server did not start"
            agent = Agent(lab)
            try:
                c = Cluster(lab, agent, docs5, ops_key)
                pods = c.replica_pod
                assert len(pods) == 5
                c.set_active({0, 1, 2})
                for i in (0, 1, 2):
                    lab.start_pod(pods[i])
                lab.start_pod(c.gateway_pods[0])
                c.wait_ready([pods[0], pods[1], pods[2], *c.gateway_pods])
                view, leader = c.leader()
                note(f"replicaCount 3: pods 0-2 ready, leader replica {leader}")

                def membership():
                    return agreed_membership([r for r in c.status().values() if r])

                agent.call("load_start", host=c.gateway_service, port=c.gateway_port,
                           framing=c.framing, clients=CLIENTS, keys=KEYS)
                done = [c.progress(PHASE_OPS)]

                def phase(text):
                    done.append(c.progress(PHASE_OPS))
                    note(f"{text}; {done[-1] - done[-2]} ops completed since the previous step")

                assert membership()["voters"] == [0, 1, 2]
                note(f"workload: {CLIENTS} clients through the gateway Service; {done[-1]} ops; "
                     f"membership {membership()}")

                # A restart is not a scale-down: the hook of pod 2 finds replicas 3 > 2 and stays.
                out = lab.run_hook(pods[2], "smrd", timeout=30)
                assert out.returncode == 0, out.stdout + out.stderr
                assert "stays: its StatefulSet was not scaled down" in out.stderr
                assert membership()["voters"] == [0, 1, 2]
                note("preStop hook of pod 2 with replicas=3 (a restart): stays, membership unchanged")

                # Scale up: the controller creates pods 3 and 4 at once (Parallel); each joins.
                replicas_file.write_text("5")
                lab.start_pod(pods[3])
                lab.start_pod(pods[4])
                c.set_active({0, 1, 2, 3, 4})
                seen = []

                def five_voters():
                    m = membership()
                    if m and (not seen or seen[-1] != (m["voters"], m["learners"])):
                        seen.append((m["voters"], m["learners"]))
                    return m if m and m["voters"] == [0, 1, 2, 3, 4] and not m["learners"] else None
                m = c.wait("pods 3 and 4 joining and being promoted", five_voters, 120)
                c.wait_ready([pods[3], pods[4]])
                c.wait_caught_up(3)
                c.wait_caught_up(4)
                note(f"scaled up: memberships seen {seen}; now {m}")
                phase("5 voters")
                for i in (3, 4):
                    log = lab.log_text(pods[i], "smrd")
                    assert "learner" in log, f"replica {i} never was a learner:\n{log[-2000:]}"

                # Scale down: the controller deletes pods 4 and 3 at once; each preStop hook
                # leaves (the StatefulSet now wants 3), then the pod stops.
                replicas_file.write_text("3")
                results = {}
                threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, lab.delete_pod(pods[i])))
                           for i in (4, 3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                for i in (3, 4):
                    hook = results[i]["smrd"]
                    assert hook.returncode == 0, f"preStop of pod {i}: {hook.stdout}{hook.stderr}"
                    assert "scaled down below it: leaving the membership" in hook.stderr
                c.set_active({0, 1, 2})
                m = membership()
                assert m["voters"] == [0, 1, 2] and not m["learners"], m
                note(f"scaled down: pods 4 and 3 left in their preStop hooks and stopped; {m}")
                phase("back to 3 voters")

                # Scale up to 4 again: pod 3 starts on its kept PVC, replays its old log (a prefix
                # of the same history, ending with its own removal) and rejoins as a learner.
                replicas_file.write_text("4")
                lab.start_pod(pods[3])
                c.set_active({0, 1, 2, 3})
                m = c.wait("pod 3 rejoining on its kept volume",
                           lambda: (lambda m: m if m and m["voters"] == [0, 1, 2, 3] else None)(membership()), 120)
                c.wait_ready([pods[3]])
                second = lab.log_text(pods[3], "smrd").split("--- start 2:")[-1]
                replay = re.search(r"replaying (\d+) decided instances", second)
                assert replay and int(replay.group(1)) > 0, "pod 3 did not replay its kept log"
                note(f"scaled up to 4: pod 3 replayed {replay.group(1)} instances from its kept PVC "
                     f"and rejoined; {m}")
                phase("4 voters")
                replicas_file.write_text("3")
                hook = lab.delete_pod(pods[3])["smrd"]
                assert hook.returncode == 0 and "leaving the membership" in hook.stderr, hook.stderr
                c.set_active({0, 1, 2})
                m = membership()
                # A replica removed by its own preStop must not ask to join again in the moments
                # before it stops (auto_join is for a pod that starts outside the membership).
                assert m["voters"] == [0, 1, 2] and not m["learners"], m
                phase("pod 3 left again: 3 voters")

                result = agent.call("load_finish", 120, host=c.gateway_service,
                                    port=c.gateway_port, framing=c.framing)
                note(f"workload stopped: {result['done']} ops acknowledged; {result['errors']} "
                     "client-side errors (no answer: kept open; never sent: dropped)")
                records = result["records"]
                check = check_operations(records)
                assert check.ok, str(check)
                note(f"linearizability: {len(records)} ops, 0 violations")
                c.wait_converged()
                app_port = sts["spec"]["template"]["spec"]["containers"][1]["ports"][0]["containerPort"]
                scans = []
                for i in (0, 1, 2):
                    out = lab.exec_in_pod(pods[i], ["smrd", "kv", "--port", str(app_port), "--framing",
                                                    c.framing, "SCAN"])
                    assert out.returncode == 0, out.stderr
                    scans.append(out.stdout)
                assert scans[0] == scans[1] == scans[2], "the replicas' apps diverged"
                note("replicas 0-2 converged; their apps hold equal state")
                # Every hook asked the stand-in API (none answered "not in Kubernetes").
                gets = (work / "kube-api.log").read_text().count(
                    f'"GET /apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{sts["metadata"]["name"]} HTTP/1.1" 200')
                assert gets == 4, (work / "kube-api.log").read_text()
                note("`smrd admin members` at the end:\n" + c.admin_members())
                m = membership()
                assert m["voters"] == [0, 1, 2] and not m["learners"], m
            except BaseException:
                for pod in lab.pods:
                    print(lab.log_tail(pod, 30), file=sys.stderr)
                raise
            finally:
                agent.close()
                if api is not None:
                    api.kill()
                    api.wait()
    except LabError as e:
        pytest.fail(f"pod lab: {e}")
    finally:
        print("\n".join(["pod lab:", *report, *(["lab events:", *lab.events] if lab else [])]))


# --- one container of a replica pod dies; the lab's kubelet restarts it -----------------------

HEAL_BOUND_S = 30  # from the kill until the victim executes everything decided again


class _LoadedRelease:
    """The rendered chart's replica pods and one gateway pod, ready, under the client workload
    (as in the first test); what a container-restart test shares: the report, progress phases,
    the victim's status, and the checks at the end."""

    def __init__(self, lab: Lab, agent: Agent, docs, note, ops_key=None):
        self.lab, self.agent, self.note = lab, agent, note
        self.sts, self.docs = one(docs, "StatefulSet"), docs
        self.c = c = Cluster(lab, agent, docs, ops_key)
        for pod in [*c.replica_pod.values(), *c.gateway_pods]:
            lab.start_pod(pod)
        c.wait_ready([*c.replica_pod.values(), *c.gateway_pods])
        self.view, self.leader = c.leader()
        agent.call("load_start", host=c.gateway_service, port=c.gateway_port,
                   framing=c.framing, clients=CLIENTS, keys=KEYS)
        self.done = [c.progress(PHASE_OPS)]
        note(f"{len(c.replica_pod)} replica pods and the gateway ready, leader replica {self.leader} "
             f"(view {self.view}); {CLIENTS} clients through the Service: {self.done[-1]} ops")

    def phase(self, text):
        self.done.append(self.c.progress(PHASE_OPS))
        self.note(f"{text}; {self.done[-1] - self.done[-2]} ops completed since the previous step")

    def wait_log(self, pod, since: int, pattern: str, timeout=HEAL_BOUND_S, container="smrd"):
        """The first match of `pattern` in the pod's container log after offset `since` (the log
        is a file another process writes: polled)."""
        return self.c.wait(f"{pattern!r} in the log of {pod}/{container}",
                           lambda: re.search(pattern, self.lab.log_text(pod, container)[since:]), timeout)

    def wait_executing(self, rid, deadline: float):
        """Replica rid executes again: execution "executing", can_execute, not halted, and it has
        executed everything it knows decided (executed == commit), up to at least what the
        others had decided when the wait began. Returns its status row."""
        target = max((r["commit"] for r in self.c.status().values() if r), default=0)

        def executing():
            me = self.c.status().get(rid)
            return me if (me and me["status"] == "normal" and me["execution"] == "executing"
                          and me["can_execute"] is True and me["halted"] is None
                          and me["executed"] == me["commit"] >= target) else None
        return self.c.wait(f"replica {rid} executing again (up to instance {target})", executing,
                           max(deadline - time.monotonic(), 1))

    def finish(self):
        """The workload stops; the history must be linearizable, the replicas converged and their
        apps equal (each read inside its pod, on 127.0.0.1)."""
        c, lab = self.c, self.lab
        result = self.agent.call("load_finish", 120, host=c.gateway_service, port=c.gateway_port,
                                 framing=c.framing)
        records = result["records"]
        check = check_operations(records)
        assert check.ok, str(check)
        unanswered = sum(1 for r in records if r["complete"] is None)
        self.note(f"workload stopped: {result['done']} ops acknowledged, {result['errors']} client-side "
                  f"errors; linearizability: {len(records)} ops ({unanswered} unanswered, {len(KEYS)} "
                  "final reads), 0 violations")
        c.wait_converged()
        app_port = self.sts["spec"]["template"]["spec"]["containers"][1]["ports"][0]["containerPort"]
        scans = []
        for pod in c.replica_pod.values():
            out = lab.exec_in_pod(pod, ["smrd", "kv", "--port", str(app_port), "--framing", c.framing, "SCAN"])
            assert out.returncode == 0, out.stderr
            scans.append(out.stdout)
        assert scans[0] == scans[1] == scans[2], "the replicas' apps diverged"
        self.note("replicas converged; their apps hold equal state")


def _with_loaded_release(tmp_path, scenario):
    """Runs scenario(release) in a lab of the rendered chart under load; the report and the lab's
    events are printed in any case, the pods' logs on failure."""
    why = missing_tools()
    if why:
        pytest.fail("the pod lab cannot run: " + "; ".join(why))
    docs = render(_lab_values())  # the chart's configuration as is: 3 replicas, no hooks
    report, lab = [], None
    t0 = time.monotonic()

    def note(text):
        report.append(f"{time.monotonic() - t0:6.1f} s  {text}")

    try:
        objects, ops_key = _key_job(docs, tmp_path / "key-job")
        with Lab(docs, tmp_path / "lab", NAMESPACE, deployment_replicas=1, objects=objects) as lab:
            agent = Agent(lab)
            try:
                scenario(_LoadedRelease(lab, agent, docs, note, ops_key))
            except BaseException:
                for pod in lab.pods:
                    print(lab.log_tail(pod, 30), file=sys.stderr)
                raise
            finally:
                agent.close()
    except LabError as e:
        pytest.fail(f"pod lab: {e}")
    finally:
        print("\n".join(["pod lab:", *report, *(["lab events:", *lab.events] if lab else [])]))


def test_smrd_container_restart_resets_the_app_it_left_running(tmp_path):
    """The smrd container of a replica pod is SIGKILLed (an OOMKill, say); its app container keeps
    running with the state the old smrd fed it. The lab's kubelet starts smrd again; without
    snapshot hooks (the chart's default) smrd must not replay its log into that app (every
    request would run twice): it ends the app's process (`event=app_reset ...
    action=end_process`), the kubelet starts the app container again, empty, and smrd replays its
    log into it (`event=app_rebuilt`).

    Quorum: the victim is the leader's pod, partitioned first as in the first test; its smrd is
    killed while it is cut off, and the whole restart (smrd, the app's reset, the app's restart,
    the replay of its kept log) runs inside the partition. The other two replicas stay connected
    and executing all along (2 of 3: the quorum, and the replies), so clients progress. Killing a
    container of a third pod meanwhile would leave one replica: no quorum."""
    def scenario(r: _LoadedRelease):
        lab, c = r.lab, r.c
        rid = r.leader
        victim = c.replica_pod[rid]
        pod = lab.pod(victim)
        assert pod.restarts == {"smrd": 0, "app": 0}
        lab.partition(victim)
        r.phase(f"partitioned {victim} (the leader)")
        view2, leader2 = c.leader(among=set(c.replica_pod) - {rid})
        assert leader2 != rid and view2 > r.view
        r.note(f"replica {leader2} leads view {view2}; {victim} cut off")

        app_pid = pod.procs["app"].pid
        since = len(lab.log_text(victim, "smrd"))
        killed = time.monotonic()
        smrd_before = lab.kill_container(victim, "smrd")
        assert pod.alive["app"], "killing the smrd container touched the app container"
        new_smrd = lab.wait_restart(victim, "smrd", smrd_before)
        r.note(f"SIGKILLed the smrd container of {victim}; the kubelet restarted it (pid {new_smrd.pid})")
        # The new smrd ends the app it finds (SIGKILL: the kubelet sees a kill, not a crash) and
        # the kubelet starts the app container again.
        new_app = lab.wait_restart(victim, "app", 0)
        reset = r.wait_log(victim, since, r"event=app_reset reason=.*action=end_process pid=(\d+)")
        assert int(reset.group(1)) == app_pid, f"smrd ended pid {reset.group(1)}, the app was {app_pid}"
        assert pod.exits["app"] == [-signal.SIGKILL]
        # The replay is of the victim's own kept log: it needs no peer.
        rebuilt = r.wait_log(victim, since, r"event=app_rebuilt executed=(\d+)")
        r.note(f"the new smrd ended the app it found (pid {app_pid}: action=end_process); the kubelet "
               f"restarted the app container (pid {new_app.pid}); smrd replayed its log into it "
               f"({rebuilt.group(1)} instances), all inside the partition")
        r.phase(f"{victim} restarted inside its partition")

        lab.heal(victim)
        me = r.wait_executing(rid, killed + HEAL_BOUND_S)
        took = time.monotonic() - killed
        log = lab.log_text(victim, "smrd")[since:]
        assert log.index("action=end_process") < log.index("event=app_rebuilt")
        assert log.count("action=end_process") == 1 and pod.alive["app"]
        assert "event=app_restart_detected" not in log, "smrd took the app it fed for a new one"
        assert pod.restarts == {"smrd": 1, "app": 1}, pod.restarts
        assert pod.exits == {"smrd": [-signal.SIGKILL], "app": [-signal.SIGKILL]}, pod.exits
        r.note(f"healed {victim}: executing again {took:.1f} s after the kill (executed = commit = "
               f"{me['executed']})")
        r.phase(f"{victim} back")
        r.finish()

    _with_loaded_release(tmp_path, scenario)


def test_app_container_restart_is_rebuilt_from_the_log(tmp_path):
    """The app container of a replica pod is SIGKILLed under load (smrd's requests to it in
    flight); smrd is not touched. The lab's kubelet starts the app container again, empty: smrd
    sees another socket listening on the app port (`event=app_restart_detected`) and replays its
    log into the new app (`event=app_rebuilt`); it never ends the new app. (When the broken
    connection reaches smrd before the dying app's listening socket is gone, smrd takes it for a
    failure mid-request of the same process and ends that process, `action=end_process` with the
    killed app's pid, then replays into the app the kubelet starts: the same outcome.)

    Quorum: the victim is a follower, executing the workload when its app is killed; its pod is
    partitioned right after the kill, so the app's restart and the replay run while it is cut
    off. The leader and the third replica stay connected and executing (2 of 3) all along, so
    clients progress. Partitioning another pod instead would leave a single replica connected
    and executing while the victim rebuilds."""
    def scenario(r: _LoadedRelease):
        lab, c = r.lab, r.c
        rid = min(set(c.replica_pod) - {r.leader})
        victim = c.replica_pod[rid]
        pod = lab.pod(victim)
        c.wait_caught_up(rid)  # it executes the workload's requests as they come
        since = len(lab.log_text(victim, "smrd"))
        smrd_pid, app_pid = pod.procs["smrd"].pid, pod.procs["app"].pid
        killed = time.monotonic()
        before = lab.kill_container(victim, "app")
        lab.partition(victim)
        assert pod.alive["smrd"] and pod.procs["smrd"].pid == smrd_pid
        new_app = lab.wait_restart(victim, "app", before)
        r.note(f"SIGKILLed the app container of {victim} (a follower) under load, then partitioned "
               f"the pod; the kubelet restarted the app (pid {new_app.pid})")
        r.phase(f"{victim}'s app restarting inside its partition")

        lab.heal(victim)
        me = r.wait_executing(rid, killed + HEAL_BOUND_S)
        took = time.monotonic() - killed
        log = lab.log_text(victim, "smrd")[since:]
        detected = re.search(r"event=app_restart_detected .*action=replay", log)
        ended = re.search(r"event=app_reset .*action=end_process pid=(\d+)", log)
        rebuilt = re.search(r"event=app_rebuilt executed=(\d+)", log)
        assert detected or ended, "smrd neither saw the new app nor reset the old one"
        seen = min((m for m in (detected, ended) if m), key=lambda m: m.start())
        assert rebuilt and seen.start() < rebuilt.start(), "smrd did not rebuild the new app"
        # Whatever smrd ended was the killed app (already dying), never the new one: the kubelet
        # restarted the app once, and that process still runs.
        ends = re.findall(r"action=end_process pid=(\d+)", log)
        assert set(ends) <= {str(app_pid)}, f"smrd ended pid {ends}; the killed app was {app_pid}"
        assert pod.restarts == {"smrd": 0, "app": 1}, pod.restarts
        assert pod.exits == {"smrd": [], "app": [-signal.SIGKILL]}, pod.exits
        assert pod.procs["app"].pid == new_app.pid and pod.alive["app"]
        assert pod.procs["smrd"].pid == smrd_pid
        how = ("app_restart_detected" if seen is detected else
               f"app_reset action=end_process of the dying app (pid {app_pid})")
        r.note(f"healed {victim}: executing again {took:.1f} s after the kill (executed = commit = "
               f"{me['executed']}); smrd logged {how}, then app_rebuilt: the replay covered "
               f"{rebuilt.group(1)} instances")
        r.phase(f"{victim} back")
        r.finish()

    _with_loaded_release(tmp_path, scenario)


def test_the_lab_kubelet_restarts_containers_and_keeps_their_volumes(tmp_path):
    """The lab's model of the kubelet's restarts (lab.py, CONTAINER RESTARTS), on a pod of its
    own: a killed container starts again with the same command and the pod's emptyDir as it was;
    an exit the test did not cause is a crash, reported, and restarted with a doubled back-off;
    a killed pod restarts nothing, and nothing outlives the lab."""
    why = missing_tools()
    if why:
        pytest.fail("the pod lab cannot run: " + "; ".join(why))
    scratch = {"name": "scratch", "mountPath": "/scratch"}
    docs = [{"kind": "Pod", "metadata": {"name": "kubelet-model"}, "spec": {
        "containers": [
            # $$ is how a manifest writes $ (the kubelet expands $(VAR) and $$).
            {"name": "main", "command": ["/bin/sh", "-c", "echo $$$$ >> /scratch/starts; exec sleep 600"],
             "volumeMounts": [scratch]},
            {"name": "crashy", "command": ["/bin/sh", "-c", "test -e /scratch/crash && exit 3; exec sleep 600"],
             "volumeMounts": [scratch]}],
        "volumes": [{"name": "scratch", "emptyDir": {}}]}}]
    with Lab(docs, tmp_path / "lab", NAMESPACE) as lab:
        lab.start_pod("kubelet-model")
        pod = lab.pod("kubelet-model")
        starts = tmp_path / "lab" / "pods" / "kubelet-model" / "volumes" / "scratch" / "starts"

        def started(n):  # the pids the container's processes wrote (a file: polled)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pids = starts.read_text().split() if starts.exists() else []
                if len(pids) >= n:
                    return pids
                time.sleep(POLL)
            pytest.fail(f"{starts} did not get {n} lines")

        first = pod.procs["main"].pid
        assert started(1) == [str(first)]
        before = lab.kill_container("kubelet-model", "main")            # an OOMKill
        again = lab.wait_restart("kubelet-model", "main", before, timeout=30)
        # The same emptyDir, kept: the first start's line is still there.
        assert started(2) == [str(first), str(again.pid)]
        assert pod.alive["crashy"] and pod.restarts == {"main": 1, "crashy": 0}
        before = lab.kill_container("kubelet-model", "main", signal.SIGTERM)  # a liveness probe
        lab.wait_restart("kubelet-model", "main", before, timeout=30)
        assert pod.exits["main"] == [-signal.SIGKILL, -signal.SIGTERM]
        lab.check_running()  # the test's kills are no crash

        (starts.parent / "crash").write_text("")
        before = lab.kill_container("kubelet-model", "crashy")
        # From now on it exits with 3 after each start (a crash loop): the kubelet's part goes on.
        assert lab.wait_kubelet(lambda: len(pod.exits["crashy"]) >= 3, 30), pod.exits
        assert pod.exits["crashy"][:3] == [-signal.SIGKILL, 3, 3]
        with pytest.raises(LabError, match="kubelet-model/crashy exited with 3"):
            lab.check_running()
        delays = [e.split("restarts it in ")[1] for e in lab.events if "crashy exited" in e]
        assert delays[:3] == ["0.2 s", "0.4 s", "0.8 s"], lab.events

        lab.kill_pod("kubelet-model")
        assert not any(pod.alive.values())
        assert not any(t.is_alive() for t in pod.supervisors)
        restarts = dict(pod.restarts)
    assert pod.restarts == restarts and not lab_namespaces()


# --- the lab's own mapping, without namespaces (no root needed) -----------------------------

def test_missing_tools_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    why = " ".join(missing_tools())
    assert "`ip` is not installed" in why and "`iptables` is not installed" in why
    assert "make install-test" in why


def test_paths_are_mapped_where_a_path_starts():
    mounts = {"/etc/smrd": Path("/lab/hosts"), "/tmp": Path("/tmp/lab/tmp"), "/var/lib/smrd": Path("/lab/pvc")}
    assert map_paths("smrd -c /etc/smrd/hosts.conf", mounts) == "smrd -c /lab/hosts/hosts.conf"
    assert map_paths("/var/lib/smrd", mounts) == "/lab/pvc"
    assert map_paths("/tmp/x", mounts) == "/tmp/lab/tmp/x"       # mapped once, not again
    for untouched in ("/etc/smrd-curve/key", "/var/lib/smrdx", "x/etc/smrd", "/tmpfoo"):
        assert map_paths(untouched, mounts) == untouched
    assert expand_vars("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_the_replica_container_runs_the_rendered_command(tmp_path):
    """What the lab runs for demo-smrd-1: the rendered command with only the mount paths
    mapped, and an environment smrd accepts as replica 1 with its data on the claim."""
    docs = render(_lab_values())
    lab = Lab(docs, tmp_path, NAMESPACE, objects=_key_job(docs, tmp_path / "key-job")[0])
    pod = lab.pod("demo-smrd-1")
    smrd_c = pod.spec["containers"][0]
    argv, env = lab.container_argv(pod, smrd_c)
    hosts_dir = tmp_path / "pods" / "demo-smrd-1" / "volumes" / "hosts"
    rendered = [*smrd_c["command"], *smrd_c["args"]]
    assert argv == [a.replace("/etc/smrd/", f"{hosts_dir}/") for a in rendered]
    assert (hosts_dir / "hosts.conf").read_text() == hosts_configmap(docs)["data"]["hosts.conf"]
    assert env["POD_NAME"] == "demo-smrd-1"
    assert env["SMRD_DATA_DIR"] == str(tmp_path / "pvc" / "data-demo-smrd-1")
    # enableServiceLinks: false in the chart: no Service variables (smrd refuses unknown SMRD_*).
    assert not any(k.endswith("_SERVICE_HOST") for k in env), sorted(env)
    cfg = load_config({"role": "server", "hosts": str(hosts_dir / "hosts.conf"), "id": 1}, env)
    assert cfg.settings.id == 1 and cfg.settings.framing == "line"
    names = lab.hosts_file(pod)
    assert "demo-smrd-0.demo-smrd-headless.smrd-test.svc.cluster.local" in names
    assert "demo-smrd-gateway.smrd-test.svc.cluster.local" in names


def test_the_prestop_hook_runs_as_rendered(tmp_path):
    """What the lab runs for demo-smrd-2's preStop hook: the rendered exec command (mount paths
    mapped, no $(VAR) expansion), in a private mount namespace where the projected
    service-account volume sits at its real path, with the container's env and the API address."""
    docs = render(_lab_values())
    api = {"host": "10.213.0.2", "port": 6443, "token": "lab-token", "ca": "CA PEM"}
    objects = _key_job(docs, tmp_path / "key-job")[0]
    lab = Lab(docs, tmp_path, NAMESPACE, kube_api=api, objects=objects)
    pod = lab.pod("demo-smrd-2")
    smrd_c = pod.spec["containers"][0]
    lab.container_argv(pod, smrd_c)  # makes the pod's volumes, as start_pod does
    argv, env = lab.hook_argv("demo-smrd-2", "smrd")
    volumes = tmp_path / "pods" / "demo-smrd-2" / "volumes"
    rendered = smrd_c["lifecycle"]["preStop"]["exec"]["command"]
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    script = rendered[2].replace("/etc/smrd/", f"{volumes / 'hosts'}/").replace(
        "/etc/smrd-curve/key/", f"{volumes / 'curve-key'}/")
    assert argv[-3:] == [*rendered[:2], script]
    # The secret volume as the kubelet mounts it: the Job's keys behind `..data`, mode 0440.
    key = volumes / "curve-key" / "replica-2.key"
    assert key.is_symlink() and os.readlink(key) == "..data/replica-2.key"
    assert (key.stat().st_mode & 0o777) == 0o440 and len(key.read_text().strip()) == 40
    assert f"mount --bind {volumes / 'kube-api'} /var/run/secrets/kubernetes.io/serviceaccount" in argv[6]
    assert (volumes / "kube-api" / "token").read_text() == "lab-token"
    assert (volumes / "kube-api" / "ca.crt").read_text() == "CA PEM"
    assert (volumes / "kube-api" / "namespace").read_text() == NAMESPACE
    assert env["KUBERNETES_SERVICE_HOST"] == "10.213.0.2" and env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert env["SMRD_STATEFULSET"] == "demo-smrd" and env["POD_NAME"] == "demo-smrd-2"
    # Without a stand-in API server: no token, so smrd.ops.kube answers "not in Kubernetes".
    plain = Lab(docs, tmp_path / "plain", NAMESPACE, objects=objects)
    plain.container_argv(plain.pod("demo-smrd-2"), smrd_c)
    assert not (tmp_path / "plain" / "pods" / "demo-smrd-2" / "volumes" / "kube-api" / "token").exists()


# --- a replica's CURVE key rotated under load (docs/security.md) -----------------------------

def test_replica_key_rotation_under_load(tmp_path):
    """docs/security.md, "Rotating keys in a running release", for a follower's key, on the
    release as rendered (CURVE keys from the key Job, NetworkPolicies enforced), under the client
    workload: (1) the key leaves the Secret and the pod is deleted: the StatefulSet's new pod
    fails its start check (no key) and crash-loops, one replica down; (2) the allow-list gets the
    new public key, and every other replica and the gateway re-read it (their log says so);
    (3) the new secret key goes into the Secret and the pod is deleted again: it starts with the
    new key and catches up. No client error, no view change: every replica ends in the view it
    was in, with the same leader, and the clients' error count does not move."""
    def scenario(r: _LoadedRelease):
        lab, c = r.lab, r.c
        rid = next(i for i in sorted(c.replica_pod) if i != r.leader)
        victim = c.replica_pod[rid]
        others = [p for i, p in c.replica_pod.items() if i != rid] + c.gateway_pods
        secret = _volume(r.docs, "curve-key")["secret"]["secretName"]
        allow = _volume(r.docs, "curve-allow")["configMap"]["name"]
        name = f"replica-{rid}"
        before = {i: (row["view"], row["leader"]) for i, row in c.status().items()}
        assert all(before.values()) and len(set(before.values())) == 1, before
        errors = r.agent.call("load_wait", ops=0, timeout=1)["errors"]
        new_dir = tmp_path / "rotation"
        new_dir.mkdir()
        key_path, pub_path, new_pub = keygen(str(new_dir), name)
        old_pub = lab.object_data("configmaps", allow)[f"{name}.pub"].strip()
        assert new_pub.decode() != old_pub

        # 1. The key leaves the Secret; the pod is deleted and the new one cannot start.
        keys = lab.object_data("secrets", secret)
        lab.update_object("secrets", secret, {k: v for k, v in keys.items() if k != f"{name}.key"})
        # Its preStop hook (`smrd admin leave --if-scaled-down`, for a scale-down only) fails
        # too, for want of the key, before it asks anything: harmless for a deletion that is no
        # scale-down (Kubernetes records a FailedPreStopHook event and goes on).
        hook = lab.delete_pod(victim)["smrd"]
        assert hook.returncode != 0 and f"{name}.key" in hook.stderr, hook
        since = len(lab.log_text(victim, "smrd"))
        lab.expect_crashes(victim, "smrd")
        lab.start_pod(victim)
        pod = lab.pod(victim)
        assert lab.wait_kubelet(lambda: len(pod.exits["smrd"]) >= 1, 30), pod.exits
        assert pod.exits["smrd"][0] > 0, pod.exits
        assert re.search(rf"curve_secret_key.*{name}\.key", lab.log_text(victim, "smrd")[since:]), \
            lab.log_tail(victim)
        r.phase(f"{name}.key out of the Secret; {victim} deleted, its new pod crash-loops without a key")

        # 2. The allow-list names the new public key; everyone else re-reads it.
        offsets = {p: len(lab.log_text(p, c.smrd_container(p))) for p in others}
        lab.update_object("configmaps", allow, {**lab.object_data("configmaps", allow), f"{name}.pub": new_pub.decode() + "\n"})
        for p in others:
            r.wait_log(p, offsets[p], rf"allow-list .* re-read: .*changed: {name}\b", container=c.smrd_container(p))
        r.phase(f"allow-list: new {name}.pub, re-read by {', '.join(others)}")

        # 3. The new secret key goes into the Secret; the pod is deleted (no crash-loop back-off to
        #    wait for) and starts with it.
        lab.update_object("secrets", secret, {**lab.object_data("secrets", secret), f"{name}.key": Path(key_path).read_bytes()})
        lab.delete_pod(victim)
        crashes = lab.expected_crashes(victim, "smrd")
        assert crashes, "the pod without its key did not fail"
        lab.start_pod(victim)
        c.wait_ready([victim])
        c.wait_caught_up(rid)
        r.phase(f"{victim} restarted with the new key: ready and caught up "
                f"(it had crash-looped {len(crashes)} times without a key)")

        after = {i: (row["view"], row["leader"]) for i, row in c.status().items()}
        assert after == before, f"a view change during the rotation: before {before}, after {after}"
        assert r.agent.call("load_wait", ops=0, timeout=1)["errors"] == errors, "clients saw errors"
        r.note(f"rotated {name}: views and leader unchanged {after}; client errors unchanged ({errors})")
        r.finish()

    _with_loaded_release(tmp_path, scenario)
