# The paper's experiments and the side-by-side baselines, in one command:
#
#   python -m bench.experiments --profile quick --out results/quick     # a few minutes
#   python -m bench.experiments --profile full  --out results/full      # long
#
# Every smrd figure is taken beside a baseline measured in the same run (the unreplicated app,
# etcd 3.4, the no-op app), with the systems of a comparison up at the same time and measured in
# alternation, so that other load on the machine hits both sides alike; a comparison is the
# median over the repeated pairs. Writes DIR/results.json (every point, machine info, git
# commit), DIR/headline.md (the ratios and the speed targets) and PNG plots (bench/plots.py).
#
# Owns the plan (profiles, groups of systems measured together, their order) and the headline.
# Never: changes what a target measures to meet it; a target that is missed is printed as missed.
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import smrd
from bench.measure import measure
from bench.out_dir import make_out_dir
from bench.systems import DirectApp, EtcdCluster, PortAllocator, SmrdSystem, SystemFailed, ensure_etcd
from smrd import core

ROOT = Path(__file__).resolve().parents[1]

try:
    import matplotlib  # noqa: F401  (checked first: a long run must not end without its plots)
except ImportError:
    matplotlib = None

PROFILES = {
    "quick": {
        "seconds": 3.0, "warmup": 0.75, "repeats": 2,
        "clients": [1, 4, 16, 64], "gateways": [1, 2], "replicas": [3, 5],
        "replica_clients": [1, 16, 64], "close_clients": [16, 64],
        "etcd_clients": {"put": [64], "mixed": [64]}, "noop_clients": [1, 4, 16, 64],
        "durability_clients": [64], "latency_requests": 1000, "memory_requests": 1_000_000,
        "redis_requests": 20_000,
    },
    "full": {
        "seconds": 10.0, "warmup": 2.0, "repeats": 3,
        "clients": [1, 2, 4, 8, 16, 32, 64], "gateways": [1, 2, 4, 8, 16],
        "replicas": [3, 5, 7, 9, 11], "replica_clients": [1, 2, 4, 8, 16, 32, 64],
        "close_clients": [1, 2, 4, 8, 16, 32, 64],
        "etcd_clients": {"put": [1, 4, 16, 64], "mixed": [1, 4, 16, 64]},
        "noop_clients": [1, 4, 16, 64], "durability_clients": [16, 64],
        "latency_requests": 3000, "memory_requests": 1_000_000, "redis_requests": 100_000,
    },
}
HEADLINE_CLIENTS = 64

# The targets (n = 3, 64-byte values, 2-core machine). Checked, never adjusted.
TARGETS = {
    "line_vs_direct": 0.35, "close_vs_direct": 0.33, "put_vs_etcd": 2.0,
    "noop64_ops": 24_000, "noop64_replica_cpu_us": 40.0, "noop1_p50_us": 300.0,
    "replica_rss_mb": 60.0,
    # issue #17: one client vs the 8-hop floor; the disk's cost in fsyncs; close framing.
    "c1_put_vs_floor": 2.0, "disk_minus_tmpfs_fsyncs": 1.5, "close_vs_direct_17": 0.20,
    "close_replica_cpu_us": 200.0,
    # issue #19: CURVE on costs line framing at 64 clients at most 20 %.
    "curve_vs_plain": 0.80,
}
# Measured by their own functions rather than as load points: one client hop by hop beside the
# 8-hop floor and an fsync (bench.latency), replica RSS after 1 M requests (bench.memory), and
# redis-benchmark against Redis alone and replicated (bench.redis).
SPECIAL_GROUPS = ("latency", "memory", "redis")


@dataclass
class Run:
    system: str
    clients: int
    mix: str
    repeat: int = 0


@dataclass
class Group:
    """Systems that are up together and the runs made against them, in order."""
    name: str
    systems: dict            # key -> factory(ctx) returning an unstarted system
    runs: list = field(default_factory=list)


def alternate(keys, clients, mix, repeats_at=(), repeats=1):
    """Runs that take turns between the systems at each client count; at the counts in
    repeats_at the round is repeated `repeats` times (the pairs the headline takes medians of)."""
    runs = []
    for c in clients:
        for r in range(repeats if c in repeats_at else 1):
            order = keys if r % 2 == 0 else keys[::-1]  # A B, then B A: drift hits both alike
            runs += [Run(k, c, mix, r) for k in order]
    return runs


def plan(p, with_etcd):
    def smrd_system(**kw):
        return lambda ctx, kw=kw: SmrdSystem(**ctx.smrd_kwargs(kw), **kw)

    def direct(**kw):
        return lambda ctx, kw=kw: DirectApp(log_dir=ctx.log_dir, **kw)

    top = max(p["clients"])
    rep = p["repeats"]
    groups = [
        Group("line", {"direct": direct(framing="line"), "smrd": smrd_system(framing="line")},
              alternate(["direct", "smrd"], p["clients"], "mixed", [top], rep)),
        Group("close", {"direct": direct(framing="close"), "smrd": smrd_system(framing="close")},
              alternate(["direct", "smrd"], p["close_clients"], "mixed", [max(p["close_clients"])], rep)),
    ]
    if with_etcd:
        runs = []
        for mix, clients in p["etcd_clients"].items():
            runs += alternate(["etcd", "smrd"], clients, mix, [HEADLINE_CLIENTS] if mix == "put" else [], rep)
        groups.append(Group("etcd", {"etcd": lambda ctx: EtcdCluster(
            members=3, data_dir=ctx.tmpfs / "etcd", log_dir=ctx.log_dir / "etcd", ports=ctx.ports),
            "smrd": smrd_system(framing="line")}, runs))
    groups.append(Group("curve", {"plain": smrd_system(framing="line"),
                                  "curve": smrd_system(framing="line", curve=True)},
                        alternate(["plain", "curve"], [top], "mixed", [top], rep)))
    noop = p["noop_clients"]
    groups.append(Group("noop", {"direct": direct(framing="line", app="noop"),
                                 "smrd": smrd_system(framing="line", app="noop")},
                        alternate(["direct", "smrd"], noop, "noop", [min(noop), max(noop)], rep)))
    groups.append(Group("durability", {
        "fsync-tmpfs": smrd_system(durability="fsync", storage="tmpfs"),
        "fsync-disk": smrd_system(durability="fsync", storage="disk"),
        "memory": smrd_system(durability="memory", storage="tmpfs")},
        alternate(["fsync-tmpfs", "fsync-disk", "memory"], p["durability_clients"], "mixed",
                  [max(p["durability_clients"])], rep)))
    for g in p["gateways"]:
        if g != 1:  # gateways = 1 is the "line" group's smrd
            groups.append(Group(f"gateways-{g}", {"smrd": smrd_system(gateways=g)},
                                alternate(["smrd"], p["clients"], "mixed")))
    for n in p["replicas"]:
        if n != 3:  # replicas = 3 is the "line" group's smrd
            groups.append(Group(f"replicas-{n}", {"smrd": smrd_system(replicas=n)},
                                alternate(["smrd"], p["replica_clients"], "mixed")))
    return groups


class Context:
    def __init__(self, out, tmpfs_root, disk_root):
        self.log_dir = out / "logs"
        self.tmpfs = Path(tempfile.mkdtemp(prefix="smrd-bench-", dir=tmpfs_root))
        self.disk = Path(tempfile.mkdtemp(prefix="smrd-bench-", dir=disk_root))
        self.ports = PortAllocator()
        self.count = 0

    def smrd_kwargs(self, kw):
        self.count += 1
        name = f"smrd-{self.count}"
        root = self.disk if kw.get("storage") == "disk" else self.tmpfs
        return {"data_dir": root / name, "log_dir": self.log_dir / name, "ports": self.ports}

    def cleanup(self):
        shutil.rmtree(self.tmpfs, ignore_errors=True)
        shutil.rmtree(self.disk, ignore_errors=True)


# ------------------------------------------------------------------ machine and build info

def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(), "platform": platform.platform(), "cpu_model": model,
        "cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "smrd_version": getattr(smrd, "__version__", "?"),
        "smrd_core": core.IMPLEMENTATION,
        "smrd_no_extensions": os.environ.get("SMRD_NO_EXTENSIONS", ""),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
        "loadavg_start": os.getloadavg(),
    }


# ------------------------------------------------------------------ the run

class Progress:
    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def line(self, text):
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0
        return (f"[{self.done:3d}/{self.total} {100 * self.done // max(1, self.total):3d}% "
                f"{int(elapsed) // 60}:{int(elapsed) % 60:02d} eta {int(eta) // 60}:{int(eta) % 60:02d}] {text}")


def fmt_point(pt):
    cpu = pt["cpu_us_per_op"]
    main = cpu.get("smrd", cpu.get("server"))
    lat = pt["latency_us"]
    return (f"{pt['ops_per_s']:>9,.0f} ops/s  mean {lat['trimmed_mean'] / 1000:6.2f} ms  "
            f"p50 {lat['p50'] / 1000:6.2f} ms  p99 {lat['p99'] / 1000:6.2f} ms  "
            f"{'smrd' if 'smrd' in cpu else 'server'} {main or 0:5.0f} µs/op  "
            f"loadgen {pt['cores']['loadgen']:.2f} cores  other {pt['cores']['other']:.2f} cores"
            + (f"  errors {pt['errors']}" if pt["errors"] else ""))


def run_groups(groups, prof, ctx, args, results, save):
    progress = Progress(sum(len(g.runs) for g in groups))
    for group in groups:
        systems = {}
        try:
            for key, factory in group.systems.items():
                print(progress.line(f"{group.name}: starting {key}"), file=sys.stderr, flush=True)
                systems[key] = factory(ctx).start()
            results["groups"][group.name] = {k: {**s.config, "startup_s": s.startup_s}
                                             for k, s in systems.items()}
            for run in group.runs:
                system = systems[run.system]
                label = f"{group.name}: {run.system} c={run.clients} {run.mix}" + (
                    f" (repeat {run.repeat + 1})" if run.repeat else "")
                print(progress.line(label + " ..."), file=sys.stderr, flush=True)
                pt = measure_point(system, run, prof, args)
                pt.update({"group": group.name, "key": run.system, "repeat": run.repeat,
                           **{k: v for k, v in system.config.items() if k != "system"},
                           "system": system.config["system"], "at": time.time()})
                results["points"].append(pt)
                progress.done += 1
                print(progress.line(f"{label}: {fmt_point(pt)}"), file=sys.stderr, flush=True)
        except Exception as e:  # one group failing must not lose the others
            progress.done += len(group.runs) - sum(1 for p in results["points"] if p["group"] == group.name)
            results["failures"].append({"group": group.name, "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]})
            print(f"group {group.name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            for s in systems.values():
                s.stop()
            save()


def run_special(names, prof, ctx, results, save):
    from bench import latency, memory, redis
    for name in names:
        print(f"{name}: measuring (bench.{name})", file=sys.stderr, flush=True)
        try:
            if name == "latency":
                out = {"floor": latency.measure_chain(5000)}
                for storage, root in (("tmpfs", ctx.tmpfs), ("disk", ctx.disk)):
                    out[storage] = latency.measure_storage(root, prof["latency_requests"])
                    out[storage]["fsync_us"] = latency.measure_fsync(root)
                results["latency"] = out
            elif name == "memory":
                results["memory"] = memory.measure_memory(ctx.tmpfs / "memory", prof["memory_requests"])
            else:
                results["redis"] = redis.measure_redis(ctx.tmpfs / "redis", (16, 64),
                                                       prof["redis_requests"], prof["repeats"])
        except Exception as e:
            results["failures"].append({"group": name, "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]})
            print(f"group {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        save()


def measure_point(system, run, prof, args):
    return measure(system, clients=run.clients, mix=run.mix, seconds=prof["seconds"],
                   warmup=prof["warmup"], procs=args.loadgen_procs)


# ------------------------------------------------------------------ headline

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _points(results, group, key, clients=None, mix=None):
    return [p for p in results["points"] if p["group"] == group and p["key"] == key
            and (clients is None or p["clients"] == clients) and (mix is None or p["mix"] == mix)]


def paired(results, group, base_key, key, clients, mix):
    """(median ops of key, median ops of base, median of the per-repeat ratios key/base)."""
    a = {p["repeat"]: p for p in _points(results, group, base_key, clients, mix)}
    b = {p["repeat"]: p for p in _points(results, group, key, clients, mix)}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    ratios = [b[r]["ops_per_s"] / a[r]["ops_per_s"] for r in common if a[r]["ops_per_s"]]
    return {"ops": _median([b[r]["ops_per_s"] for r in common]),
            "base_ops": _median([a[r]["ops_per_s"] for r in common]),
            "ratio": _median(ratios), "ratios": [round(x, 3) for x in ratios],
            "cpu": _median([b[r]["cpu_us_per_op"].get("smrd") for r in common]),
            "replica_cpu": _median([b[r]["cpu_us_per_op"].get("replica") for r in common]),
            "gateway_cpu": _median([b[r]["cpu_us_per_op"].get("gateway") for r in common]),
            "base_cpu": _median([a[r]["cpu_us_per_op"].get("server") for r in common]),
            "loadgen_us": (_median([b[r]["loadgen"]["cpu_us_per_op"] for r in common]),
                           _median([a[r]["loadgen"]["cpu_us_per_op"] for r in common]))}


def headline(results):
    rows = []

    def row(what, smrd, base, ratio, target, met, note=""):
        rows.append({"what": what, "smrd": smrd, "baseline": base, "ratio": ratio,
                     "target": target, "met": met, "note": note})

    c = HEADLINE_CLIENTS
    for group, label, target in (("line", "line", TARGETS["line_vs_direct"]),
                                 ("close", "close", TARGETS["close_vs_direct"])):
        pr = paired(results, group, "direct", "smrd", c, "mixed")
        if pr:
            row(f"hashmap {label}, {c} clients, 50/50: smrd (3 replicas, 1 gateway) vs unreplicated app",
                f"{pr['ops']:,.0f} ops/s, smrd {pr['cpu']:.0f} µs/op (replicas {pr['replica_cpu']:.0f} "
                f"+ gateway {pr['gateway_cpu']:.0f})",
                f"{pr['base_ops']:,.0f} ops/s, app {pr['base_cpu']:.0f} µs/op",
                f"{pr['ratio']:.1%}", f"≥ {target:.0%}", pr["ratio"] >= target,
                f"pairs {pr['ratios']}; loadgen µs/op {pr['loadgen_us'][0]:.0f}/{pr['loadgen_us'][1]:.0f}")
    for mix, target in (("put", TARGETS["put_vs_etcd"]), ("mixed", None)):
        pr = paired(results, "etcd", "etcd", "smrd", c, mix)
        if pr:
            row(f"{'put-only' if mix == 'put' else '50/50 put/get'}, {c} clients: smrd line vs etcd 3.4 (3 members, tmpfs)",
                f"{pr['ops']:,.0f} ops/s, smrd {pr['cpu']:.0f} µs/op",
                f"{pr['base_ops']:,.0f} ops/s, etcd {pr['base_cpu']:.0f} µs/op",
                f"{pr['ratio']:.2f}×", f"≥ {target:.0f}×" if target else "-",
                (pr["ratio"] >= target) if target else None,
                f"pairs {pr['ratios']}; loadgen µs/op {pr['loadgen_us'][0]:.0f}/{pr['loadgen_us'][1]:.0f}")
    noop = sorted({p["clients"] for p in results["points"] if p["group"] == "noop"})
    for n in noop:
        s = _points(results, "noop", "smrd", n)
        d = _points(results, "noop", "direct", n)
        ops = _median([p["ops_per_s"] for p in s])
        p50 = _median([p["latency_us"]["p50"] for p in s])
        rcpu = _median([p["cpu_us_per_op"].get("replica") for p in s])
        gcpu = _median([p["cpu_us_per_op"].get("gateway") for p in s])
        dops = _median([p["ops_per_s"] for p in d])
        target, met = "-", None
        if n == 1:
            target, met = f"p50 ≤ {TARGETS['noop1_p50_us']:.0f} µs", p50 <= TARGETS["noop1_p50_us"]
        elif n == 64:
            target = (f"≥ {TARGETS['noop64_ops']:,} ops/s and replicas ≤ "
                      f"{TARGETS['noop64_replica_cpu_us']:.0f} µs/op")
            met = ops >= TARGETS["noop64_ops"] and rcpu <= TARGETS["noop64_replica_cpu_us"]
        row(f"ordering microbenchmark (no-op app, 64 B), C = {n}",
            f"{ops:,.0f} ops/s, p50 {p50:,.0f} µs, replicas {rcpu:.0f} + gateway {gcpu:.0f} µs/op",
            f"no-op app alone {dops:,.0f} ops/s", f"{ops / dops:.1%}" if dops else "-", target, met)
    pr = paired(results, "close", "direct", "smrd", c, "mixed")
    if pr:
        met = (pr["ratio"] >= TARGETS["close_vs_direct_17"]
               and pr["replica_cpu"] <= TARGETS["close_replica_cpu_us"])
        row(f"close framing, {c} clients (issue #17): smrd vs the app alone, and the replicas' CPU",
            f"{pr['ratio']:.1%}, replicas {pr['replica_cpu']:.0f} µs/op (three together)",
            f"{pr['base_ops']:,.0f} ops/s", f"{pr['ratio']:.1%}",
            f"≥ {TARGETS['close_vs_direct_17']:.0%} and replicas ≤ {TARGETS['close_replica_cpu_us']:.0f} µs/op",
            met)
    lat = results.get("latency")
    if lat and "floor" in lat and "tmpfs" in lat:
        ratio = lat["tmpfs"]["p50_us"] / lat["floor"]["chain_p50_us"]
        row("one client, hashmap PUT p50, logs on tmpfs, vs the 8-hop floor (bench.hop_floor chain)",
            f"p50 {lat['tmpfs']['p50_us']:,.0f} µs ({lat['tmpfs']['ops_per_s']:,} ops/s)",
            f"floor p50 {lat['floor']['chain_p50_us']:,.0f} µs", f"{ratio:.2f}×",
            f"≤ {TARGETS['c1_put_vs_floor']:.1f}×", ratio <= TARGETS["c1_put_vs_floor"],
            "the hop-by-hop table: results.json latency.tmpfs.hops")
    if lat and "tmpfs" in lat and "disk" in lat:
        extra = lat["disk"]["p50_us"] - lat["tmpfs"]["p50_us"]
        fsync = lat["disk"]["fsync_us"]
        row("one client, logs on disk: p50(disk) - p50(tmpfs), in fsyncs of that directory",
            f"p50 {lat['disk']['p50_us']:,.0f} µs on disk (+{extra:,.0f} µs)",
            f"p50 {lat['tmpfs']['p50_us']:,.0f} µs on tmpfs; one fsync {fsync:,.0f} µs",
            f"{extra / fsync:.2f} fsyncs", f"≤ {TARGETS['disk_minus_tmpfs_fsyncs']}",
            extra <= TARGETS["disk_minus_tmpfs_fsyncs"] * fsync)
    pr = paired(results, "curve", "plain", "curve", c, "mixed")
    if pr:
        row(f"line framing, {c} clients (issue #19): CURVE on every link vs off",
            f"{pr['ops']:,.0f} ops/s", f"{pr['base_ops']:,.0f} ops/s", f"{pr['ratio']:.1%}",
            f"≥ {TARGETS['curve_vs_plain']:.0%}", pr["ratio"] >= TARGETS["curve_vs_plain"])
    red = results.get("redis")
    if red:
        for s in red["summary"]:
            row(f"redis-benchmark {s['test']}, {s['clients']} clients (issue #18): Redis "
                f"replicated by smrd vs Redis alone", f"{s['smrd_ops_per_s']:,.0f} ops/s",
                f"{s['alone_ops_per_s']:,.0f} ops/s", f"{s['ratio']:.1%}", "-", None,
                "the three servers' DEBUG DIGEST equal" if red["digests_equal"]
                else "**the three servers' DEBUG DIGEST differ**")
    mem = results.get("memory")
    if mem:
        etcd = [v for p in results["points"] if p["system"] == "etcd"
                for k, v in p["rss_mb"].items() if v]
        row(f"RSS per replica after {mem['requests']:,} put-only requests, 64 clients, defaults",
            f"{max(mem['rss_mb_final']):.1f} MB at the end, at most {mem['rss_mb_max']} MB",
            f"etcd members at most {max(etcd):.1f} MB (same run, shorter)" if etcd else "-", "-",
            f"≤ {TARGETS['replica_rss_mb']:.0f} MB after 1 M", max(mem["rss_mb_final"]) <=
            TARGETS["replica_rss_mb"] and mem["requests"] >= 1_000_000,
            f"{mem['ops_per_s']:,} ops/s over {mem['seconds']:.0f} s")
    rss = [(v, p) for p in results["points"] if p["system"] == "smrd"
           for k, v in p["rss_mb"].items() if k.startswith("replica") and v]
    if rss:
        top, at = max(rss, key=lambda x: x[0])
        served = sum(p["ops"] for p in results["points"] if p["group"] == at["group"]
                     and p["key"] == at["key"] and p["at"] <= at["at"])
        row("RSS per replica, largest seen in any smrd point", f"{top:.1f} MB", "-", "-",
            f"≤ {TARGETS['replica_rss_mb']:.0f} MB", top <= TARGETS["replica_rss_mb"],
            f"group {at['group']}, after that cluster had served ≥ {served:,} measured requests "
            "(RSS grows with requests served: a short run understates it)")
    mem = paired(results, "durability", "memory", "fsync-tmpfs", c, "mixed")
    disk = paired(results, "durability", "memory", "fsync-disk", c, "mixed")
    if mem and disk:
        row(f"durability, {c} clients: fsync on tmpfs / fsync on disk vs memory",
            f"{mem['ops']:,.0f} / {disk['ops']:,.0f} ops/s", f"{mem['base_ops']:,.0f} ops/s",
            f"{mem['ratio']:.1%} / {disk['ratio']:.1%}", "-", None)
    pts = results["points"]
    if pts:
        row("load generator (all points)",
            f"at most {max(p['cores']['loadgen'] for p in pts):.2f} cores",
            f"{_median([p['loadgen']['cpu_us_per_op'] for p in pts]):.0f} µs/op median", "-", "-", None,
            "its own CPU, measured in its worker processes over the window")
        row("other load on the machine during the windows (not ours)",
            f"median {_median([p['cores']['other'] for p in pts]):.2f} cores",
            f"max {max(p['cores']['other'] for p in pts):.2f} cores", "-", "-", None)
    return rows


def headline_markdown(rows):
    out = ["| what | smrd | baseline | ratio | target | met | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        out.append(f"| {r['what']} | {r['smrd']} | {r['baseline']} | {r['ratio']} | {r['target']} "
                   f"| {met} | {r['note']} |")
    return "\n".join(out) + "\n"


def headline_text(rows):
    lines = []
    for r in rows:
        met = {True: "  [met]", False: "  [MISSED]", None: ""}[r["met"]]
        lines.append(f"- {r['what']}\n    smrd: {r['smrd']}   baseline: {r['baseline']}   "
                     f"ratio: {r['ratio']}   target: {r['target']}{met}"
                     + (f"\n    ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.experiments", description=(
        "The paper's experiments and side-by-side baselines (docs/benchmarks.md)."))
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json, headline.md, *.png, logs/")
    ap.add_argument("--only", help="comma-separated group names or prefixes (line, close, etcd, noop, "
                    "durability, curve, gateways, replicas, latency, memory, redis); default all")
    ap.add_argument("--no-etcd", action="store_true", help="skip the etcd baseline")
    ap.add_argument("--seconds", type=float, help="override the profile's measured window")
    ap.add_argument("--repeats", type=int, help="override the profile's repeated pairs")
    ap.add_argument("--loadgen-procs", type=int, default=None,
                    help="load generator worker processes (default: one per core from 16 clients)")
    ap.add_argument("--tmpfs", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                    help="where 'tmpfs' storage (write-ahead logs, etcd data) lives (default %(default)s)")
    ap.add_argument("--disk", default=None, help="where 'disk' storage lives (default: OUT/_disk)")
    args = ap.parse_args(argv)
    if matplotlib is None:
        print("bench.experiments: matplotlib is needed for the plots: pip install matplotlib",
              file=sys.stderr)
        return 2
    prof = dict(PROFILES[args.profile])
    if args.seconds:
        prof["seconds"] = args.seconds
    if args.repeats:
        prof["repeats"] = args.repeats
    make_out_dir(ap, args.out)
    groups = plan(prof, with_etcd=not args.no_etcd)
    special = list(SPECIAL_GROUPS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        groups = [g for g in groups if any(g.name == w or g.name.startswith(w + "-") for w in wanted)]
        special = [g for g in special if g in wanted]
    if not args.no_etcd and any(g.name == "etcd" for g in groups):
        try:
            ensure_etcd()
        except SystemFailed as e:
            print(f"bench.experiments: {e}", file=sys.stderr)
            return 2
    disk_root = Path(args.disk) if args.disk else args.out / "_disk"
    disk_root.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.out, args.tmpfs, disk_root)
    results = {"profile": args.profile, "settings": prof, "command": " ".join(sys.argv),
               "machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "groups": {}, "points": [], "failures": [], "targets": TARGETS,
               "storage": {"tmpfs": str(ctx.tmpfs), "disk": str(ctx.disk)}}
    path = args.out / "results.json"

    def save():
        path.write_text(json.dumps(results, indent=1))

    print(f"profile {args.profile}: {sum(len(g.runs) for g in groups)} points in {len(groups)} groups, "
          f"{prof['seconds']:g} s each after {prof['warmup']:g} s warm-up; results in {args.out}",
          file=sys.stderr, flush=True)
    try:
        run_groups(groups, prof, ctx, args, results, save)
        run_special(special, prof, ctx, results, save)
    finally:
        ctx.cleanup()
        if not args.disk:
            shutil.rmtree(disk_root, ignore_errors=True)
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["headline"] = headline(results)
        save()
    (args.out / "headline.md").write_text(headline_markdown(results["headline"]))
    from bench.plots import plot_all
    pngs = plot_all(results, args.out)
    print("\nheadline (medians over the repeated pairs; every ratio measured side by side):")
    print(headline_text(results["headline"]))
    print(f"\nwrote {path}, {args.out / 'headline.md'}" + "".join(f", {p.name}" for p in pngs))
    for f in results["failures"]:
        print(f"FAILED group {f['group']}: {f['error']}", file=sys.stderr)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
