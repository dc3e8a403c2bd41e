"""The pod lab: the RENDERED Helm chart run as "pods" on one machine, without a cluster
(docs/kubernetes.md, "The pod lab").

What stands for what:

- a pod is a network namespace `smrdlab-<pod name>` with its own address on LAB_SUBNET, joined by
  a veth pair to a bridge that lives in its own namespace (`smrdlab-net`); the root namespace's
  links and routes are never touched. Its containers are processes started with
  `ip netns exec`, so they share the pod's network exactly as a pod's containers do (smrd reaches
  its app on 127.0.0.1);
- cluster DNS is /etc/netns/<namespace>/hosts, which `ip netns exec` bind-mounts over /etc/hosts:
  every pod's headless-service name (FQDN and the shorter forms the search path would complete),
  the headless name itself (all pods), and every ClusterIP Service name;
- a ClusterIP Service is a virtual address plus a DNAT rule in every lab namespace (what
  kube-proxy's iptables mode does), to its selected pods' target port;
- the kubelet's part: the container's env (value, fieldRef metadata.name/namespace, status.podIP,
  and the Service-link variables `<SVC>_SERVICE_HOST`, `<SVC>_PORT`, ... unless the pod sets
  enableServiceLinks: false), `$(VAR)` expansion in command and args, and volumes. The command,
  args and env are used as rendered; only container paths are mapped (PATH MAPPING below);
- the image: a directory put first on PATH with `smrd` and `python` (this interpreter), plus
  IMAGE_ENV.

PATH MAPPING. The rendered command names container paths (`-c /etc/smrd/hosts.conf`,
SMRD_DATA_DIR=/var/lib/smrd). Each of the container's volumeMounts is mapped to a directory of
the lab, and every occurrence of a mount path at the start of a path in command, args and env
values is replaced by that directory:
  configMap volume    -> <lab>/pods/<pod>/volumes/<volume>/   (the ConfigMap's data, written at pod start)
  secret volume       -> <lab>/pods/<pod>/volumes/<volume>/   (the Secret's data, from Lab(objects=...),
                         e.g. what the chart's key Job stored; items and defaultMode as rendered)
  Both are laid out as the kubelet's AtomicWriter does (files in `..<timestamp>/`, `..data` a
  symlink to it, each name a symlink through `..data`); Lab.update_object changes an object and
  syncs it into every running pod's volume of it by one rename, as the kubelet's sync does.
  emptyDir volume     -> <lab>/pods/<pod>/volumes/<volume>/   (emptied at every pod start: a new pod)
  volumeClaimTemplate -> <lab>/pvc/<claim>-<pod>/            (kept across pod restarts, like a PVC)
  projected volume    -> <lab>/pods/<pod>/volumes/<volume>/   (its downwardAPI files; the token and
                         the CA only with a stand-in API server, Lab(kube_api=...))
Anything else (subPath, a container without a command) is refused with LabError.

NETWORK POLICIES. Each rendered NetworkPolicy (Ingress) becomes iptables rules in the namespaces
of the pods its podSelector selects (chain SMRDLAB-POLICY, jumped to from INPUT): per ingress
rule and port, ACCEPT from the addresses of the lab's pods its `from` peers select (podSelector
by labels; namespaceSelector against the lab's one namespace, labelled
kubernetes.io/metadata.name; ipBlock as a CIDR), or from anyone without `from`; then DROP.
Always accepted, as by Kubernetes: the pod's loopback, replies to its own connections
(conntrack), and the node, which the client namespace stands for (the kubelet's probes, and
the test's readiness and status polls). A pod no policy selects accepts everything.
Lab.partition inserts its DROP rules before these.
Pod deletion (delete_pod) is the kubelet's: SIGTERM to containers without a preStop hook, the
exec hooks of the others (in the running container's network, with its env; a projected volume is
bind-mounted at its real path in a private mount namespace, since smrd.ops.kube reads the standard
service-account path), then SIGTERM, then SIGKILL when terminationGracePeriodSeconds ends. With
kube_api, containers and hooks get KUBERNETES_SERVICE_HOST/PORT as from a kubelet.

CONTAINER RESTARTS (restartPolicy Always, the default; OnFailure; Never). Each container of a
running pod has a supervisor thread (the kubelet's container runtime): it starts the container,
blocks in wait() on it, and when the container's process exits while the pod runs (not deleted
by delete_pod, killed by kill_pod or stopped with the lab), starts it again after a back-off, with
the argv, env and directories of the pod's start: a container restart keeps every volume as it
is, emptyDir included (only a new pod, start_pod, gets fresh ones). The back-off is the
kubelet's rule scaled down for tests: 0.2 s doubling up to 3.2 s, back to 0.2 s once a container
has run 6.4 s (the kubelet: 10 s doubling up to 5 min, reset after 10 min). Pod.restarts counts
each container's restarts (restartCount), Lab.kill_container kills one container (an OOMKill, a
failed liveness probe) and Lab.wait_restart waits for the kubelet to start it again. An exit the
test did not cause and that is not a SIGKILL (which the lab, an OOMKill or smrd resetting its app
sends) is a crash: check_running reports it, even once the container runs again.
Not modelled: runAsUser/readOnlyRootFilesystem (processes run as the test's user), resource
limits, probes run by a kubelet (the test polls /readyz itself; a failed liveness probe is
kill_container), Service endpoints that follow readiness (the DNAT rules are fixed).

Cleanup: Lab is a context manager. Everything it makes is named `smrdlab-*` (namespaces,
/etc/netns entries) or lives under its work directory; on exit (also on failure) it stops the
restarts, kills every process it started and every process left in a lab namespace, deletes the
namespaces (their veths and the bridge go with them) and the /etc/netns entries. Containers run
under `setpriv --pdeathsig KILL`, started by their supervisor thread, which lives as long as the
container: if the test process dies (killed, or a timeout that ends it), its containers die with
it. On entry it removes the leftovers (namespaces, /etc/netns entries) of an earlier run that was
killed. One lab runs at a time (flock on LOCK_PATH).
"""
from __future__ import annotations

import base64
import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import smrd

PREFIX = "smrdlab-"
NET_NS = PREFIX + "net"          # holds the bridge
POLICY_CHAIN = "SMRDLAB-POLICY"  # a pod's NetworkPolicy rules, in its own namespace (INPUT jumps there)
CLIENT_NS = PREFIX + "client"    # outside clients (and the test's probes)
LAB_SUBNET = ipaddress.ip_network("10.213.0.0/24")
NETNS_ETC = Path("/etc/netns")
LOCK_PATH = Path("/run/lock/smrdlab.lock")
# Addresses: .2 the client namespace, .10+ pods (in start order), .200+ ClusterIP Services.
CLIENT_HOST, POD_HOST0, SERVICE_HOST0 = 2, 10, 200
# The "image": the smrd package the test itself imports (this checkout), found through
# PYTHONPATH whatever the working directory; SMRD_NO_EXTENSIONS (the pure-Python core) passes
# through from the test's environment.
SMRD_SOURCE = Path(smrd.__file__).resolve().parents[1]
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8", "PYTHONPATH": str(SMRD_SOURCE)}
PASS_THROUGH_ENV = ("SMRD_NO_EXTENSIONS",)
# The kubelet's restart back-off, scaled down (the kubelet: 10 s doubling up to 300 s, reset once a
# container has run 10 minutes): a test waits for a restart, not for a cluster's patience.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 3.2
BACKOFF_RESET_S = 2 * BACKOFF_MAX_S


class LabError(RuntimeError):
    pass


def _run(argv, check=True, timeout=30):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def missing_tools() -> list[str]:
    """Why the lab cannot run here: [] when it can."""
    why = []
    if os.geteuid() != 0:
        why.append("the pod lab needs root (network namespaces, iptables)")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            why.append(f"`{tool}` is not installed (Debian package {package}; "
                       "`make install-test` installs it via scripts/install-system-tools.sh)")
    if shutil.which("setpriv") is None:  # containers run under its parent-death signal
        why.append("`setpriv` is not installed (Debian package util-linux: apt-get install util-linux)")
    return why


def lab_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def remove_leftovers() -> list[str]:
    """Remove every smrdlab-* namespace (killing what still runs in it) and /etc/netns entry.
    Returns what was removed."""
    removed = []
    for ns in lab_namespaces():
        for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "delete", ns], check=False)
        removed.append(ns)
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.glob(PREFIX + "*"):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
        try:
            NETNS_ETC.rmdir()  # only when empty: someone else's entries stay
        except OSError:
            pass
    return removed


class _Lock:
    """An exclusive flock on LOCK_PATH, removed on release (re-checked after locking, so a
    waiter that locked a file another holder just removed tries again)."""

    def __init__(self, timeout=300.0):
        self.timeout = timeout
        self.fd = None

    def acquire(self):
        deadline = time.monotonic() + self.timeout
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise LabError(f"another pod lab holds {LOCK_PATH} for over {self.timeout:.0f} s")
                time.sleep(0.2)  # waiting for another test run's lab: no event to wait on
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(LOCK_PATH).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self):
        if self.fd is not None:
            try:
                LOCK_PATH.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


# --- manifests -> pods ---------------------------------------------------------------------

def write_atomic(path: Path, files: dict[str, tuple[bytes, int]]):
    """A configMap or secret volume as the kubelet's AtomicWriter lays it out and updates it:
    the files in a fresh `..<timestamp>` directory, `..data` a symlink to it (switched by one
    rename), and each top-level name a symlink through `..data`; names no longer there are
    removed, and so is the previous directory. A reader sees the old set or the new one."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stamp = Path(tempfile.mkdtemp(prefix=time.strftime("..%Y_%m_%d_%H_%M_%S."), dir=path))
    for rel, (data, mode) in files.items():
        f = stamp / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        f.chmod(mode)
    stamp.chmod(0o755)
    data_link = path / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp = path / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(stamp.name, tmp)
    os.replace(tmp, data_link)
    tops = {rel.split("/")[0] for rel in files}
    for top in tops:
        if not (path / top).is_symlink():
            os.symlink(f"..data/{top}", path / top)
    for entry in path.iterdir():
        if not entry.name.startswith(".") and entry.name not in tops:
            entry.unlink()
    if old and old != stamp.name:
        shutil.rmtree(path / old, ignore_errors=True)


def _labels_match(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


_MOUNT_EDGE = r"(?<![\w.~/-])"  # a mount path only counts where a path starts


def map_paths(text: str, mounts: dict[str, Path]) -> str:
    """Replace every container path under a mount point by the lab directory standing for it
    (in one pass, the longest mount path first, so a replacement is never mapped again)."""
    if not mounts:
        return text
    by_path = {m.rstrip("/"): str(d) for m, d in mounts.items()}
    alternatives = "|".join(re.escape(m) for m in sorted(by_path, key=len, reverse=True))
    pattern = _MOUNT_EDGE + f"({alternatives})" + r"(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda m: by_path[m.group(1)], text)


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values: $(VAR) of a defined variable
    becomes its value, $$ becomes $, anything else stays as written."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


@dataclass
class Service:
    name: str
    ip: str | None            # None: headless
    ports: list[dict]
    selector: dict


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    template: dict            # the pod template (metadata + spec) it was made from
    claims: list[dict]        # volumeClaimTemplates (StatefulSet pods)
    owner: tuple[str, str]    # (kind, name) of the manifest it comes from
    hostname: str | None = None
    subdomain: str | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # each container's current process
    starts: int = 0
    terminating: bool = False  # delete_pod began: its containers are meant to exit
    # Since the pod's start (start_pod), per container: the kubelet's restartCount, and the exit
    # status of each process that ended while the pod ran (a signal as -N, as Popen has it).
    restarts: dict[str, int] = field(default_factory=dict)
    exits: dict[str, list[int]] = field(default_factory=dict)
    # Set once the pod is being deleted or killed (or the lab stops): no container starts again.
    # A new Event per pod start; the supervisor threads of this start (one per container).
    stopping: threading.Event = field(default_factory=threading.Event)
    supervisors: list[threading.Thread] = field(default_factory=list)

    @property
    def labels(self) -> dict:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    def container_port(self, name_or_number) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        for c in self.spec["containers"]:
            for p in c.get("ports", []):
                if p.get("name") == name_or_number:
                    return p["containerPort"]
        raise LabError(f"pod {self.name} has no container port named {name_or_number!r}")

    @property
    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.procs.items()}


class Lab:
    """Pods from rendered manifests (StatefulSets, Deployments, ConfigMaps, Services) in
    network namespaces. Use as a context manager; see the module docstring."""

    def __init__(self, docs: list[dict], workdir: Path, namespace: str,
                 cluster_domain: str = "cluster.local", deployment_replicas: int | None = 1,
                 kube_api: dict | None = None, objects: dict | None = None):
        """kube_api: {"host", "port", "token", "ca"} of a stand-in API server the test runs (e.g.
        tests/podlab/kube_api.py in the client namespace), or None: no API server.
        objects: Secrets and ConfigMaps made before the pods, e.g. by the chart's key Job
        (tests/kube_stand_in.run_key_job): {(plural, name): object as the API stores it}."""
        self.docs = docs
        self.kube_api = kube_api
        self.dir = Path(workdir)
        self.namespace = namespace
        self.domain = cluster_domain
        self.configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        self.secrets: dict[str, dict[str, bytes]] = {}
        for (plural, name), obj in (objects or {}).items():
            self._store(plural, name, obj.get("data", {}), encoded=True)
        # Directories outside the pods kept in sync with an object, as the kubelet keeps a pod's
        # volume (Lab.project): e.g. the allow-list the test's own `smrd status` uses.
        self._projections: list[tuple[str, str, Path]] = []
        self.policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        self.pods: dict[str, Pod] = {}
        self._ips = (str(a) for a in list(LAB_SUBNET.hosts())[POD_HOST0 - 1:SERVICE_HOST0 - 1])
        for d in docs:
            if d["kind"] == "StatefulSet":
                spec = d["spec"]
                for i in range(spec["replicas"]):
                    name = f"{d['metadata']['name']}-{i}"
                    self._add_pod(name, spec["template"], spec.get("volumeClaimTemplates", []),
                                  ("StatefulSet", d["metadata"]["name"]),
                                  hostname=name, subdomain=spec.get("serviceName"))
        for d in docs:
            if d["kind"] == "Deployment":
                n = d["spec"].get("replicas", 1) if deployment_replicas is None else deployment_replicas
                for g in range(n):
                    self._add_pod(f"{d['metadata']['name']}-lab-{g}", d["spec"]["template"], [],
                                  ("Deployment", d["metadata"]["name"]))
        for d in docs:
            if d["kind"] == "Pod":  # e.g. the `helm test` hook: started on demand, runs once
                self._add_pod(d["metadata"]["name"], d, [], ("Pod", d["metadata"]["name"]))
        self.services: dict[str, Service] = {}
        vip = SERVICE_HOST0
        for d in docs:
            if d["kind"] != "Service":
                continue
            spec = d["spec"]
            headless = spec.get("clusterIP") == "None"
            ip = None if headless else str(LAB_SUBNET.network_address + vip)
            vip += 0 if headless else 1
            self.services[d["metadata"]["name"]] = Service(d["metadata"]["name"], ip, spec.get("ports", []),
                                                           spec.get("selector") or {})
        self.client_ip = str(LAB_SUBNET.network_address + CLIENT_HOST)
        self.bin = self.dir / "image-bin"
        self._lock = _Lock()
        self._started = False
        self.events: list[str] = []   # what the lab did, for the test's report
        # The kubelet's state (every Pod's procs, restarts, exits, stopping) changes under this
        # lock, and each change is notified: wait_restart and start_pod wait on it.
        self._kubelet = threading.Condition()
        # Containers that exited while their pod ran, not killed by the test nor by SIGKILL
        # (pod name, what happened): check_running reports them.
        self.crashes: list[tuple[str, str]] = []
        self._expected: dict[tuple[str, str], list] = {}  # expect_crashes: (pod, container) -> crashes

    def _add_pod(self, name, template, claims, owner, hostname=None, subdomain=None):
        try:
            ip = next(self._ips)
        except StopIteration:
            raise LabError(f"no address left on {LAB_SUBNET} for pod {name}") from None
        self.pods[name] = Pod(name, ip, PREFIX + name, template, claims, owner, hostname, subdomain)

    # ---- names -----------------------------------------------------------------------------

    def service_names(self, svc: Service) -> list[str]:
        base = f"{svc.name}.{self.namespace}"
        return [f"{base}.svc.{self.domain}", f"{base}.svc", base, svc.name]

    def pod_dns_names(self, pod: Pod) -> list[str]:
        """The names a pod has in cluster DNS: hostname.subdomain.NS.svc.DOMAIN when its
        subdomain is a headless Service (StatefulSet pods), and the search-path short forms."""
        if not (pod.hostname and pod.subdomain in self.services):
            return []
        base = f"{pod.hostname}.{pod.subdomain}.{self.namespace}"
        return [f"{base}.svc.{self.domain}", f"{base}.svc", base, f"{pod.hostname}.{pod.subdomain}"]

    def service_endpoints(self, svc: Service) -> list[Pod]:
        return [p for p in self.pods.values() if svc.selector and _labels_match(svc.selector, p.labels)]

    def hosts_file(self, own: Pod | None) -> str:
        lines = ["# written by the smrd pod lab (tests/podlab/lab.py); removed when the lab stops",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if own is not None:  # a pod's own hostname resolves to its own address
            names = self.pod_dns_names(own) + [own.hostname or own.name]
            lines.append(f"{own.ip}\t{' '.join(dict.fromkeys(names))}")
        for pod in self.pods.values():
            if pod is not own and self.pod_dns_names(pod):
                lines.append(f"{pod.ip}\t{' '.join(self.pod_dns_names(pod))}")
        for svc in self.services.values():
            if svc.ip is not None:
                lines.append(f"{svc.ip}\t{' '.join(self.service_names(svc))}")
            else:  # a headless Service name answers with every pod it selects
                for pod in self.service_endpoints(svc):
                    lines.append(f"{pod.ip}\t{' '.join(self.service_names(svc))}")
        return "\n".join(lines) + "\n"

    def all_names(self) -> set[str]:
        names = set()
        for pod in self.pods.values():
            names.update(self.pod_dns_names(pod))
        for svc in self.services.values():
            names.update(self.service_names(svc))
        return names

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self):
        why = missing_tools()
        if why:
            raise LabError("; ".join(why))
        self._lock.acquire()
        try:
            removed = remove_leftovers()
            if removed:
                self.events.append(f"removed leftovers of an earlier run: {removed}")
            self._started = True
            self._build_network()
            self._write_image_bin()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self._started:
                for pod in self.pods.values():
                    self.kill_pod(pod.name, record=False)
                remove_leftovers()
                self.events.append("stopped: every pod killed, namespaces and /etc/netns entries removed")
        finally:
            self._started = False
            self._lock.release()
        return False

    def _ns_run(self, ns, *argv, check=True):
        return _run(["ip", "netns", "exec", ns, *argv], check=check)

    def _build_network(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", NET_NS])
        n = ["ip", "-n", NET_NS]
        _run([*n, "link", "add", "br0", "type", "bridge"])
        _run([*n, "link", "set", "br0", "up"])
        _run([*n, "link", "set", "lo", "up"])
        members = [(CLIENT_NS, self.client_ip, None)] + [(p.netns, p.ip, p) for p in self.pods.values()]
        for k, (ns, ip, pod) in enumerate(members):
            _run(["ip", "netns", "add", ns])
            veth = f"veth{k}"  # only ever exists inside NET_NS
            _run([*n, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run([*n, "link", "set", veth, "master", "br0", "up"])
            m = ["ip", "-n", ns]
            _run([*m, "addr", "add", f"{ip}/{LAB_SUBNET.prefixlen}", "dev", "eth0"])
            _run([*m, "link", "set", "eth0", "up"])
            _run([*m, "link", "set", "lo", "up"])
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts_file(pod))
            self._install_services(ns)
            if pod is not None:
                self._install_policies(pod)
        self.events.append(f"network: bridge in {NET_NS}, {len(members)} namespaces on {LAB_SUBNET}; "
                           f"{len(self.policies)} NetworkPolicies as iptables rules")

    # ---- NetworkPolicies -------------------------------------------------------------------

    def _selects(self, selector: dict | None, labels: dict) -> bool:
        """A LabelSelector ({} or None: everything); matchExpressions are not modelled."""
        selector = selector or {}
        if selector.get("matchExpressions"):
            raise LabError(f"NetworkPolicy selector {selector}: matchExpressions are not modelled by the lab")
        return _labels_match(selector.get("matchLabels") or {}, labels)

    def _peer_sources(self, peer: dict) -> list[str]:
        """The source addresses a NetworkPolicyPeer admits: the lab's pods its selectors match (the
        lab's one namespace carries the label kubernetes.io/metadata.name = its name), or an
        ipBlock's CIDR."""
        if "ipBlock" in peer:
            if peer["ipBlock"].get("except"):
                raise LabError("NetworkPolicy ipBlock.except is not modelled by the lab")
            return [peer["ipBlock"]["cidr"]]
        if "namespaceSelector" in peer and not self._selects(
                peer["namespaceSelector"], {"kubernetes.io/metadata.name": self.namespace}):
            return []
        return [p.ip for p in self.pods.values() if self._selects(peer.get("podSelector"), p.labels)]

    def policy_rules(self, pod: Pod) -> list[list[str]]:
        """The iptables rules (arguments after `iptables`) standing for the NetworkPolicies that
        select the pod, in chain POLICY_CHAIN of its namespace; [] when none selects it (all
        ingress allowed, as in Kubernetes). Policies are allow-lists that add up: a connection to
        a selected pod passes when one ingress rule of one policy admits its source and port;
        everything else is dropped. Always allowed, as by Kubernetes and its network plugins: the
        pod's own loopback, replies to the pod's own connections (conntrack), and the node (the
        kubelet's probes): the lab's client namespace stands for the node."""
        selecting = [pol for pol in self.policies
                     if "Ingress" in pol["spec"].get("policyTypes", ["Ingress"])
                     and self._selects(pol["spec"].get("podSelector"), pod.labels)]
        if not selecting:
            return []
        c = POLICY_CHAIN
        rules = [["-A", c, "-i", "lo", "-j", "ACCEPT"],
                 ["-A", c, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                 ["-A", c, "-s", self.client_ip, "-j", "ACCEPT"]]
        for pol in selecting:
            for rule in pol["spec"].get("ingress") or []:
                peers = rule.get("from")
                sources = [None] if not peers else [a for peer in peers for a in self._peer_sources(peer)]
                ports = rule.get("ports") or [None]
                for port in ports:
                    match = []
                    if port is not None:
                        match = ["-p", port.get("protocol", "TCP").lower()]
                        if "port" in port:
                            number = pod.container_port(port["port"])
                            end = port.get("endPort")
                            match += ["--dport", f"{number}:{end}" if end else str(number)]
                    for src in dict.fromkeys(sources):
                        rules.append(["-A", c, *(["-s", src] if src else []), *match,
                                      "-m", "comment", "--comment", pol["metadata"]["name"], "-j", "ACCEPT"])
        rules.append(["-A", c, "-j", "DROP"])
        return rules

    def _install_policies(self, pod: Pod):
        rules = self.policy_rules(pod)
        if not rules:
            return
        self._ns_run(pod.netns, "iptables", "-N", POLICY_CHAIN)
        for rule in rules:
            self._ns_run(pod.netns, "iptables", *rule)
        self._ns_run(pod.netns, "iptables", "-A", "INPUT", "-j", POLICY_CHAIN)

    def _install_services(self, ns):
        """kube-proxy, iptables mode: ClusterIP:port -> a selected pod's target port."""
        for svc in self.services.values():
            if svc.ip is None:
                continue
            pods = self.service_endpoints(svc)
            for port in svc.ports:
                for k, pod in enumerate(pods):
                    rule = ["iptables", "-t", "nat", "-A", "OUTPUT", "-d", svc.ip, "-p",
                            port.get("protocol", "TCP").lower(), "--dport", str(port["port"])]
                    if len(pods) - k > 1:
                        rule += ["-m", "statistic", "--mode", "random", "--probability",
                                 f"{1 / (len(pods) - k):.5f}"]
                    target = pod.container_port(port.get("targetPort", port["port"]))
                    rule += ["-j", "DNAT", "--to-destination", f"{pod.ip}:{target}"]
                    self._ns_run(ns, *rule)

    def _write_image_bin(self):
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, body in (("smrd", f'exec {shlex.quote(sys.executable)} -m smrd "$@"'),
                           ("python", f'exec {shlex.quote(sys.executable)} "$@"'),
                           ("python3", f'exec {shlex.quote(sys.executable)} "$@"')):
            path = self.bin / name
            path.write_text(f"#!/bin/sh\n{body}\n")
            path.chmod(0o755)

    # ---- pods ------------------------------------------------------------------------------

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    def pods_of(self, kind: str, name: str) -> list[str]:
        """The lab's pods made from one manifest, e.g. pods_of("Deployment", "demo-smrd-gateway")."""
        return [p.name for p in self.pods.values() if p.owner == (kind, name)]

    def _volumes(self, pod: Pod) -> dict[str, Path]:
        """volume name -> the lab directory standing for it (made fresh for a new pod, except
        claims)."""
        out = {}
        root = self.dir / "pods" / pod.name / "volumes"
        for vol in pod.spec.get("volumes", []):
            path = root / vol["name"]
            if "configMap" in vol or "secret" in vol:
                shutil.rmtree(path, ignore_errors=True)
                write_atomic(path, self._object_files(pod, vol))
            elif "emptyDir" in vol:
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir(parents=True)
            elif "projected" in vol:
                # The chart's service-account volume: the downwardAPI files, and with a stand-in
                # API server (kube_api) its token and the kube-root-ca.crt ConfigMap's CA. Without
                # one, no token: smrd.ops.kube then answers "not in Kubernetes".
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir(parents=True)
                self._fill_projected(pod, vol["projected"], path)
            else:
                kind = next(iter(k for k in vol if k != "name"), "?")
                raise LabError(f"pod {pod.name}: volume {vol['name']} of type {kind} is not modelled by the lab")
            out[vol["name"]] = path
        for claim in pod.claims:
            name = claim["metadata"]["name"]
            path = self.dir / "pvc" / f"{name}-{pod.name}"   # the PVC's name in Kubernetes
            path.mkdir(parents=True, exist_ok=True)
            out[name] = path
        return out

    # ---- Secrets and ConfigMaps: stored, mounted, updated -----------------------------------

    def _store(self, plural: str, name: str, data: dict, encoded=False):
        if plural == "secrets":
            self.secrets[name] = {k: base64.b64decode(v) if encoded else (v.encode() if isinstance(v, str) else v)
                                  for k, v in data.items()}
        elif plural == "configmaps":
            self.configmaps[name] = {k: v.decode() if isinstance(v, bytes) else v for k, v in data.items()}
        else:
            raise LabError(f"the lab stores Secrets and ConfigMaps, not {plural}")

    def object_data(self, plural: str, name: str) -> dict:
        """The stored object's data (a Secret's values as bytes), a copy."""
        return dict((self.secrets if plural == "secrets" else self.configmaps)[name])

    def _object_files(self, pod: Pod | None, vol: dict) -> dict[str, tuple[bytes, int]]:
        """A configMap or secret volume's files, as the kubelet writes them: {path: (bytes, mode)}.
        A missing object or item key is the kubelet's mount failure (LabError)."""
        kind, src = ("configMap", vol["configMap"]) if "configMap" in vol else ("secret", vol["secret"])
        name = src["name"] if kind == "configMap" else src["secretName"]
        store = self.configmaps if kind == "configMap" else self.secrets
        who = f"pod {pod.name}" if pod else "the lab"
        if name not in store:
            raise LabError(f"{who}: {kind} {name} does not exist (the kubelet cannot mount volume {vol['name']})")
        data = {k: v.encode() if isinstance(v, str) else v for k, v in store[name].items()}
        mode = src.get("defaultMode", 0o644)
        items = src.get("items")
        files = {}
        for item in items if items else [{"key": k, "path": k} for k in data]:
            if item["key"] not in data:
                raise LabError(f"{who}: {kind} {name} has no key {item['key']} (volume {vol['name']})")
            files[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return files

    def update_object(self, plural: str, name: str, data: dict):
        """`kubectl apply` of a Secret's or ConfigMap's new data (the whole of it, values as
        str or bytes), and the kubelet's sync of every running pod's volume of it (and of each
        Lab.project directory): the kubelet's atomic swap of `..data`, at once everywhere (the
        kubelet takes up to a minute or so, each node on its own)."""
        self._store(plural, name, data)
        kind, key = ("secret", "secretName") if plural == "secrets" else ("configMap", "name")
        synced = []
        for pod in self.pods.values():
            if pod.stopping.is_set() or not any(pod.alive.values()):
                continue
            for vol in pod.spec.get("volumes", []):
                if vol.get(kind, {}).get(key) == name:
                    write_atomic(self.dir / "pods" / pod.name / "volumes" / vol["name"], self._object_files(pod, vol))
                    synced.append(pod.name)
        for p, n, path in self._projections:
            if (p, n) == (plural, name):
                write_atomic(path, self._object_files(None, {"name": str(path), kind: {key: name}}))
        self.events.append(f"updated {plural}/{name} ({', '.join(sorted(data))}); synced into {sorted(set(synced))}")

    def project(self, plural: str, name: str, path: Path) -> Path:
        """A directory outside the pods kept as a volume of the object is (for the test's own
        tools, e.g. the allow-list of its `smrd status`)."""
        kind, key = ("secret", "secretName") if plural == "secrets" else ("configMap", "name")
        write_atomic(path, self._object_files(None, {"name": str(path), kind: {key: name}}))
        self._projections.append((plural, name, Path(path)))
        return Path(path)

    def _fill_projected(self, pod: Pod, projected: dict, path: Path):
        fields = {"metadata.name": pod.name, "metadata.namespace": self.namespace}
        api = self.kube_api
        for src in projected["sources"]:
            for item in src.get("downwardAPI", {}).get("items", []):
                (path / item["path"]).write_text(fields[item["fieldRef"]["fieldPath"]])
            if "serviceAccountToken" in src and api:
                (path / src["serviceAccountToken"].get("path", "token")).write_text(api["token"])
            if src.get("configMap", {}).get("name") == "kube-root-ca.crt":
                for item in (src["configMap"].get("items") or [{"key": "ca.crt", "path": "ca.crt"}]) if api else []:
                    (path / item["path"]).write_text(api["ca"])
            elif "configMap" in src or "secret" in src:
                raise LabError(f"pod {pod.name}: projected source {list(src)} is not modelled by the lab")

    def _service_links(self, pod: Pod) -> dict[str, str]:
        """The docker-links variables the kubelet gives every container for every Service with a
        ClusterIP in the namespace (enableServiceLinks defaults to true)."""
        if pod.spec.get("enableServiceLinks", True) is False:
            return {}
        env = {}
        for svc in self.services.values():
            if svc.ip is None or not svc.ports:
                continue
            prefix = svc.name.upper().replace("-", "_")
            env[f"{prefix}_SERVICE_HOST"] = svc.ip
            env[f"{prefix}_SERVICE_PORT"] = str(svc.ports[0]["port"])
            first = svc.ports[0]
            env[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{svc.ip}:{first['port']}"
            for p in svc.ports:
                proto = p.get("protocol", "TCP")
                if p.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
                key = f"{prefix}_PORT_{p['port']}_{proto}"
                env[key] = f"{proto.lower()}://{svc.ip}:{p['port']}"
                env[key + "_PROTO"] = proto.lower()
                env[key + "_PORT"] = str(p["port"])
                env[key + "_ADDR"] = svc.ip
        return env

    def container_env(self, pod: Pod, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        env = {"PATH": f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOSTNAME": pod.hostname or pod.name, "HOME": "/root", **IMAGE_ENV}
        env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ})
        env.update(self._service_links(pod))
        if self.kube_api:  # the kubelet gives every container the API server's address
            env.update({"KUBERNETES_SERVICE_HOST": self.kube_api["host"],
                        "KUBERNETES_SERVICE_PORT": str(self.kube_api["port"])})
        fields = {"metadata.name": pod.name, "metadata.namespace": self.namespace,
                  "status.podIP": pod.ip, "spec.nodeName": "smrdlab-node"}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = map_paths(expand_vars(str(e["value"]), env), mounts)
            elif "fieldRef" in e.get("valueFrom", {}):
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise LabError(f"pod {pod.name}: env {e['name']} from fieldRef {path} is not modelled")
                env[e["name"]] = fields[path]
            elif "valueFrom" in e:
                raise LabError(f"pod {pod.name}: env {e['name']} from {list(e['valueFrom'])} is not modelled")
            else:
                env[e["name"]] = ""
        return env

    def container_argv(self, pod: Pod, container: dict,
                       volumes: dict[str, Path] | None = None) -> tuple[list[str], dict[str, str]]:
        """What the container runs (after $(VAR) expansion and PATH MAPPING), and its env.
        volumes: the pod's, as made at its start; None: make them now (fresh, as for a new pod)."""
        mounts = self._mounts(pod, container, self._volumes(pod) if volumes is None else volumes)
        env = self.container_env(pod, container, mounts)
        if not container.get("command"):
            raise LabError(f"pod {pod.name}: container {container['name']} has no command; the lab "
                           "has no image entrypoint to fall back on")
        argv = [map_paths(expand_vars(a, env), mounts)
                for a in [*container["command"], *container.get("args", [])]]
        return argv, env

    def _mounts(self, pod: Pod, container: dict, volumes: dict[str, Path]) -> dict[str, Path]:
        """mountPath -> lab directory, for one container."""
        mounts = {}
        for m in container.get("volumeMounts", []):
            if m.get("subPath") or m.get("subPathExpr"):
                raise LabError(f"pod {pod.name}: subPath mounts are not modelled")
            if m["name"] not in volumes:
                raise LabError(f"pod {pod.name}: container {container['name']} mounts unknown volume {m['name']}")
            mounts[m["mountPath"]] = volumes[m["name"]]
        return mounts

    def _volume_dirs(self, pod: Pod) -> dict[str, Path]:
        """The same directories as _volumes, as they are now (a running pod's: nothing is made)."""
        out = {v["name"]: self.dir / "pods" / pod.name / "volumes" / v["name"] for v in pod.spec.get("volumes", [])}
        for claim in pod.claims:
            out[claim["metadata"]["name"]] = self.dir / "pvc" / f"{claim['metadata']['name']}-{pod.name}"
        return out

    def hook_argv(self, name: str, container_name: str) -> tuple[list[str], dict[str, str]] | None:
        """The container's preStop exec hook as the kubelet runs it in the running container: its
        command (no $(VAR) expansion for hooks; mount paths mapped) and the container's env; None
        without a hook. Projected volumes (the service-account token) are not named in the
        command, so the hook runs in a private mount namespace where each is bind-mounted at its
        real mountPath (over a private tmpfs on /run for /var/run/... paths): nothing changes
        outside it."""
        pod = self.pods[name]
        container = next(c for c in pod.spec["containers"] if c["name"] == container_name)
        hook = container.get("lifecycle", {}).get("preStop")
        if not hook:
            return None
        if "exec" not in hook:
            raise LabError(f"pod {name}: preStop {list(hook)} is not modelled (exec only)")
        dirs = self._volume_dirs(pod)
        mounts = self._mounts(pod, container, dirs)
        env = self.container_env(pod, container, mounts)
        argv = [map_paths(a, mounts) for a in hook["exec"]["command"]]
        projected = {v["name"] for v in pod.spec.get("volumes", []) if "projected" in v}
        binds = [(m["mountPath"], dirs[m["name"]]) for m in container.get("volumeMounts", [])
                 if m["name"] in projected]
        if binds:
            for target, _ in binds:
                if not target.startswith(("/run/", "/var/run/")):
                    raise LabError(f"pod {name}: projected volume at {target} (not under /run) is not modelled")
            steps = ["mount -t tmpfs smrdlab /run"]
            for target, src in binds:
                steps += [f"mkdir -p {shlex.quote(target)}", f"mount --bind {shlex.quote(str(src))} {shlex.quote(target)}"]
            argv = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                    " && ".join(steps) + ' && exec "$@"', "prestop", *argv]
        return argv, env

    def run_hook(self, name: str, container_name: str, timeout: float) -> subprocess.CompletedProcess:
        """Run the container's preStop hook in the running pod (output in the container's log)."""
        argv, env = self.hook_argv(name, container_name)
        pod = self.pods[name]
        try:
            proc = subprocess.run(["ip", "netns", "exec", pod.netns, *argv], env=env, cwd="/",
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            proc = subprocess.CompletedProcess(e.cmd, None, out, "")
        with open(self.dir / "pods" / name / f"{container_name}.log", "a") as log:
            log.write(f"--- preStop hook (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        self.events.append(f"preStop hook of {name}/{container_name}: exit {proc.returncode}")
        return proc

    def delete_pod(self, name: str) -> dict[str, subprocess.CompletedProcess]:
        """What the kubelet does when a pod is deleted (e.g. by a StatefulSet scale-down): at once
        SIGTERM to every container without a preStop hook, the hook of the others (within
        terminationGracePeriodSeconds), then SIGTERM to them, and SIGKILL to whatever is left when
        the grace period ends. No container is restarted from the start on. Returns {container:
        the hook's result}."""
        pod = self.pods[name]
        procs = self._stop_restarts(pod, terminating=True)
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        deadline = time.monotonic() + grace
        hooked = {c["name"] for c in pod.spec["containers"] if c.get("lifecycle", {}).get("preStop")}
        for cname, proc in procs.items():
            if cname not in hooked and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        results = {c: self.run_hook(name, c, max(deadline - time.monotonic(), 1)) for c in hooked
                   if procs.get(c) is not None and procs[c].poll() is None}
        for cname in hooked:
            proc = procs.get(cname)
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._join_supervisors(pod)
        self.events.append(f"deleted pod {name} (preStop of {sorted(results)}, SIGTERM, grace {grace} s)")
        return results

    def start_pod(self, name: str):
        """Start every container of the pod (a new pod: fresh emptyDirs and ConfigMap files, the
        same claims), in manifest order and without waiting for readiness, as the kubelet does.
        From then on the kubelet's part restarts them (module docstring, CONTAINER RESTARTS)."""
        pod = self.pods[name]
        if any(pod.alive.values()):
            raise LabError(f"pod {name} still has running containers: {pod.alive}")
        if not pod.stopping.is_set() and any(t.is_alive() for t in pod.supervisors):
            if pod.spec.get("restartPolicy", "Always") != "Never":
                raise LabError(f"pod {name} still runs (its containers are being restarted): "
                               "kill_pod or delete_pod it first")
            self._join_supervisors(pod)  # a one-shot pod that finished: its threads are ending
        logs = self.dir / "pods" / name
        logs.mkdir(parents=True, exist_ok=True)
        # The volumes once per pod start: every container mounts the same (an emptyDir shared by
        # two containers must not be emptied again when the second one starts).
        volumes = self._volumes(pod)
        launches = []
        for c in pod.spec["containers"]:
            argv, env = self.container_argv(pod, c, volumes)
            launches.append((c["name"], argv, env, c.get("workingDir", "/")))
        policy = pod.spec.get("restartPolicy", "Always")
        with self._kubelet:
            pod.starts += 1
            pod.procs = {}
            pod.restarts = {c[0]: 0 for c in launches}
            pod.exits = {c[0]: [] for c in launches}
            pod.terminating = False
            pod.stopping = threading.Event()
            pod.supervisors = []
        for cname, argv, env, cwd in launches:
            t = threading.Thread(target=self._supervise, args=(pod, cname, (argv, env, cwd), policy, pod.stopping),
                                 name=f"kubelet {name}/{cname}", daemon=True)
            pod.supervisors.append(t)
            t.start()
            with self._kubelet:  # started in manifest order: each one before the next
                self._kubelet.wait_for(lambda: cname in pod.procs or not t.is_alive(), 30)
                if cname not in pod.procs:
                    raise LabError(f"container {name}/{cname} did not start: "
                                   + "; ".join(text for p, text in self.crashes if p == name))
        self.events.append(f"started pod {name} ({', '.join(pod.procs)})")

    def _spawn(self, pod: Pod, cname: str, launch, header: str) -> subprocess.Popen:
        """One process of the container, in its own session (kill_pod and kill_container signal
        the whole tree). Its parent is the calling thread, the container's supervisor: setpriv's
        parent-death signal ends it if the test process dies."""
        argv, env, cwd = launch
        log = open(self.dir / "pods" / pod.name / f"{cname}.log", "ab")
        try:
            log.write(f"--- {header}: {shlex.join(argv)}\n".encode())
            log.flush()
            return subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "ip", "netns", "exec", pod.netns, *argv], env=env, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def _supervise(self, pod: Pod, cname: str, launch, policy: str, stopping: threading.Event):
        """The kubelet's part for one container of one pod start: start it, and while the pod runs
        start it again after every exit its restartPolicy restarts, after the back-off. Blocks in
        wait() on the container (its exit is the event); ends only once the container has exited
        (or on `stopping`, set before the pod's processes are killed), so the parent-death
        signal never ends a container that should run."""
        proc, delay = None, BACKOFF_INITIAL_S
        try:
            with self._kubelet:
                if stopping.is_set():
                    return
                proc = self._spawn(pod, cname, launch, f"start {pod.starts}")
                pod.procs[cname] = proc
                self._kubelet.notify_all()
            while True:
                began = time.monotonic()
                rc = proc.wait()
                ran = time.monotonic() - began
                with self._kubelet:
                    if stopping.is_set():
                        return  # deleted or killed: the exit was meant
                    pod.exits[cname].append(rc)
                    by_test = getattr(proc, "lab_killed_with", None) is not None
                    completed = policy == "Never" or (policy == "OnFailure" and rc == 0)
                    if not (by_test or completed or rc == -signal.SIGKILL):
                        crash = (pod.name, f"container {pod.name}/{cname} exited with {rc} "
                                           f"after {ran:.1f} s (pod start {pod.starts})")
                        self._expected.get((pod.name, cname), self.crashes).append(crash)
                    self._kubelet.notify_all()
                    if completed:
                        return
                    if ran >= BACKOFF_RESET_S:
                        delay = BACKOFF_INITIAL_S
                    self.events.append(f"container {pod.name}/{cname} exited ({rc}) after {ran:.1f} s; "
                                       f"the kubelet restarts it in {delay:g} s")
                if stopping.wait(delay):
                    return
                with self._kubelet:
                    if stopping.is_set():
                        return
                    n = pod.restarts[cname] + 1
                    proc = self._spawn(pod, cname, launch, f"restart {n} (pod start {pod.starts}, after exit {rc})")
                    pod.procs[cname] = proc
                    pod.restarts[cname] = n
                    self.events.append(f"restarted container {pod.name}/{cname} (restart {n}, pid {proc.pid})")
                    self._kubelet.notify_all()
                delay = min(delay * 2, BACKOFF_MAX_S)
        except BaseException:
            with self._kubelet:
                self.crashes.append((pod.name, f"the lab's kubelet for {pod.name}/{cname} failed:\n"
                                               + traceback.format_exc()))
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        finally:
            with self._kubelet:
                self._kubelet.notify_all()

    def _stop_restarts(self, pod: Pod, terminating=False) -> dict[str, subprocess.Popen]:
        """From now on no container of the pod starts again; returns its processes as they are
        (none is started after this returns)."""
        with self._kubelet:
            pod.stopping.set()
            pod.terminating = pod.terminating or terminating
            self._kubelet.notify_all()
            return dict(pod.procs)

    def _join_supervisors(self, pod: Pod):
        """After the pod's processes exited (or `stopping` was set): its supervisor threads end."""
        for t in pod.supervisors:
            t.join(15)
            if t.is_alive():
                with self._kubelet:
                    self.crashes.append((pod.name, f"the lab's kubelet thread {t.name} did not end"))

    def kill_pod(self, name: str, sig=signal.SIGKILL, record=True):
        """Every container of the pod, at once (SIGKILL by default: the node lost the pod). Nothing
        restarts them: start_pod starts the pod again."""
        pod = self.pods[name]
        procs = self._stop_restarts(pod)
        for proc in procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)   # its own session: the container's whole tree
                except ProcessLookupError:
                    pass
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._join_supervisors(pod)
        if procs and record:
            self.events.append(f"killed pod {name} ({signal.Signals(sig).name})")

    def kill_container(self, name: str, container: str, sig=signal.SIGKILL) -> int:
        """Kill one container's processes (its whole tree), as an OOMKill (SIGKILL) or the kubelet
        after a failed liveness probe (SIGTERM, then SIGKILL when terminationGracePeriodSeconds
        ends) does, and wait until it has exited; the pod's other containers are untouched, and
        the kubelet's part restarts it (restartPolicy, back-off). Returns the container's restart
        count before the kill: wait_restart(name, container, that) waits for the new process."""
        pod = self.pods[name]
        with self._kubelet:
            proc = pod.procs.get(container)
            if pod.stopping.is_set() or proc is None or proc.poll() is not None:
                raise LabError(f"container {name}/{container} is not running (pod stopped, or the "
                               "container is waiting for its restart)")
            before = pod.restarts[container]
            proc.lab_killed_with = sig  # the exit is the test's doing, not a crash
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass  # it exited just now: the kubelet's part restarts it all the same
        grace = 10 if sig == signal.SIGKILL else pod.spec.get("terminationGracePeriodSeconds", 30)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.events.append(f"killed container {name}/{container} (pid {proc.pid}, {signal.Signals(sig).name}, "
                           f"exit {proc.returncode}; restarts so far {before})")
        return before

    def wait_kubelet(self, predicate, timeout=30.0) -> bool:
        """Wait until predicate() holds, evaluated on the kubelet's state (Pod.procs, restarts,
        exits; Lab.crashes) at each change of it; False at the timeout."""
        with self._kubelet:
            return bool(self._kubelet.wait_for(predicate, timeout))

    def wait_restart(self, name: str, container: str, restarts_before: int, timeout=30.0) -> subprocess.Popen:
        """Wait until the kubelet's part has restarted the container more than `restarts_before`
        times (Pod.restarts) since the pod's start; returns the new process. LabError on a crash
        in the lab or at the timeout."""
        pod = self.pods[name]
        with self._kubelet:
            self._kubelet.wait_for(lambda: pod.restarts.get(container, 0) > restarts_before
                                   or pod.stopping.is_set() or self.crashes, timeout)
            if pod.restarts.get(container, 0) > restarts_before:
                return pod.procs[container]
        self.check_running()
        raise LabError(f"container {name}/{container} was not restarted within {timeout} s "
                       f"(restarts {pod.restarts.get(container)}, exits {pod.exits.get(container)}):\n"
                       + self.log_tail(name))

    def log_text(self, name: str, container: str) -> str:
        """One container's output, all its processes: each pod start begins with a `--- start N:`
        line, each container restart within it with `--- restart K (pod start N, after exit X):`."""
        path = self.dir / "pods" / name / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, lines=15) -> str:
        out = []
        for c in self.pods[name].spec["containers"]:
            path = self.dir / "pods" / name / f"{c['name']}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}/{c['name']} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def run_to_completion(self, name: str, timeout=60.0) -> dict[str, int]:
        """Start a one-shot pod (restartPolicy Never, like the `helm test` pod) and wait until
        every container has exited: {container: exit code}."""
        pod = self.pods[name]
        if pod.spec.get("restartPolicy") != "Never":
            raise LabError(f"pod {name} is not a one-shot pod (restartPolicy {pod.spec.get('restartPolicy')})")
        self.start_pod(name)
        deadline = time.monotonic() + timeout
        try:
            codes = {c: p.wait(max(deadline - time.monotonic(), 0.01)) for c, p in pod.procs.items()}
        except subprocess.TimeoutExpired:
            self.kill_pod(name)
            raise LabError(f"pod {name} did not finish within {timeout} s:\n" + self.log_tail(name)) from None
        self.events.append(f"pod {name} finished: {codes}")
        return codes

    def expect_crashes(self, name: str, container: str):
        """From now on the container's crashes are expected (a crash loop the test causes on
        purpose, e.g. a pod started without its key): kept apart, not reported by check_running,
        until expected_crashes(name, container)."""
        with self._kubelet:
            self._expected[(name, container)] = []

    def expected_crashes(self, name: str, container: str) -> list[str]:
        """The end of expect_crashes: the container's crashes since then."""
        with self._kubelet:
            return self._expected.pop((name, container))

    def check_running(self):
        """LabError naming each container that exited on its own while its pod ran (with its
        pod's log), even if the kubelet's part has restarted it since: a crash, not a test's kill,
        a SIGKILL (the lab's, an OOMKill, smrd resetting its app) or a one-shot pod finishing."""
        with self._kubelet:
            crashes = list(self.crashes)
        if crashes:
            raise LabError("\n".join(text for _, text in crashes) + "\n"
                           + "\n".join(self.log_tail(p) for p in dict.fromkeys(p for p, _ in crashes)))

    # ---- faults ----------------------------------------------------------------------------

    PARTITION_RULES = (("INPUT", "-i"), ("OUTPUT", "-o"))

    def partition(self, name: str):
        """Cut the pod off the pod network (its own loopback, smrd <-> app, keeps working)."""
        ns = self.pods[name].netns
        for chain, flag in self.PARTITION_RULES:  # first: before the NetworkPolicy rules' ACCEPTs
            self._ns_run(ns, "iptables", "-I", chain, "1", flag, "eth0", "-j", "DROP")
        self.events.append(f"partitioned pod {name} (iptables DROP on its eth0)")

    def heal(self, name: str):
        ns = self.pods[name].netns
        for chain, flag in self.PARTITION_RULES:
            self._ns_run(ns, "iptables", "-D", chain, flag, "eth0", "-j", "DROP")
        self.events.append(f"healed pod {name}")

    # ---- helpers for the test --------------------------------------------------------------

    def client_process(self, argv, **popen_kw) -> subprocess.Popen:
        """A process in the client namespace (outside the pods; sees the lab's DNS)."""
        popen_kw.setdefault("env", {**os.environ, **IMAGE_ENV})
        return subprocess.Popen(["ip", "netns", "exec", CLIENT_NS, *argv], **popen_kw)

    def exec_in_pod(self, name: str, argv, timeout=30) -> subprocess.CompletedProcess:
        """`kubectl exec`: a command in the pod's network (with the image's PATH)."""
        env = {**os.environ, **IMAGE_ENV, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        env = {k: v for k, v in env.items() if not k.startswith("SMRD_") or k in PASS_THROUGH_ENV}
        return subprocess.run(["ip", "netns", "exec", self.pods[name].netns, *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)
