# Leader failover and start-up, with real processes and default settings:
#
#   python -m bench.failover --out results/failover [--kills 20] [--clients 8]
#
# Under closed-loop load through the gateway, SIGKILL the leader's pod (its smrd process and its
# app, as when a node or pod dies; smrd restarted alone beside an app that kept its state refuses
# to replay into it, see docs/app-contract.md), measure the time from the kill to the first
# request completed in the new view, restart the killed replica, wait until it is caught up, and
# repeat. "In the new view" is exact without asking anyone: a request first sent after the kill
# cannot have been proposed by the dead leader, so the first completion of such a request is the
# first request the new view ordered. Also measured: process start -> /readyz of each restarted
# replica, and from launching a whole cluster to its first reply and to full speed (the first
# 100 ms bin at >= 90% of the steady rate measured afterwards). smrd's bytecode is compiled
# first, as pip does when it installs the wheel (the images) and `make install` does for a
# checkout; --no-precompile measures a checkout without it under PYTHONDONTWRITEBYTECODE, where
# every process compiles smrd's modules at each start.
# Prints a summary and writes OUT/failover.json.
import argparse
import compileall
import json
import shutil
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import smrd
from smrd.ops.local import LocalCluster

from .out_dir import make_out_dir
from .systems import smrd_base_port



class Load:
    """Closed-loop clients; every completion is recorded as (invoked, completed)."""

    def __init__(self, port, clients):
        self.port = port
        self.done = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _run(self, c):
        n = 0
        sock = f = None
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    f = sock.makefile("rb")
                n += 1
                t0 = time.monotonic()
                sock.sendall(b"PUT k%d v%d\n" % (n % 100, n))
                reply = f.readline()
                t1 = time.monotonic()
                if reply.startswith(b"OK"):
                    with self.lock:
                        self.done.append((t0, t1))
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(35)

    def wait_completions(self, after, count, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if sum(1 for t0, _ in self.done if t0 > after) >= count:
                    return
            time.sleep(0.01)  # clients are threads of this process; a condition would do, but polling 10 ms is plenty
        raise SystemExit(f"no progress: fewer than {count} requests completed within {timeout} s")

    def first_after(self, t):
        with self.lock:
            return min((t1 for t0, t1 in self.done if t0 > t), default=None)


def _readyz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.failover",
                                 description="Leader SIGKILL -> first request in the new view, and start-up times.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-precompile", action="store_true",
                    help="do not compile smrd's bytecode first (see the header of bench/failover.py)")
    args = ap.parse_args(argv)
    make_out_dir(ap, args.out)
    if not args.no_precompile:
        compileall.compile_dir(Path(smrd.__file__).parent, quiet=1)
    # A fresh cluster every run: an earlier run's logs would be replayed at launch (and its
    # views changed), which is not the start-up being measured.
    shutil.rmtree(args.out / "_cluster", ignore_errors=True)
    cluster = LocalCluster(3, 1, "line", smrd_base_port(), args.out / "_cluster")
    failovers, ready_s = [], []
    launched = time.monotonic()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()  # what did start must not outlive this run
        raise
    load = Load(cluster.gateway_port(0), args.clients).start()
    try:
        load.wait_completions(launched, 1)
        first_reply = load.first_after(launched) - launched
        time.sleep(3.0)  # steady state, to compare the start with
        with load.lock:
            times = sorted(t1 for _, t1 in load.done)
        end = times[-1]
        steady = sum(1 for t in times if t > end - 1.5) / 1.5
        full_speed = None
        t = times[0]
        while t < end:
            if sum(1 for x in times if t <= x < t + 0.1) >= 0.9 * steady * 0.1:
                full_speed = t + 0.1 - launched
                break
            t += 0.1
        for k in range(args.kills):
            leader = cluster.leader()
            load.wait_completions(time.monotonic(), 50)
            t_kill = time.monotonic()
            cluster.kill_replica(leader)
            load.wait_completions(t_kill, 1)
            failovers.append(load.first_after(t_kill) - t_kill)
            cluster.start_app(leader)          # the pod's app first (it must start empty),
            started = time.monotonic()         # then time the smrd process alone
            cluster.servers[leader].start()
            while not _readyz(cluster.metrics_port(leader)):
                if time.monotonic() - started > 60:
                    raise SystemExit(f"replica {leader} not ready 60 s after its restart")
                time.sleep(0.01)  # another process's readiness: polled
            ready_s.append(time.monotonic() - started)
            print(f"kill {k + 1}/{args.kills}: leader {leader}, first request in the new view after "
                  f"{failovers[-1] * 1000:.0f} ms; restarted smrd process ready after {ready_s[-1]:.2f} s",
                  flush=True)
    finally:
        load.finish()
        cluster.stop()
    ms = sorted(f * 1000 for f in failovers)
    summary = {
        "kills": len(ms), "failover_ms": [round(x, 1) for x in ms],
        "failover_median_ms": round(statistics.median(ms), 1),
        "failover_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "failover_max_ms": round(ms[-1], 1),
        "process_start_to_ready_s_median": round(statistics.median(ready_s), 3),
        "process_start_to_ready_s_max": round(max(ready_s), 3),
        "cluster_launch_to_first_reply_s": round(first_reply, 3),
        "cluster_launch_to_full_speed_s": round(full_speed, 3) if full_speed else None,
        "steady_ops_per_s": round(steady), "clients": args.clients,
        "bytecode_precompiled": not args.no_precompile,
        "targets": {"failover_median_ms": 300, "failover_p99_ms": 1000, "start_to_full_speed_s": 1},
    }
    (args.out / "failover.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
