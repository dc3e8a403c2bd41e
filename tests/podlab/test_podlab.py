"""The rendered Helm chart as pods (DESIGN.md §6 level 4; docs/kubernetes.md, "The pod lab").

helm/smrd is rendered with ci/values-3-replicas.yaml (3 replicas, the demo app, line framing);
its StatefulSet pods (smrd + app, two processes in one network namespace), one pod of the
gateway Deployment and a client namespace run on a private bridge (tests/podlab/lab.py). The
rendered command lines, environment and hosts.conf are used as they are; the peers find each
other through the headless-service names of hosts.conf and the clients reach the gateway
through its Service name. Under a concurrent client workload the test partitions the leader's
pod with iptables, heals it, SIGKILLs the next leader's pod (both containers) and starts it again
from the same manifest on its kept volume, and kills and restarts the gateway pod; the history
must be linearizable with every key read back at the end, and the replicas' apps must end equal.
The chart's `helm test` pod runs too, against the Service.
"""
from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helm_render import CHART, NAMESPACE, load_values, one, render
from smrd.config import load_config
from smrd.hosts import parse_hosts
from smrd.testing.linearizability import check_operations

from .lab import Lab, LabError, expand_vars, map_paths, missing_tools

pytestmark = [pytest.mark.podlab, pytest.mark.timeout(300)]

VALUES = CHART / "ci" / "values-3-replicas.yaml"
AGENT = Path(__file__).with_name("agent.py")
KEYS = [f"k{i}" for i in range(6)]
CLIENTS = 6
PHASE_OPS = 300  # operations that must complete in each phase (before, during and after faults)
POLL = 0.05  # between two polls of a status or readiness endpoint (there is no event to wait on)


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

    def __init__(self, lab: Lab, agent: Agent, docs):
        self.lab, self.agent = lab, agent
        self.hosts_text = one(docs, "ConfigMap")["data"]["hosts.conf"]
        self.hosts_path = lab.dir / "hosts.conf"      # for `smrd status`, run by the client
        self.hosts_path.write_text(self.hosts_text)
        hosts = parse_hosts(self.hosts_text)
        # replica id -> pod: the first label of the replica's host name in hosts.conf
        self.replica_pod = {i: r.host.split(".")[0] for i, r in hosts.replicas.items()}
        self.gateway_pods = lab.pods_of("Deployment", one(docs, "Deployment")["metadata"]["name"])
        self.test_pods = lab.pods_of("Pod", one(docs, "Pod")["metadata"]["name"])  # `helm test`
        svc = one(docs, "Service", "gateway")
        self.gateway_service, self.gateway_port = svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]
        self.framing = next(e["value"] for e in one(docs, "StatefulSet")["spec"]["template"]["spec"]
                            ["containers"][0]["env"] if e["name"] == "SMRD_FRAMING")

    def status(self):
        """{replica id: status row or None}, from smrd's own status query in the client namespace."""
        rows = self.agent.call("status", hosts=str(self.hosts_path), timeout=0.5)["rows"]
        return {r["id"]: (r if r["reachable"] else None) for r in rows}

    def smrd_status_cli(self):
        """`smrd status -c hosts.conf`, the operator's command, run in the client namespace."""
        proc = self.lab.client_process([sys.executable, "-m", "smrd", "status", "-c", str(self.hosts_path)],
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
        n = len(self.replica_pod)

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
    docs = render(load_values(VALUES))
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    report, lab = [], None
    t0 = time.monotonic()

    def note(text):
        report.append(f"{time.monotonic() - t0:6.1f} s  {text}")

    try:
        with Lab(docs, tmp_path / "lab", NAMESPACE, deployment_replicas=1) as lab:
            agent = Agent(lab)
            try:
                c = Cluster(lab, agent, docs)
                assert c.framing == "line"
                # Every host of the rendered hosts.conf is a name of the lab's DNS.
                assert {r.host for r in parse_hosts(c.hosts_text).replicas.values()} <= lab.all_names()
                for pod in [*c.replica_pod.values(), *c.gateway_pods]:
                    lab.start_pod(pod)
                c.wait_ready([*c.replica_pod.values(), *c.gateway_pods])
                view, leader = c.leader()
                note(f"{len(c.replica_pod) + len(c.gateway_pods)} pods ready, leader replica {leader} (view {view})")
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
    docs = render(load_values(VALUES))
    lab = Lab(docs, tmp_path, NAMESPACE)
    pod = lab.pod("demo-smrd-1")
    smrd_c = pod.spec["containers"][0]
    argv, env = lab.container_argv(pod, smrd_c)
    hosts_dir = tmp_path / "pods" / "demo-smrd-1" / "volumes" / "hosts"
    rendered = [*smrd_c["command"], *smrd_c["args"]]
    assert argv == [a.replace("/etc/smrd/", f"{hosts_dir}/") for a in rendered]
    assert (hosts_dir / "hosts.conf").read_text() == one(docs, "ConfigMap")["data"]["hosts.conf"]
    assert env["POD_NAME"] == "demo-smrd-1"
    assert env["SMRD_DATA_DIR"] == str(tmp_path / "pvc" / "data-demo-smrd-1")
    # enableServiceLinks: false in the chart: no Service variables (smrd refuses unknown SMRD_*).
    assert not any(k.endswith("_SERVICE_HOST") for k in env), sorted(env)
    cfg = load_config({"role": "server", "hosts": str(hosts_dir / "hosts.conf"), "id": 1}, env)
    assert cfg.settings.id == 1 and cfg.settings.framing == "line"
    names = lab.hosts_file(pod)
    assert "demo-smrd-0.demo-smrd-headless.smrd-test.svc.cluster.local" in names
    assert "demo-smrd-gateway.smrd-test.svc.cluster.local" in names
