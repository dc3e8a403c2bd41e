# redis-benchmark against Redis alone and against Redis replicated by smrd, in the same run:
#
#   python -m bench.redis --out results/redis [--requests 20000] [--clients 16,64] [--repeats 2]
#
# Redis alone: one `redis-server --save '' --appendonly no`. Replicated: three such servers, each
# beside a replica (resp framing, default settings, logs under --tmpfs), and one gateway that
# redis-benchmark talks to. For each client count the two are measured in alternation (alone,
# replicated, alone, ...; --repeats pairs), SET and GET, no pipelining (-P 1), so each ratio
# compares runs seconds apart. After the runs the three servers' DEBUG DIGEST must be equal.
# Prints a table and writes OUT/redis.json; reports the other load on the machine.
import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median_high

from smrd.ops.local import Child, LocalCluster, ProcessFailed

from .out_dir import make_out_dir
from .systems import PortAllocator, _smrd_offsets

TESTS = ("SET", "GET")


class BenchFailed(RuntimeError):
    pass


def redis_argv(port):
    # As examples/redis runs it, plus DEBUG DIGEST (asked of each server directly, afterwards).
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--activerehashing", "no", "--enable-debug-command", "local"]


def redis_benchmark(port, clients, requests, tests=TESTS):
    """ops/s per test from one redis-benchmark run (its --csv output)."""
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
                          "-n", str(requests), "-t", ",".join(t.lower() for t in tests), "-P", "1",
                          "-r", "10000", "--csv"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise BenchFailed(f"redis-benchmark on port {port} failed: {out.stderr.strip()[-500:]}")
    rates = {}
    for line in out.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] in tests and len(cells) > 1:
            rates[cells[0]] = float(cells[1])
    if set(rates) != set(tests):
        raise BenchFailed(f"redis-benchmark printed no rate for {set(tests) - set(rates)}: "
                          f"{out.stdout[-500:]} {out.stderr[-500:]}")
    return rates


def digest(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "DEBUG", "DIGEST"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip()


def measure_redis(work: Path, clients=(16, 64), requests=20000, repeats=2):
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if shutil.which(tool) is None:
            raise BenchFailed(f"{tool} is not installed: bash scripts/install-system-tools.sh")
    work.mkdir(parents=True, exist_ok=True)
    ports = PortAllocator()  # one allocator: the blocks it hands out are all distinct
    alone_port = ports.base([0])
    alone = Child("redis-alone", redis_argv(alone_port), work / "redis-alone.log")
    cluster = LocalCluster(3, 1, "resp", ports.base(_smrd_offsets(3, 1)), work / "cluster",
                           app_command=lambda i, port: redis_argv(port), app_ready="port")
    load_before = os.getloadavg()
    runs = []
    try:
        alone.start().wait_port(alone_port)
        cluster.start()
        cluster.leader()
        gateway = cluster.gateway_port(0)
        for c in clients:
            for r in range(repeats):
                for system, port in (("alone", alone_port), ("smrd", gateway)):
                    started = time.monotonic()
                    rates = redis_benchmark(port, c, requests)
                    runs.append({"system": system, "clients": c, "repeat": r, "ops_per_s": rates,
                                 "seconds": round(time.monotonic() - started, 1)})
                    print(f"  {system:5s} {c:3d} clients: " + ", ".join(
                        f"{t} {v:,.0f} ops/s" for t, v in rates.items()), flush=True)
        digests = [digest(cluster.app_port(i)) for i in range(3)]
    except ProcessFailed as e:
        raise BenchFailed(str(e)) from None
    finally:
        cluster.stop()
        alone.stop()
    summary = []
    for c in clients:
        for t in TESTS:
            base = [x["ops_per_s"][t] for x in runs if x["system"] == "alone" and x["clients"] == c]
            ours = [x["ops_per_s"][t] for x in runs if x["system"] == "smrd" and x["clients"] == c]
            summary.append({"clients": c, "test": t, "alone_ops_per_s": median_high(base),
                            "smrd_ops_per_s": median_high(ours),
                            "ratio": median_high(ours) / median_high(base)})
    return {"requests_per_run": requests, "repeats": repeats, "runs": runs, "summary": summary,
            "digests": digests,
            "digests_equal": len(set(digests)) == 1 and len(digests[0]) == 40,  # 40 hex digits
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.redis", description=(
        "redis-benchmark against Redis alone and Redis replicated by smrd, same run (docs/benchmarks.md)"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=20000, help="requests per redis-benchmark run")
    ap.add_argument("--clients", default="16,64", help="comma-separated client counts")
    ap.add_argument("--repeats", type=int, default=2, help="alternating pairs per client count")
    ap.add_argument("--tmpfs", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                    help="where the replicas' logs live (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        ap.error(f"--clients {args.clients!r}: give comma-separated numbers, e.g. 16,64")
    make_out_dir(ap, args.out)
    work = Path(tempfile.mkdtemp(prefix="smrd-bench-redis-", dir=args.tmpfs))
    try:
        out = measure_redis(work, clients, args.requests, args.repeats)
    except BenchFailed as e:
        print(f"bench.redis: {e}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (args.out / "redis.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'clients':>7} {'test':>4} {'alone ops/s':>12} {'smrd ops/s':>11} {'ratio':>6}")
    for s in out["summary"]:
        print(f"{s['clients']:7d} {s['test']:>4} {s['alone_ops_per_s']:12,.0f} "
              f"{s['smrd_ops_per_s']:11,.0f} {s['ratio']:6.1%}")
    print(f"DEBUG DIGEST of the three replicated servers equal: {out['digests_equal']}; load "
          f"average before {out['loadavg_before'][0]:.2f}, after {out['loadavg_after'][0]:.2f}")
    print(f"wrote {args.out / 'redis.json'}")
    return 0 if out["digests_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
