# One client, one request at a time: where its time goes, hop by hop, and how it compares with
# the floor of smrd's own hops and with one fsync, all measured in the same run.
#
#   python -m bench.latency --out results/latency [--requests 3000] [--only tmpfs,disk]
#                           [--tmpfs /dev/shm] [--disk DIR] [--no-floor]
#
# For each storage (write-ahead logs on tmpfs, then on disk) a local cluster (three replicas beside
# the hashmap app, one gateway, default settings: line framing, durability fsync) runs with
# SMRD_TRACE set, so that every process stamps each request at each hop (smrd/ops/trace.py); one
# closed-loop client sends PUTs of 64-byte values, one at a time. Afterwards the stamps are joined
# per request (CLOCK_MONOTONIC is one clock for the whole machine) into a table of hops with the
# median µs of each. Beside it, in the same run:
#   - the 8-hop floor (bench.hop_floor.measure_chain: five blocking Python processes relay a
#     message along smrd's critical path); target 1 is PUT p50 (tmpfs) <= 2.0 x that floor;
#   - one fsync of a small append in the disk directory, the way the write-ahead log syncs;
#     target 2 is p50(disk) - p50(tmpfs) <= 1.5 x that fsync.
# Prints the tables and the targets; writes OUT/latency.json. Reports the other load too.
import argparse
import json
import os
import shutil
import socket
import statistics
import time
from pathlib import Path

import psutil

from smrd.ops.local import LocalCluster

from .hop_floor import measure_chain
from .out_dir import make_out_dir
from .systems import smrd_base_port

WARMUP = 300
VALUE = b"v" * 64

# (label, from (process, event), to (process, event)); process: C client, G gateway, L leader,
# F the follower whose ACCEPTED reached the leader first. Consecutive rows chain, so their
# medians add up to about the median of the whole; the leader's own fsync overlaps (not chained).
HOPS = [
    ("client -> gateway (TCP), gateway reads the request", ("C", "send"), ("G", "gw_read")),
    ("gateway: call made, frame sent", ("G", "gw_read"), ("G", "gw_send")),
    ("gateway -> leader (ZeroMQ)", ("G", "gw_send"), ("L", "r_recv")),
    ("leader: step, write own accept, PROPOSE sent", ("L", "r_recv"), ("L", "propose")),
    ("leader -> follower (ZeroMQ)", ("L", "propose"), ("F", "propose_recv")),
    ("follower: step, write, fsync", ("F", "propose_recv"), ("F", "persisted")),
    ("follower: ACCEPTED sent", ("F", "persisted"), ("F", "accepted_sent")),
    ("follower -> leader (ZeroMQ)", ("F", "accepted_sent"), ("L", "accepted_recv")),
    ("leader: ACCEPTED counted, decided", ("L", "accepted_recv"), ("L", "decided")),
    ("leader: decided -> written to the app", ("L", "decided"), ("L", "app_write")),
    ("leader -> app -> leader (TCP), app executes", ("L", "app_write"), ("L", "app_reply")),
    ("leader: reply sent", ("L", "app_reply"), ("L", "reply_send")),
    ("leader -> gateway (ZeroMQ)", ("L", "reply_send"), ("G", "gw_reply")),
    ("gateway: reply matched, written", ("G", "gw_reply"), ("G", "gw_write")),
    ("gateway -> client (TCP)", ("G", "gw_write"), ("C", "recv")),
]
OVERLAP = ("leader: its own fsync (overlaps the follower round)", ("L", "propose"), ("L", "persisted"))


def _load_traces(trace_dir):
    """{process name: {(event, key): first t_ns}}, the gateway's gw_read keys in order, and each
    request's instance (what its `planned` stamps carry)."""
    procs, order, instances = {}, [], {}
    for path in sorted(Path(trace_dir).glob("*.trace.jsonl")):
        name = path.name.rsplit("-", 1)[0]
        stamps = procs.setdefault(name, {})
        for line in path.read_text().splitlines():
            t, event, key, extra = json.loads(line)
            key = tuple(key) if isinstance(key, list) else key
            if event == "accepted_recv":
                stamps.setdefault(("accepted_from", key), extra)
            stamps.setdefault((event, key), t)
            if event == "gw_read":
                order.append(key)
            elif event == "planned":
                instances.setdefault(key, extra)
    return procs, order, instances


def join(trace_dir, client_stamps, skip=0):
    """Per request after the first `skip`: {(process, event): t_ns}, the leader's and the quorum
    follower's stamps found through the request's instance (the gateway reads the client's
    requests in the order it sent them)."""
    procs, order, instances = _load_traces(trace_dir)
    gateway = next(v for k, v in procs.items() if k.startswith("gateway"))
    replicas = {int(k.split("-")[1]): v for k, v in procs.items() if k.startswith("replica")}
    rows = []
    for i, (sent, received) in enumerate(client_stamps):
        if i < skip or i >= len(order):
            continue
        key = order[i]
        instance = instances.get(key)
        leader = next((r for r, s in replicas.items() if ("propose", instance) in s), None)
        if instance is None or leader is None:
            continue
        lead = replicas[leader]
        follower = lead.get(("accepted_from", instance))
        row = {("C", "send"): sent, ("C", "recv"): received}
        for event in ("gw_read", "gw_send", "gw_reply", "gw_write"):
            row[("G", event)] = gateway.get((event, key))
        for event in ("r_recv", "app_write", "app_reply", "reply_send"):
            row[("L", event)] = lead.get((event, key))
        for event in ("propose", "persisted", "accepted_recv", "decided"):
            row[("L", event)] = lead.get((event, instance))
        if follower in replicas:
            for event in ("propose_recv", "persisted", "accepted_sent"):
                row[("F", event)] = replicas[follower].get((event, instance))
        rows.append(row)
    return rows


def hop_table(rows):
    table = []
    for label, a, b in HOPS + [OVERLAP]:
        deltas = [(r[b] - r[a]) / 1000 for r in rows if r.get(a) is not None and r.get(b) is not None]
        table.append({"hop": label, "median_us": round(statistics.median(deltas), 1) if deltas else None,
                      "samples": len(deltas), "overlapped": (label, a, b) == OVERLAP})
    return table


def _one_client(port, requests):
    """(send_ns, recv_ns) per request."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")
    stamps = []
    now = time.monotonic_ns
    try:
        for i in range(requests):
            line = b"PUT k%d %s\n" % (i % 1000, VALUE)
            t0 = now()
            sock.sendall(line)
            reply = f.readline()
            t1 = now()
            if not reply.endswith(b"\n") or reply.startswith(b"ERR"):
                raise RuntimeError(f"request {i}: unexpected reply {reply[:80]!r}")
            stamps.append((t0, t1))
    finally:
        f.close()
        sock.close()
    return stamps


def measure_storage(base_dir, requests, keep=None):
    """Run one traced cluster with its data in base_dir; returns latencies and the hop table."""
    cluster_dir = Path(base_dir) / "smrd-latency"
    shutil.rmtree(cluster_dir, ignore_errors=True)
    trace_dir = cluster_dir / "trace"
    os.environ["SMRD_TRACE"] = str(trace_dir)
    try:
        cluster = LocalCluster(3, 1, "line", smrd_base_port(), cluster_dir)
    finally:
        del os.environ["SMRD_TRACE"]
    try:
        cluster.start()  # inside: a process that fails to start must not leave the others running
        leader = cluster.leader()
        procs = {f"replica-{i}" + (" (leader)" if i == leader else ""): psutil.Process(c.proc.pid)
                 for i, c in enumerate(cluster.servers)}
        procs.update({f"app-{i}": psutil.Process(c.proc.pid) for i, c in enumerate(cluster.apps)})
        procs["gateway"] = psutil.Process(cluster.gateways[0].proc.pid)
        stamps = _one_client(cluster.gateway_port(0), WARMUP)
        before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        stamps += _one_client(cluster.gateway_port(0), requests)
        cpu = {k: round((sum(p.cpu_times()[:2]) - before[k]) * 1e6 / requests, 1)
               for k, p in procs.items()}
    finally:
        cluster.stop()  # each process writes its stamps as it exits
    rows = join(trace_dir, stamps, WARMUP)
    if keep is None:
        shutil.rmtree(cluster_dir, ignore_errors=True)
    latencies = sorted((b - a) / 1000 for a, b in stamps[WARMUP:])
    return {"p50_us": round(statistics.median(latencies), 1),
            "p90_us": round(latencies[int(0.9 * len(latencies))], 1),
            "p99_us": round(latencies[int(0.99 * len(latencies))], 1),
            "ops_per_s": round(1e6 / statistics.mean(latencies)),
            "traced_requests": len(rows), "hops": hop_table(rows), "cpu_us_per_request": cpu}


def _fsyncs(path, count):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        times = []
        for _ in range(count):
            os.write(fd, b"x" * 128)
            t0 = time.perf_counter_ns()
            os.fsync(fd)
            times.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return times


def measure_fsync(directory, count=300):
    """Median µs of appending 128 bytes and fsyncing, as the write-ahead log does per burst."""
    return round(statistics.median(_fsyncs(Path(directory) / "fsync-probe", count)), 1)


def measure_fsync_concurrent(directory, writers=3, count=300):
    """The same with `writers` processes fsyncing their own files in the directory at once, as
    the three replicas of a local cluster do on one disk (their fsyncs share one journal)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    paths = [Path(directory) / f"fsync-probe-{i}" for i in range(writers)]
    with ctx.Pool(writers) as pool:
        runs = pool.starmap(_fsyncs, [(p, count) for p in paths])
    return round(statistics.median(t for run in runs for t in run), 1)


def _print_hops(title, result):
    print(f"\n{title}: p50 {result['p50_us']:,.0f} µs, p90 {result['p90_us']:,.0f}, "
          f"p99 {result['p99_us']:,.0f} ({result['ops_per_s']:,} ops/s; "
          f"{result['traced_requests']} requests traced)")
    width = max(len(h["hop"]) for h in result["hops"])
    chained = 0.0
    for h in result["hops"]:
        value = "-" if h["median_us"] is None else f"{h['median_us']:8.1f}"
        print(f"  {h['hop']:<{width}}  {value} µs" + ("  (overlapped)" if h["overlapped"] else ""))
        if not h["overlapped"] and h["median_us"] is not None:
            chained += h["median_us"]
    print(f"  {'sum of the chained medians':<{width}}  {chained:8.1f} µs")
    print("  CPU per request: " + ", ".join(f"{k} {v:.0f} µs" for k, v in result["cpu_us_per_request"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.latency",
                                 description="One client's latency, hop by hop, against the 8-hop "
                                             "floor and one fsync (docs/benchmarks.md)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per storage (after 300 untimed)")
    ap.add_argument("--only", default="tmpfs,disk", help="tmpfs, disk or both (default)")
    ap.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--disk", type=Path, help="where the disk run keeps its data (default OUT/_disk)")
    ap.add_argument("--no-floor", action="store_true", help="skip the 8-hop floor")
    args = ap.parse_args(argv)
    make_out_dir(ap, args.out)
    storages = [s for s in args.only.split(",") if s]
    if not storages or set(storages) - {"tmpfs", "disk"}:
        ap.error("--only takes tmpfs, disk or tmpfs,disk")
    disk = args.disk or args.out / "_disk"
    disk.mkdir(parents=True, exist_ok=True)
    out = {"requests": args.requests, "loadavg_before": os.getloadavg()}
    cpu = psutil.cpu_percent(interval=1.0)
    out["other_cpu_percent_before"] = cpu
    print(f"load average {out['loadavg_before'][0]:.2f}, CPU busy {cpu:.0f}% before the run")
    if not args.no_floor:
        out["floor"] = measure_chain(5000)
        print(f"8-hop floor (five blocking processes along smrd's path): p50 "
              f"{out['floor']['chain_p50_us']:.0f} µs")
    for storage in storages:
        where = args.tmpfs if storage == "tmpfs" else disk
        out[storage] = measure_storage(where, args.requests)
        out[storage]["fsync_us"] = measure_fsync(where)
        out[storage]["fsync_3_concurrent_us"] = measure_fsync_concurrent(where)
        _print_hops(f"logs on {storage} ({where}; one fsync there: {out[storage]['fsync_us']:.0f} µs, "
                    f"three processes fsyncing at once: {out[storage]['fsync_3_concurrent_us']:.0f} "
                    "µs each)", out[storage])
    out["targets"] = targets(out)
    out["loadavg_after"] = os.getloadavg()
    print()
    for t in out["targets"]:
        print(f"{t['name']}: {t['measured']} (target {t['target']}) {'MET' if t['met'] else 'not met'}")
    (args.out / "latency.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out / 'latency.json'}")
    return 0


def targets(out):
    rows = []
    if "floor" in out and "tmpfs" in out:
        ratio = out["tmpfs"]["p50_us"] / out["floor"]["chain_p50_us"]
        rows.append({"name": "one client, PUT p50 (tmpfs) / 8-hop floor", "measured": f"{ratio:.2f}x "
                     f"({out['tmpfs']['p50_us']:.0f} / {out['floor']['chain_p50_us']:.0f} µs)",
                     "target": "<= 2.0x", "met": ratio <= 2.0, "ratio": round(ratio, 3)})
    if "tmpfs" in out and "disk" in out:
        extra = out["disk"]["p50_us"] - out["tmpfs"]["p50_us"]
        fsync = out["disk"]["fsync_us"]
        rows.append({"name": "logs on disk: p50(disk) - p50(tmpfs) in fsyncs", "measured":
                     f"{extra / fsync:.2f} fsyncs ({extra:.0f} µs; one fsync {fsync:.0f} µs)",
                     "target": "<= 1.5", "met": extra <= 1.5 * fsync, "ratio": round(extra / fsync, 3)})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
