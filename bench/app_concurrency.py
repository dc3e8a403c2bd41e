# The unreplicated app's CPU per request against how many clients drive it at once:
#
#   python -m bench.app_concurrency --out results/app-concurrency [--framing close] [--clients 1,4,16,64]
#
# Why it exists: a replica feeds its app in order, so in close mode the app sees one connection
# at a time, while the unreplicated baseline sees 64 at once. This measures what that alone costs
# the app (docs/benchmarks.md, "What limits smrd now", item 3). One app process (the hashmap
# demo, as the baselines run it), the closed-loop load generator, CPU from psutil over each
# window. Prints a line per client count and writes OUT/app_concurrency.json.
import argparse
import json
from pathlib import Path

import psutil

from .loadgen import FRAMINGS, run_load
from .out_dir import make_out_dir
from .systems import DirectApp


def _clients(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("client counts must be at least 1")
    return values


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.app_concurrency",
                                 description="The unreplicated app's CPU per request by client count.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--framing", choices=sorted(FRAMINGS), default="close")
    ap.add_argument("--clients", type=_clients, default=[1, 4, 16, 64],
                    help="comma-separated client counts (default 1,4,16,64)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window per point")
    args = ap.parse_args(argv)
    make_out_dir(ap, args.out)
    app = DirectApp(framing=args.framing, log_dir=args.out / "logs").start()
    points = []
    try:
        proc = psutil.Process(app.proc.pid)
        for clients in args.clients:
            cpu = {}
            run = run_load(ports=app.ports, framing=args.framing, clients=clients, seconds=args.seconds,
                           on_window_start=lambda: cpu.__setitem__("start", sum(proc.cpu_times()[:2])),
                           on_window_end=lambda: cpu.__setitem__("end", sum(proc.cpu_times()[:2])))
            ops = run["ops_per_s"] * args.seconds
            point = {"clients": clients, "ops_per_s": round(run["ops_per_s"]),
                     "app_cpu_us_per_op": round((cpu["end"] - cpu["start"]) * 1e6 / ops, 1) if ops else None}
            points.append(point)
            print(f"{args.framing}, {clients} clients: {point['ops_per_s']:,} ops/s, "
                  f"app {point['app_cpu_us_per_op']} µs of CPU per request", flush=True)
    finally:
        app.stop()
    (args.out / "app_concurrency.json").write_text(
        json.dumps({"framing": args.framing, "seconds": args.seconds, "points": points}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
