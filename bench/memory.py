# Replica memory under a long run, with real processes and default settings:
#
#   python -m bench.memory --out results/memory [--requests 1000000] [--clients 64] [-- SMRD FLAGS...]
#
# Three replicas beside the hashmap app and one gateway, all on smrd's defaults (line framing,
# durability fsync, no snapshot hooks), put-only load of 64-byte values from --clients closed-loop
# clients through the gateway in rounds of 30 s until every replica executed --requests (1 M
# takes 90-150 s on the 2-core machine; at most --max-seconds). Every 5 s each replica's RSS is
# sampled. The target (docs/benchmarks.md): a replica's RSS at most
# 60 MB after 1 M requests. Flags after `--` go to every replica and the gateway, e.g.
# `-- --log-memory-bytes 64MiB` to measure another budget.
# Prints a summary and writes OUT/memory.json. Also reports the other load on the machine.
import argparse
import json
import os
import threading
import time
from pathlib import Path

import psutil

from smrd.ops.local import LocalCluster

from . import loadgen
from .out_dir import make_out_dir
from .systems import smrd_base_port

SAMPLE_S = 5.0
ROUND_S = 30.0


def measure_memory(cluster_dir, requests=1_000_000, clients=64, max_seconds=600.0, flags=()):
    """Run the put-only load until each replica executed `requests` (or max_seconds passed);
    returns the replicas' RSS at the end and over time, with the throughput."""
    cluster = LocalCluster(3, 1, "line", smrd_base_port(), Path(cluster_dir), extra_args=list(flags))
    samples = []
    stop = threading.Event()

    def sample():
        started = time.monotonic()
        while not stop.wait(SAMPLE_S):
            try:
                rss = [round(psutil.Process(s.proc.pid).memory_info().rss / 2**20, 1)
                       for s in cluster.servers]
            except psutil.Error:
                continue  # a replica restarting: the next sample sees it
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": rss})

    load_before = os.getloadavg()
    try:
        cluster.start()  # inside: a process that fails to start must not leave the others running
        cluster.leader()
        threading.Thread(target=sample, daemon=True).start()
        started = time.monotonic()
        ops = errors = executed = 0
        window = 0.0
        while executed < requests and time.monotonic() - started < max_seconds:
            result = loadgen.run_load(ports=[cluster.gateway_port(0)], framing="line",
                                      clients=clients, seconds=ROUND_S, mix="put")
            ops += result["ops"]
            window += result["seconds"]
            errors += result["errors"]
            executed = min(cluster.status(i)["requests_executed"] for i in range(3))
        elapsed = time.monotonic() - started
        stop.set()
        status = [cluster.status(i) for i in range(3)]
    finally:
        stop.set()
        cluster.stop()
    return {
        "smrd_flags": list(flags), "clients": clients, "requests_wanted": requests,
        "requests": min(s["requests_executed"] for s in status), "seconds": round(elapsed, 1),
        "ops_per_s": round(ops / window) if window else 0, "errors": errors,
        "rss_mb_final": [round(s["rss_bytes"] / 2**20, 1) for s in status],
        "rss_mb_max": max(max(x["rss_mb"]) for x in samples) if samples else None,
        "samples": samples, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.memory",
                                 description="Replica RSS after a long put-only run (docs/benchmarks.md)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=1_000_000, help="run until each replica executed this many")
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("smrd_flags", nargs="*", help="after --: flags for every smrd process")
    args = ap.parse_args(argv)
    make_out_dir(ap, args.out)
    out = measure_memory(args.out / "_cluster", args.requests, args.clients, args.max_seconds,
                         args.smrd_flags)
    (args.out / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{out['requests']:,} requests executed per replica in {out['seconds']:.0f} s at "
          f"{out['ops_per_s']:,} ops/s ({out['errors']} errors); replica RSS at the end "
          f"{out['rss_mb_final']} MB, at most {out['rss_mb_max']} MB; load average before "
          f"{out['loadavg_before'][0]:.2f}")
    print(f"wrote {args.out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
