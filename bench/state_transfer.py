# How fast a replica with an empty disk gets the cluster's state back, with real processes:
#
#   python -m bench.state_transfer --out results/state-transfer            # 1 GB log + a checkpoint
#   python -m bench.state_transfer --log-mb 64 --state-mb 8 --out /tmp/st  # a quick look
#
# log:        no snapshot hooks (the no-op app): the cluster orders --log-mb of 512 KiB requests,
#             then one follower loses its disk and restarts; it recovers and catches up the whole
#             log from its peers. Rate = log bytes / (restart -> executed everything).
# checkpoint: the hashmap with its snapshot hooks: --state-mb of state, a checkpoint, then a
#             follower loses its disk; it fetches the checkpoint (chunks, sha256, f+1 peers) and
#             restores its app. Measured unthrottled and at the default state_transfer_rate_mb.
# Prints the numbers and writes OUT/state_transfer.json. Also records the peak RSS of the
# replica catching up and of the replicas serving it.
import argparse
import base64
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from smrd.ops.local import LocalCluster

from .out_dir import make_out_dir
from .systems import smrd_base_port

PY = sys.executable
REQUEST_BYTES = 512 << 10



def _fill(port, requests, make, clients=4):
    """Closed-loop line clients through the gateway; returns bytes sent."""
    sent = [0] * clients

    def run(c):
        with socket.create_connection(("127.0.0.1", port)) as s:
            f = s.makefile("rb")
            for k in range(c, requests, clients):
                line = make(k)
                s.sendall(line + b"\n")
                reply = f.readline()
                if not reply or reply.startswith(b"ERR"):
                    raise SystemExit(f"request {k} failed: {reply[:100]!r}")
                sent[c] += len(line)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(sent)


class _PeakRss(threading.Thread):
    def __init__(self, pids):
        super().__init__(daemon=True)
        self.procs = {p: psutil.Process(p) for p in pids}
        self.peak = {p: 0 for p in pids}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):  # a sampler: there is no event for "memory grew"
            for pid, proc in self.procs.items():
                try:
                    self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
                except psutil.Error:
                    pass


def _wipe_and_time(cluster, victim, log_line=None):
    leader = cluster.leader()
    target = cluster.status(leader)["commit"]
    cluster.kill_replica(victim)
    shutil.rmtree(cluster.dir / f"replica-{victim}")
    started = time.monotonic()
    cluster.start_replica(victim)
    serving = [cluster.servers[i].proc.pid for i in range(cluster.n) if i != victim]
    sampler = _PeakRss([cluster.servers[victim].proc.pid, *serving])
    sampler.start()
    while True:
        st = cluster.status(victim)
        if st and st.get("executed", 0) >= target and st["status"] == "normal":
            break
        if time.monotonic() - started > 900:
            raise SystemExit(f"replica {victim} did not catch up in 900 s: {st}")
        time.sleep(0.05)  # polling another process's status: no event to wait on
    elapsed = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    out = {"seconds": round(elapsed, 3), "commit": target,
           "rss_mb_catching_up": round(sampler.peak[cluster.servers[victim].proc.pid] / 1e6, 1),
           "rss_mb_serving_max": round(max(sampler.peak[p] for p in serving) / 1e6, 1)}
    if log_line:
        line = cluster.servers[victim].wait_for(log_line, 10)
        m = re.search(r"bytes=(\d+) seconds=([\d.]+) rate_mb_s=([\d.]+)", line)
        if m:
            out.update(transfer_bytes=int(m.group(1)), transfer_seconds=float(m.group(2)),
                       transfer_rate_mb_s=float(m.group(3)))
    return out


def bench_log(log_mb, work):
    requests = max(1, log_mb * (1 << 20) // REQUEST_BYTES)
    cluster = LocalCluster(
        3, 1, "line", smrd_base_port(), work / "log", durability="fsync",
        app_command=lambda i, port: [PY, "-m", "smrd.apps.noop", "--host", "127.0.0.1",
                                     "--port", str(port), "--max-request", str(2 << 20)])
    try:
        cluster.start()
        t = time.monotonic()
        sent = _fill(cluster.gateway_port(0), requests,
                     lambda k: b"%08d" % k + b"x" * (REQUEST_BYTES - 9))
        fill_s = time.monotonic() - t
        victim = next(i for i in range(3) if i != cluster.leader())
        r = _wipe_and_time(cluster, victim)
        r.update(mode="log", log_bytes=sent, requests=requests, fill_seconds=round(fill_s, 2),
                 rate_mb_s=round(sent / r["seconds"] / 1e6, 1))
        return r
    finally:
        cluster.stop()


def bench_checkpoint(state_mb, rate_mb, work):
    value = 256 << 10
    keys = max(1, state_mb * (1 << 20) // value)
    settings = {"snapshot_request": "SNAPSHOT", "restore_request": "RESTORE {state}",
                "checkpoint_every": keys, "state_transfer_rate_mb": rate_mb,
                "max_request_bytes": 1 << 20, "log_segment_bytes": 4 << 20}
    big = str(4 << 30)
    cluster = LocalCluster(
        3, 1, "line", smrd_base_port(), work / f"checkpoint-{rate_mb}", durability="fsync",
        settings=settings,
        app_command=lambda i, port: [PY, "-m", "smrd.apps.hashmap", "--host", "127.0.0.1",
                                     "--port", str(port), "--framing", "line", "--max-request", big])
    try:
        cluster.start()
        # Twice over the same keys: two checkpoints, so the peers' logs no longer reach back to
        # instance 1 (one checkpoint's worth of log is kept) and only a state transfer will do.
        for _ in range(2):  # random values (base64): a state zstd cannot shrink to nothing
            sent = _fill(cluster.gateway_port(0), keys,
                         lambda k: b"PUT k%06d " % k + base64.b64encode(os.urandom(value * 3 // 4)))
        leader = cluster.leader()
        cluster.servers[leader].wait_for("event=log_truncated", 60)
        victim = next(i for i in range(3) if i != leader)
        cluster.servers[victim].wait_for("event=log_truncated", 60)
        r = _wipe_and_time(cluster, victim, "event=state_transfer_done")
        r.update(mode="checkpoint", state_bytes=sent, rate_limit_mb_s=rate_mb)
        return r
    finally:
        cluster.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.state_transfer", description="State-transfer rates: a wiped replica catches up a log (no hooks) or fetches a checkpoint (hooks).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log-mb", type=int, default=1024, help="log size for the no-hooks run (MiB)")
    ap.add_argument("--state-mb", type=int, default=40,
                    help="app state for the checkpoint runs (MiB; the snapshot, base64, must stay "
                         "under the app adapter's 64 MiB reply limit)")
    ap.add_argument("--work", type=Path, help="where the clusters' data live (default OUT/_work, on disk)")
    args = ap.parse_args(argv)
    make_out_dir(ap, args.out)
    work = args.work or args.out / "_work"
    shutil.rmtree(work, ignore_errors=True)
    results = []
    for name, run in (("log", lambda: bench_log(args.log_mb, work)),
                      ("checkpoint unthrottled", lambda: bench_checkpoint(args.state_mb, 100_000, work)),
                      ("checkpoint at the default 64 MB/s", lambda: bench_checkpoint(args.state_mb, 64, work))):
        print(f"{name} ...", flush=True)
        r = run()
        results.append(r)
        print(f"  {json.dumps(r)}", flush=True)
    (args.out / "state_transfer.json").write_text(json.dumps(
        {"results": results, "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out / 'state_transfer.json'}")


if __name__ == "__main__":
    main()
