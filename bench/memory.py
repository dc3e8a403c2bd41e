# Replica memory under a long run, with real processes and default settings:
#
#   python -m bench.memory --out results/memory [--seconds 150] [--clients 64] [-- SMRD FLAGS...]
#
# Three replicas beside the hashmap app and one gateway, all on smrd's defaults (line framing,
# durability fsync, no snapshot hooks), put-only load of 64-byte values from --clients closed-loop
# clients through the gateway for --seconds (150 s is about 1.2 M requests on the 2-core machine).
# Every 5 s each replica's RSS is sampled. The target (docs/benchmarks.md): a replica's RSS at most
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("smrd_flags", nargs="*", help="after --: flags for every smrd process")
    args = ap.parse_args(argv)
    make_out_dir(ap, args.out)
    load_before = os.getloadavg()
    cluster = LocalCluster(3, 1, "line", smrd_base_port(), args.out / "_cluster",
                           extra_args=args.smrd_flags)
    samples = []
    stop = threading.Event()

    def sample():
        started = time.monotonic()
        while not stop.wait(SAMPLE_S):
            rss = [round(psutil.Process(s.proc.pid).memory_info().rss / 2**20, 1)
                   for s in cluster.servers]
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": rss})

    cluster.start()
    try:
        cluster.leader()
        threading.Thread(target=sample, daemon=True).start()
        result = loadgen.run_load(ports=[cluster.gateway_port(0)], framing="line",
                                  clients=args.clients, seconds=args.seconds, mix="put")
        stop.set()
        status = [cluster.status(i) for i in range(3)]
    finally:
        stop.set()
        cluster.stop()
    out = {
        "smrd_flags": args.smrd_flags, "clients": args.clients, "seconds": args.seconds,
        "requests": status[0]["requests_executed"], "ops_per_s": result["ops_per_s"],
        "errors": result["errors"], "rss_mb_final": [round(s["rss_bytes"] / 2**20, 1) for s in status],
        "rss_mb_max": max(max(x["rss_mb"]) for x in samples) if samples else None,
        "samples": samples, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    (args.out / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{out['requests']:,} requests executed per replica at {out['ops_per_s']:,.0f} ops/s "
          f"({out['errors']} errors); replica RSS at the end {out['rss_mb_final']} MB, at most "
          f"{out['rss_mb_max']} MB; load average before {load_before[0]:.2f}")
    print(f"wrote {args.out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
