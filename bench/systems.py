# The systems a benchmark drives, each started as real processes on 127.0.0.1 and stopped again:
#   SmrdSystem  an smrd cluster through smrd.ops.local.LocalCluster (the code path of `smrd local`),
#               beside the hashmap demo app or the no-op app
#   DirectApp   the same app, unreplicated: clients connect to it directly
#   EtcdCluster etcd 3.4 (Debian's etcd-server), n members on loopback, data on tmpfs
# Each one names its processes by role (replica, gateway, app, etcd) so that the measurement can
# sum CPU per role with psutil, and gives the ports clients should spread over.
# Never: leaves a process running after stop(), or binds outside 127.0.0.1.
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from smrd.net.security import keygen
from smrd.ops.local import DEMO_HOOKS, LocalCluster

PY = sys.executable
HOST = "127.0.0.1"


class SystemFailed(RuntimeError):
    pass


# ------------------------------------------------------------------ ports

class PortAllocator:
    """Hands out base ports whose whole block is free, from the top of the non-ephemeral range
    downwards (the e2e tests scan upwards from 20000); a block stays ours until release()."""

    def __init__(self, top=32000, bottom=20000, span=1000):
        self.top, self.bottom, self.span = top, bottom, span
        self.used = set()

    def base(self, offsets):
        for base in range(self.top - self.span, self.bottom - 1, -self.span):
            if base not in self.used and all(_free(base + off) for off in offsets):
                self.used.add(base)
                return base
        raise SystemFailed(f"no free block of ports between {self.bottom} and {self.top}")

    def release(self, base):
        self.used.discard(base)


def smrd_base_port(replicas=3, gateways=1):
    """A base port whose whole smrd.ops.local.LocalCluster layout is free (for one-off scripts)."""
    return PortAllocator().base(_smrd_offsets(replicas, gateways))


def curve_keys(root: Path, replicas: int, gateways: int) -> dict:
    """Key pairs for every process (smrd keygen) and an allow-list of their public keys; the
    settings that turn CURVE on with them."""
    keys, allow = root / "secret", root / "allow"
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    allow.mkdir(parents=True, exist_ok=True)
    for name in [f"replica-{i}" for i in range(replicas)] + [f"gateway-{g}" for g in range(gateways)]:
        _, pub, _ = keygen(str(keys), name)
        shutil.copy(pub, allow)
    return {"curve_secret_key": str(keys / "<name>.key"), "curve_public_keys": str(allow)}


def _free(port):
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _smrd_offsets(replicas, gateways):
    offs = [10 * i + k for i in range(replicas) for k in range(4)]
    return offs + [900 + g for g in range(gateways)] + [950 + g for g in range(gateways)]


# ------------------------------------------------------------------ apps

def app_argv(app, framing, port):
    if app == "noop":
        return [PY, "-m", "smrd.apps.noop", "--host", HOST, "--port", str(port)]
    return [PY, "-m", "smrd.apps.hashmap", "--host", HOST, "--port", str(port), "--framing", framing]


def _procs(pids):
    return [psutil.Process(pid) for pid in pids]


# ------------------------------------------------------------------ smrd

class SmrdSystem:
    kind = "smrd"

    def __init__(self, *, replicas=3, gateways=1, framing="line", durability="fsync",
                 storage="tmpfs", app="hashmap", settings=None, curve=False, data_dir, log_dir, ports):
        if app == "hashmap":
            # As `smrd local` runs the demo: with its snapshot hooks (checkpoints every 100,000
            # requests by default, the log truncated behind them).
            settings = {**DEMO_HOOKS, **(settings or {})}
        self.config = {"system": "smrd", "replicas": replicas, "gateways": gateways,
                       "framing": framing, "durability": durability, "storage": storage,
                       "app": app, "hooks": app == "hashmap", "curve": curve}
        self.data_dir, self.log_dir = Path(data_dir), Path(log_dir)
        if curve:  # CURVE on every link, as the chart's default (docs/security.md)
            settings = {**(settings or {}), **curve_keys(self.data_dir / "keys", replicas, gateways)}
        self.ports_ = ports
        self.base = ports.base(_smrd_offsets(replicas, gateways))
        self.cluster = LocalCluster(
            replicas, gateways, framing, base_port=self.base, data_dir=self.data_dir,
            durability=durability, settings=settings,
            app_command=None if app == "hashmap" else (lambda i, port: app_argv(app, framing, port)))
        self.startup_s = None

    @property
    def ports(self):
        return [self.cluster.gateway_port(g) for g in range(len(self.cluster.gateways))]

    def start(self):
        t0 = time.monotonic()
        try:
            self.cluster.start()
            self.leader = self.cluster.leader(timeout=30)
        except Exception:
            self.stop()
            raise
        self.startup_s = round(time.monotonic() - t0, 3)
        return self

    def processes(self):
        c = self.cluster
        return {"replica": _procs(s.proc.pid for s in c.servers),
                "gateway": _procs(g.proc.pid for g in c.gateways),
                "app": _procs(a.proc.pid for a in c.apps)}

    def check_alive(self):
        dead = [ch.name for ch in self.cluster.servers + self.cluster.gateways + self.cluster.apps
                if not ch.alive]
        if dead:
            raise SystemFailed(f"smrd processes died: {', '.join(dead)} (logs in {self.log_dir})")

    def batch_counters(self):
        """(sum, count) of the leader's smrd_batch_requests histogram: requests per batch."""
        try:
            port = self.cluster.metrics_port(self.leader)
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        found = {}
        for line in text.splitlines():
            for suffix in ("_sum", "_count"):
                if line.startswith("smrd_batch_requests" + suffix + "{"):
                    found[suffix] = float(line.rsplit(" ", 1)[1])
        return (found["_sum"], found["_count"]) if len(found) == 2 else None

    def stop(self):
        self.cluster.stop()
        self.ports_.release(self.base)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for log in self.data_dir.glob("*.log"):
            shutil.copy(log, self.log_dir / log.name)
        shutil.rmtree(self.data_dir, ignore_errors=True)


# ------------------------------------------------------------------ the app alone

class DirectApp:
    kind = "direct"

    def __init__(self, *, framing="line", app="hashmap", log_dir):
        self.config = {"system": "direct", "replicas": 0, "gateways": 0, "framing": framing,
                       "durability": None, "storage": None, "app": app}
        self.argv = app_argv(app, framing, 0)
        self.log_dir = Path(log_dir)
        self.proc = None
        self.startup_s = None

    def start(self):
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise SystemFailed(f"{' '.join(self.argv)} did not start: {line!r}")
        self.port = int(line.split()[1].rsplit(":", 1)[1])
        self.startup_s = round(time.monotonic() - t0, 3)
        return self

    @property
    def ports(self):
        return [self.port]

    def processes(self):
        return {"app": _procs([self.proc.pid])}

    def check_alive(self):
        if self.proc.poll() is not None:
            raise SystemFailed(f"app exited with {self.proc.returncode}")

    def batch_counters(self):
        return None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------ etcd

ETCD_PACKAGE = "etcd-server"


def ensure_etcd():
    """Path of the etcd binary; installs Debian's etcd-server when missing and we are root."""
    path = shutil.which("etcd")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemFailed(f"etcd is not installed: run `sudo apt-get install -y {ETCD_PACKAGE}` "
                           "(Debian/Ubuntu), or pass --no-etcd to skip the etcd baseline")
    print(f"etcd is not installed: apt-get install -y {ETCD_PACKAGE} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", ETCD_PACKAGE]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemFailed(f"apt-get install {ETCD_PACKAGE} failed:\n{done.stderr[-2000:]}")
    path = shutil.which("etcd")
    if not path:
        raise SystemFailed(f"{ETCD_PACKAGE} installed but no etcd binary on PATH")
    return path


def etcd_version(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(":", 1)[1].strip() if out else "unknown"


class EtcdCluster:
    kind = "etcd"

    def __init__(self, *, members=3, data_dir, log_dir, ports):
        self.binary = ensure_etcd()
        self.version = etcd_version(self.binary)
        self.config = {"system": "etcd", "replicas": members, "gateways": 0, "framing": "http",
                       "durability": "fsync", "storage": "tmpfs", "app": "etcd",
                       "version": self.version}
        self.data_dir, self.log_dir = Path(data_dir), Path(log_dir)
        self.ports_ = ports
        self.base = base = ports.base([k for i in range(members) for k in (i, 10 + i)])
        self.client_ports = [base + i for i in range(members)]
        peer = [base + 10 + i for i in range(members)]
        initial = ",".join(f"m{i}=http://{HOST}:{peer[i]}" for i in range(members))
        self.argvs = [[self.binary, "--name", f"m{i}", "--data-dir", str(self.data_dir / f"m{i}"),
                       "--listen-client-urls", f"http://{HOST}:{self.client_ports[i]}",
                       "--advertise-client-urls", f"http://{HOST}:{self.client_ports[i]}",
                       "--listen-peer-urls", f"http://{HOST}:{peer[i]}",
                       "--initial-advertise-peer-urls", f"http://{HOST}:{peer[i]}",
                       "--initial-cluster", initial, "--initial-cluster-state", "new",
                       "--initial-cluster-token", "smrd-bench", "--logger", "zap",
                       "--log-level", "warn"] for i in range(members)]
        self.procs = []
        self.startup_s = None

    @property
    def ports(self):
        return self.client_ports

    def start(self, timeout=30.0):
        t0 = time.monotonic()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for i, argv in enumerate(self.argvs):
            log = open(self.log_dir / f"etcd-m{i}.log", "ab")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            log.close()
        deadline = t0 + timeout
        try:
            for port in self.client_ports:
                while not self._healthy(port):
                    self.check_alive()
                    if time.monotonic() > deadline:
                        raise SystemFailed(f"etcd on port {port} not healthy within {timeout} s "
                                           f"(logs in {self.log_dir})")
                    time.sleep(0.1)
            self._put_once()
        except Exception:
            self.stop()
            raise
        self.startup_s = round(time.monotonic() - t0, 3)
        return self

    def _healthy(self, port):
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _put_once(self):
        body = json.dumps({"key": "YQ==", "value": "MQ=="}).encode()
        req = urllib.request.Request(f"http://{HOST}:{self.client_ports[0]}/v3/kv/put", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            if r.status != 200:
                raise SystemFailed(f"etcd put answered {r.status}")

    def processes(self):
        return {"etcd": _procs(p.pid for p in self.procs)}

    def check_alive(self):
        dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            raise SystemFailed(f"etcd members {dead} exited (logs in {self.log_dir})")

    def batch_counters(self):
        return None

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ports_.release(self.base)
        shutil.rmtree(self.data_dir, ignore_errors=True)
