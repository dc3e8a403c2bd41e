"""`smrd local`: a whole replicated cluster on this machine from built-in defaults — n replicas,
the demo hashmap app beside each (its own process, as in a pod), and gateways — as real
processes running the same code paths as in production.

Owns: choosing ports, writing the cluster's hosts.conf, starting and stopping the processes in
order (app, then its replica; gateways last), waiting for each to say it is up (no sleeps), and,
with supervise=True (what `smrd local` uses), restarting any process that exits when it was not
asked to, with back-off: what a kubelet does for a pod's containers. A replica keeps its data
directory, an app starts empty.
The LocalCluster class is also the test suite's way to run clusters and inject process faults.
Never: starts anything outside 127.0.0.1, or leaves a child running when it exits.
"""
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .status import query

PY = sys.executable

# Restart back-off of a supervised child: first after RESTART_FIRST_S, doubling to RESTART_MAX_S;
# a child that stayed up RESTART_RESET_S starts again from the first delay (the kubelet's
# CrashLoopBackOff, shorter).
RESTART_FIRST_S = 0.25
RESTART_MAX_S = 8.0
RESTART_RESET_S = 30.0


class ProcessFailed(RuntimeError):
    pass


class Child:
    """One child process whose output is read by a thread, so we can wait for a line."""

    def __init__(self, name, argv, log_path, env=None):
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.env = env
        self.proc = None
        self.terminated = False   # SIGTERM sent to the current process
        self.wanted = False       # it should be running: an exit now is a crash (supervision)
        self.on_exit = None       # called (child, proc) from a thread when a process has exited
        self.started_at = 0.0
        self.restarts = 0
        self.lines = []
        self._cond = threading.Condition()

    def start(self):
        if self.alive:  # a second process would run untracked, and outlive stop()
            raise ProcessFailed(f"{self.name} is already running (pid {self.proc.pid}); under "
                                f"supervision a killed process is started again by the supervisor")
        self.terminated = False
        self.wanted = True
        self._log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        with self._cond:
            self.lines = []
            self.proc = proc
            self._cond.notify_all()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
        return self

    def _pump(self, proc):
        for raw in proc.stdout:
            self._log.write(raw)
            self._log.flush()
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()
        proc.wait()  # its output ended: it exited (or is about to)
        if self.on_exit is not None:
            self.on_exit(self, proc)

    def wait_for(self, text, timeout=20.0):
        """Block until a line containing `text` appears; ProcessFailed if the process dies first
        (a supervised one that is to be restarted: its next process may still say it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            proc = self.proc
            while True:
                if proc is not self.proc:  # restarted: read the new process's lines
                    proc, seen = self.proc, 0
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                restarting = self.on_exit is not None and self.wanted
                if self.proc.poll() is not None and not self._more_output() and not restarting:
                    raise ProcessFailed(f"{self.name} exited with {self.proc.returncode} before "
                                        f"saying {text!r}; last output:\n" + "\n".join(self.lines[-15:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProcessFailed(f"{self.name} did not say {text!r} within {timeout} s; "
                                        "last output:\n" + "\n".join(self.lines[-15:]))
                self._cond.wait(min(left, 0.2))

    def _more_output(self):
        return self.proc.stdout is not None and not self.proc.stdout.closed and self.proc.poll() is None

    def wait_port(self, port, timeout=20.0):
        """Block until 127.0.0.1:port accepts a connection (an app that prints nothing when it is
        up: the kubelet's TCP readiness probe); ProcessFailed if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise ProcessFailed(f"{self.name} exited with {self.proc.returncode} before listening "
                                    f"on port {port}; last output:\n" + "\n".join(self.lines[-15:]))
            if time.monotonic() >= deadline:
                raise ProcessFailed(f"{self.name} did not listen on port {port} within {timeout} s; "
                                    "last output:\n" + "\n".join(self.lines[-15:]))
            with self._cond:  # woken early by output, which often means "up" or "failed"
                self._cond.wait(0.05)

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive:
            self.proc.send_signal(sig)

    def terminate(self):
        """SIGTERM, once: a second one tells smrd to give up its drain (exit at once)."""
        self.wanted = False
        if self.alive and not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout=10.0):
        self.wanted = False
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self):
        """SIGKILL, as a crash: under supervision the process is started again."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


class LocalCluster:
    def __init__(self, replicas=3, gateways=1, framing="line", base_port=11000,
                 data_dir="./smrd-local", durability=None, extra_args=(), settings=None,
                 app_command=None, replica_host=None, replica_args=None, supervise=False,
                 report=None, app_ready="line"):
        # replicas: the replica lines of hosts.conf (the candidates); all of them are bootstrap
        # voters unless a `voters` setting says otherwise. replica_args: {id: [extra flags]} for
        # one replica only (e.g. --auto-join true), after the common ones.
        # app_ready: how an app says it is up: "line" (prints a line containing "listening", as
        # the demo apps do) or "port" (its port accepts connections: any app).
        self.n = replicas
        self.framing = framing
        self.app_ready = app_ready
        # supervise: restart what exits unasked (see RESTART_*); report(text) says so.
        self.supervise = supervise
        self.report = report or (lambda text: None)
        self._closing = False
        self.base = base_port
        self.dir = Path(data_dir).resolve()
        self.durability = durability
        self.extra = list(extra_args)
        self.apps, self.servers, self.gateways = [], [], []
        self.hosts_path = self.dir / "hosts.conf"
        self.settings_path = None
        self.settings = dict(settings or {})
        self._security = None  # for status queries: see _status_security
        self.dir.mkdir(parents=True, exist_ok=True)
        if settings:
            self.settings_path = self.dir / "smrd.toml"
            self.settings_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
        lines = ["# written by smrd local\n"]
        for i in range(replicas):
            host = replica_host(i) if replica_host else "127.0.0.1"
            lines.append(f"replica {i} {host} {self.peer_port(i)} {self.client_port(i)} "
                         f"metrics={self.metrics_port(i)}\n")
        for g in range(gateways):
            lines.append(f"gateway {g} 127.0.0.1 {self.gateway_port(g)} metrics={self.gateway_metrics_port(g)}\n")
        self.hosts_path.write_text("".join(lines))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i in range(replicas):
            if app_command is None:
                app_argv = [PY, "-m", "smrd.apps.hashmap", "--host", "127.0.0.1",
                            "--port", str(self.app_port(i)), "--framing", framing]
            else:
                app_argv = app_command(i, self.app_port(i))  # must print "listening" when up
            self.apps.append(Child(f"app-{i}", app_argv, self.dir / f"app-{i}.log", env))
            argv = [PY, "-m", "smrd", "--role", "server", "-c", str(self.hosts_path), "--id", str(i),
                    "--app-port", str(self.app_port(i)), "--framing", framing,
                    "--data-dir", str(self.dir / f"replica-{i}"), *self.extra,
                    *((replica_args or {}).get(i, ()))]
            if durability:
                argv += ["--durability", durability]
            if self.settings_path:
                argv += ["--settings", str(self.settings_path)]
            self.servers.append(Child(f"replica-{i}", argv, self.dir / f"replica-{i}.log", env))
        for g in range(gateways):
            argv = [PY, "-m", "smrd", "--role", "client", "-c", str(self.hosts_path), "--id", str(g),
                    "--framing", framing, *self.extra]
            if self.settings_path:
                argv += ["--settings", str(self.settings_path)]
            self.gateways.append(Child(f"gateway-{g}", argv, self.dir / f"gateway-{g}.log", env))
        if supervise:
            for child in self.apps + self.servers + self.gateways:
                child.on_exit = self._exited

    # Port layout: replica i uses base+10i (peers), +1 (gateways), +2 (its app), +3 (metrics);
    # gateway g listens on base+900+g, metrics on base+950+g.
    def peer_port(self, i):
        return self.base + 10 * i

    def client_port(self, i):
        return self.base + 10 * i + 1

    def app_port(self, i):
        return self.base + 10 * i + 2

    def gateway_port(self, g):
        return self.base + 900 + g

    def metrics_port(self, i):
        return self.base + 10 * i + 3

    def gateway_metrics_port(self, g):
        return self.base + 950 + g

    def start(self, timeout=30.0):
        """Start every process at once, as Kubernetes starts pods and their containers (a
        replica waits for its app to listen, a gateway for a quorum of replicas), then wait
        until each says it is up. Starting them in turn would add up their start-up times."""
        for child in self.apps + self.servers + self.gateways:
            child.start()
        for i in range(self.n):
            self._wait_app(i, timeout)
        for i, server in enumerate(self.servers):
            server.wait_for(f"replica {i} ready", timeout)
        for gateway in self.gateways:
            gateway.wait_for("listening on", timeout)
        return self

    def start_replica(self, i, timeout=30.0):
        """Start replica i's pod: its app first (it must start empty), then the replica."""
        self.start_app(i, timeout)
        self.start_server(i, timeout)

    def start_app(self, i, timeout=30.0):
        self.apps[i].start()
        self._wait_app(i, timeout)

    def _wait_app(self, i, timeout):
        if self.app_ready == "port":
            self.apps[i].wait_port(self.app_port(i), timeout)
        else:
            self.apps[i].wait_for("listening", timeout)

    def start_server(self, i, timeout=30.0):
        self.servers[i].start().wait_for(f"replica {i} ready", timeout)

    def start_gateway(self, g, timeout=30.0):
        self.gateways[g].start().wait_for("listening on", timeout)

    def kill_replica(self, i):
        """SIGKILL the replica and its app, as when a pod dies."""
        self.servers[i].kill()
        self.apps[i].kill()

    def status(self, i, timeout=1.0):
        return query(f"tcp://127.0.0.1:{self.client_port(i)}", timeout, self._status_security(), i)

    def _status_security(self):
        """With CURVE on (settings name the keys), status queries go out under gateway 0's key:
        the replicas' client ports admit it. None without CURVE."""
        if self._security is None:
            keys = self.settings or {}
            if not keys.get("curve_secret_key") or not self.gateways:
                self._security = False
            else:
                from ..config.settings import load_config
                self._security = load_config(
                    {"hosts": str(self.hosts_path),
                     "curve_secret_key": keys["curve_secret_key"].replace("<name>", "gateway-0"),
                     "curve_public_keys": keys["curve_public_keys"]}, env={}, need_role=False).security
        return self._security or None

    def leader(self, timeout=10.0):
        """The replica every live, normal replica agrees leads, once they agree and a majority
        of the voters (of the newest membership any of them reports) answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [self.status(i, 0.5) for i in range(self.n) if self.servers[i].alive]
            views = [v for v in views if v]
            cfg = max((v["membership"] for v in views if v.get("membership")),
                      key=lambda c: c["index"], default=None)
            voters = set(cfg["voters"]) if cfg else set(range(self.n))
            views = [v for v in views if v["id"] in voters]  # others may lag or follow an old view
            normal = {(v["view"], v["leader"]) for v in views if v["status"] == "normal"}
            if len(normal) == 1 and len(views) > len(voters) // 2:
                return next(iter(normal))[1]
        raise ProcessFailed("no agreed leader within %s s" % timeout)

    def _exited(self, child, proc):
        # From the child's output thread: restart it later unless it was asked to stop.
        if self._closing or not child.wanted or proc is not child.proc:
            return
        up = time.monotonic() - child.started_at
        if up >= RESTART_RESET_S:
            child.restarts = 0
        delay = min(RESTART_FIRST_S * 2 ** child.restarts, RESTART_MAX_S)
        delay *= 1 + random.random() / 4  # children that died together do not come back in step
        child.restarts += 1
        what = ("it keeps its data directory and recovers from its log" if child in self.servers
                else "it starts empty; its replica rebuilds its state" if child in self.apps
                else "clients reconnect")
        self.report(f"{child.name} exited with {_exit_text(proc.returncode)} after {up:.1f} s; "
                    f"restarting it in {delay:.1f} s ({what}); log: {child.log_path}")
        timer = threading.Timer(delay, self._restart, (child, proc))
        timer.daemon = True
        timer.start()

    def _restart(self, child, proc):
        if self._closing or not child.wanted or proc is not child.proc:
            return
        try:
            child.start()
        except OSError as e:
            self.report(f"cannot restart {child.name}: {e}")
            return
        self.report(f"{child.name} restarted (pid {child.proc.pid})")

    def stop(self):
        # Gateways first (they drain), then replicas together (only the leader hands off), then
        # the apps: SIGTERM to a whole tier at once, then wait for it.
        self._closing = True
        for tier in (self.gateways, self.servers, self.apps):
            for child in tier:
                child.terminate()
            for child in tier:
                child.stop()


DEMO_HOOKS = {"snapshot_request": "SNAPSHOT", "restore_request": "RESTORE {state}"}


def user_app(app_cmd: str, app_data_paths: str, data_dir: Path, replicas: int):
    """`--app-cmd` and `--app-data-paths` as LocalCluster's app_command and replica_args: the
    placeholders {port}, {id} and {dir} (the app's own directory, made here) filled in per replica.
    Plain replacement, not str.format: an app's arguments may hold braces of their own."""
    words = shlex.split(app_cmd)
    app_dirs = [(data_dir / f"app-{i}-files").resolve() for i in range(replicas)]
    for app_dir in app_dirs:
        app_dir.mkdir(parents=True, exist_ok=True)

    def fill(text, i, port=None):
        text = text.replace("{id}", str(i)).replace("{dir}", str(app_dirs[i]))
        return text if port is None else text.replace("{port}", str(port))

    def app_command(i, port):
        return [fill(word, i, port) for word in words]

    replica_args = {i: ["--app-data-paths", fill(app_data_paths, i)] for i in range(replicas)
                    if app_data_paths}
    return app_command, replica_args


def _exit_text(code) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return f"status {code}"


def main(args) -> int:
    data_dir = Path(args.data_dir)
    # The demo app has snapshot hooks: checkpoints, log truncation and state transfer are on.
    def report(text):
        print(f"smrd local: {text}", file=sys.stderr, flush=True)

    app_cmd = getattr(args, "app_cmd", None)
    if getattr(args, "app_data_paths", "") and not app_cmd:
        print("smrd local: --app-data-paths names the files of an --app-cmd app; the demo hashmap "
              "keeps none", file=sys.stderr)
        return 2
    if app_cmd:
        app_command, replica_args = user_app(app_cmd, getattr(args, "app_data_paths", ""), data_dir,
                                             args.replicas)
        cluster = LocalCluster(args.replicas, args.gateways, args.framing, args.base_port, data_dir,
                               app_command=app_command, replica_args=replica_args, supervise=True,
                               report=report, app_ready="port")
        what = f"its own `{shlex.split(app_cmd)[0]}`"
    else:
        cluster = LocalCluster(args.replicas, args.gateways, args.framing, args.base_port, data_dir,
                               settings=DEMO_HOOKS, supervise=True, report=report)
        what = "its own hashmap app"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"starting {args.replicas} replicas (each beside {what}) and "
          f"{args.gateways} gateway(s); logs in {data_dir.resolve()}", flush=True)
    try:
        cluster.start()
        leader = cluster.leader()
    except ProcessFailed as e:
        print(f"smrd local: {e}", file=sys.stderr)
        cluster.stop()
        return 1
    except OSError as e:  # an --app-cmd that is not installed or not executable
        print(f"smrd local: cannot start a process: {e}", file=sys.stderr)
        cluster.stop()
        return 1
    g0 = cluster.gateway_port(0)
    if app_cmd:
        print(f"\nreplicated app is up: gateway at 127.0.0.1:{g0} ({args.framing} framing), leader "
              f"is replica {leader}; point the app's own client at that port.\n"
              f"status: smrd status -c {cluster.hosts_path}\n"
              f"A replica, app or gateway that exits is started again; an app starts empty and its "
              f"replica replays the log into it.\nCtrl-C stops everything.", flush=True)
    else:
        print(f"\nreplicated hashmap is up: gateway at 127.0.0.1:{g0} ({args.framing} framing), "
              f"leader is replica {leader}\n"
              f"try:   smrd kv --port {g0} --framing {args.framing} PUT greeting hello\n"
              f"       smrd kv --port {g0} --framing {args.framing} GET greeting\n"
              f"status: smrd status -c {cluster.hosts_path}\n"
              f"A replica, app or gateway that exits is started again (try kill -9 on one).\n"
              f"Ctrl-C stops everything.", flush=True)
    try:
        stop.wait()
    finally:
        print("stopping...", flush=True)
        cluster.stop()
    return 0
