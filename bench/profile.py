# Where the CPU goes: py-spy samples the leader, a follower and the gateway of a 3-replica cluster
# under closed-loop load, then sums the samples two ways:
#   self time by leaf function, and by area (the file of the leaf frame: event loop, ZeroMQ,
#   WAL, protocol core, ...), leaving out samples waiting in the selector (see summary_markdown);
#   time under each smrd function (the innermost smrd/ frame of each sample: what smrd code the
#   library time was spent for).
#
#   pip install py-spy
#   python -m bench.profile --out results/profile [--clients 64] [--seconds 10] [--app noop]
#
# Writes DIR/<role>.raw (py-spy's folded stacks, `py-spy record -f raw`) and DIR/summary.md.
# py-spy pauses the process for each sample (its default: needed to tell idle threads apart), so
# throughput under profiling is a little lower than without;
# py-spy leaves out idle threads, but on a loaded machine it counts a thread that is runnable
# and waiting for a core as busy; those samples sit in the selector, so the tables leave them out
# and say how the rest compares with the CPU psutil measured.
import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import loadgen
from bench.measure import Sampler
from bench.out_dir import make_out_dir
from bench.systems import PortAllocator, SmrdSystem

AREAS = [  # (pattern on the leaf frame's file, area), first match wins
    (r"selectors\.py|base_events\.py|events\.py|asyncio/runners", "asyncio event loop (incl. epoll)"),
    (r"asyncio/(streams|selector_events|transports|locks|queues|tasks|futures)", "asyncio streams/tasks"),
    (r"zmq/", "pyzmq (ZeroMQ sockets)"),
    (r"smrd/storage\.py", "smrd write-ahead log"),
    (r"smrd/protocol/", "smrd protocol core"),
    (r"smrd/(_core|core)", "smrd _core (compiled hot path)"),
    (r"smrd/transport\.py", "smrd transport"),
    (r"smrd/server\.py", "smrd server driver"),
    (r"smrd/gateway\.py", "smrd gateway driver"),
    (r"smrd/(app_adapter|framing/)", "smrd app adapter / framing"),
    (r"smrd/observability\.py|prometheus_client|psutil", "metrics"),
    (r"logging/", "logging"),
    (r"smrd/", "smrd (other)"),
]
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(text):
    m = FRAME.match(text.strip())
    return (m["func"], m["file"]) if m else (text.strip(), "?")


def _short(path):
    for marker in ("/smrd/", "/site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1] if marker != "/smrd/" else "smrd/" + path.split(marker, 1)[1]
    return path


def _area(path):
    for pattern, area in AREAS:
        if re.search(pattern, path):
            return area
    return Path(path).name or "?"


WAIT_LEAF = "EpollSelector.select"


def summarize(raw_text):
    """(samples, samples in WAIT_LEAF, self by function, self by area, time under each innermost
    smrd frame); the three counters leave out the samples whose leaf is WAIT_LEAF."""
    total = waiting = 0
    by_func, by_area, by_owner = collections.Counter(), collections.Counter(), collections.Counter()
    for line in raw_text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        if frames and frames[0][1] == "?" and frames[0][0].startswith(("process", "thread")):
            frames = frames[1:]
        if not frames:
            continue
        total += n
        func, path = frames[-1]
        if func == WAIT_LEAF:
            waiting += n
            continue
        by_func[f"{func} ({_short(path)})"] += n
        by_area[_area(path)] += n
        owner = next((f"{fn} ({_short(p)})" for fn, p in reversed(frames)
                      if p.startswith("smrd/") or "/smrd/" in p), "outside smrd code")
        by_owner[owner] += n
    return total, waiting, by_func, by_area, by_owner


def summary_markdown(role, total, waiting, by_func, by_area, by_owner, top=12, cpu_cores=None,
                     seconds=None, rate=None):
    busy = max(1, total - waiting)

    def table(title, counter):
        rows = [f"| {title} | share of CPU |", "|---|---|"]
        rows += [f"| `{k}` | {v / busy:.1%} |" for k, v in counter.most_common(top)]
        return "\n".join(rows)
    note = (f"{total} samples, {waiting} of them in `{WAIT_LEAF}` (left out below: on a loaded "
            "machine py-spy also counts a thread that is runnable but waiting for a core as busy, "
            "and that time shows up in the selector)")
    if cpu_cores is not None:
        note += (f"; the rest = {(total - waiting) / (seconds * rate):.2f} cores against "
                 f"{cpu_cores:.2f} cores measured by psutil")
    return (f"### {role}\n\n" + note + ".\n\n" + table("area (leaf frame's file)", by_area) + "\n\n"
            + table("leaf function (self time)", by_func) + "\n\n"
            + table("innermost smrd function (time under it)", by_owner) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description="py-spy profile of a "
                                 "3-replica cluster's leader, a follower and the gateway under load")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--framing", choices=("line", "close"), default="line")
    ap.add_argument("--app", choices=("hashmap", "noop"), default="hashmap")
    ap.add_argument("--durability", choices=("fsync", "nosync", "memory"), default="fsync")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--nonblocking", action="store_true",
                    help="let py-spy read without pausing the process (less overhead, but it then "
                         "cannot tell an idle thread from a busy one)")
    args = ap.parse_args(argv)
    args.spy_mode = ["--nonblocking"] if args.nonblocking else []
    pyspy = shutil.which("py-spy")
    if not pyspy:
        print("bench.profile: py-spy is needed: pip install py-spy", file=sys.stderr)
        return 2
    make_out_dir(ap, args.out)
    tmp = Path(tempfile.mkdtemp(prefix="smrd-profile-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    system = SmrdSystem(framing=args.framing, app=args.app, durability=args.durability,
                        data_dir=tmp / "cluster", log_dir=args.out / "logs", ports=PortAllocator())
    spies = {}
    try:
        system.start()
        procs = system.processes()
        leader = system.leader
        follower = next(i for i in range(len(procs["replica"])) if i != leader)
        targets = {f"leader-replica-{leader}": procs["replica"][leader].pid,
                   f"follower-replica-{follower}": procs["replica"][follower].pid,
                   "gateway-0": procs["gateway"][0].pid}
        sampler = Sampler(system)

        def start():
            sampler.start()
            for role, pid in targets.items():
                spies[role] = subprocess.Popen(
                    [pyspy, "record", "-f", "raw", *args.spy_mode, "--rate", str(args.rate),
                     "--duration", str(int(args.seconds)), "--pid", str(pid),
                     "-o", str(args.out / f"{role}.raw")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        load = loadgen.run_load(ports=system.ports, framing=args.framing, clients=args.clients,
                                seconds=args.seconds, warmup=1.0,
                                mix="noop" if args.app == "noop" else "mixed",
                                on_window_start=start, on_window_end=sampler.end)
        for role, spy in spies.items():
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0:
                print(f"py-spy on {role} failed: {err[-500:]}", file=sys.stderr)
        point = sampler.result(load["ops"])
    finally:
        system.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    head = (f"# py-spy profile: 3 replicas, 1 gateway, {args.framing} framing, {args.app} app, "
            f"{args.durability}, {args.clients} clients, {args.seconds:g} s\n\n"
            f"Under profiling: {load['ops_per_s']:,.0f} ops/s, p50 {load['latency_us']['p50'] / 1000:.2f} ms; "
            f"CPU µs/op: {point['cpu_us_per_op_by_process']}; leader batch mean "
            f"{point.get('leader_batch_mean')} requests.\n\n")
    parts = [head]
    for role in targets:
        raw = args.out / f"{role}.raw"
        if raw.exists():
            name = role.split("-", 1)[1] if role.startswith(("leader", "follower")) else role
            cores = point["cpu_us_per_op_by_process"].get(name)
            cores = cores * load["ops"] / 1e6 / point["window_s"] if cores else None
            parts.append(summary_markdown(role, *summarize(raw.read_text()), cpu_cores=cores,
                                          seconds=args.seconds, rate=args.rate))
    (args.out / "summary.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
