"""Command line for the simulator: run a range of seeds (soak), or replay one seed with a trace.
  python -m smrd.simulation --seeds 100000 --jobs 2      # long soak
  python -m smrd.simulation --seed 1234 --trace          # replay one run, printing every event
  python -m smrd.simulation --seeds 1000 --bursts        # every seed with bursts (Params.bursts)
"""
import argparse
import functools
import multiprocessing
import sys
import time
from dataclasses import replace

from .cluster import Params, Simulation, run_seed


def _params(seed, directed, bursts=None):
    p = Params.swarm(seed)
    if bursts is not None:
        p = replace(p, bursts=bursts)
    return replace(p, directed=directed) if directed else p


def _run(seed, directed=0.0, bursts=None):
    p = _params(seed, directed, bursts)
    r = run_seed(seed, params=p)
    return seed, r.ok, r.violation, r.summary, p.bursts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smrd.simulation",
                                 description="Run seeded cluster simulations with fault injection.")
    ap.add_argument("--seed", type=int, help="replay this one seed")
    ap.add_argument("--trace", action="store_true", help="with --seed: print every fault and restart")
    ap.add_argument("--seeds", type=int, default=500, help="how many seeds to run (default 500)")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--jobs", type=int, default=multiprocessing.cpu_count(), help="worker processes")
    ap.add_argument("--directed", type=float, default=0.0, metavar="P",
                    help="chance that a client sends a request to one random replica alone, as a "
                         "gateway with a (possibly stale) leader hint does (default 0)")
    ap.add_argument("--bursts", action=argparse.BooleanOptionalAction, default=None,
                    help="handle Readies in bursts, as the daemon's loop does (Params.bursts), in "
                         "every seed (--bursts) or none (--no-bursts); default: as each seed draws")
    args = ap.parse_args(argv)
    if not 0.0 <= args.directed <= 1.0:
        ap.error(f"--directed must be between 0 and 1, not {args.directed:g}")
    flags = f" --directed {args.directed:g}" if args.directed else ""
    if args.bursts is not None:
        flags += " --bursts" if args.bursts else " --no-bursts"

    if args.seed is not None:
        sim = Simulation(args.seed, _params(args.seed, args.directed, args.bursts),
                         trace=print if args.trace else None)
        print(f"seed {args.seed}: {sim.p}")
        r = sim.run()
        print(f"seed {args.seed}: {'ok' if r.ok else 'FAILED'} {r.summary}")
        if not r.ok:
            print(f"violation: {r.violation}")
        return 0 if r.ok else 1

    seeds = range(args.start, args.start + args.seeds)
    failed = []
    beyond = []
    membership_seeds = changed = changes = bursty = 0
    began = time.monotonic()
    with multiprocessing.Pool(args.jobs) as pool:
        for done, (seed, ok, violation, summary, bursts) in enumerate(pool.imap_unordered(functools.partial(_run, directed=args.directed, bursts=args.bursts), seeds, chunksize=4), 1):
            bursty += bursts
            if summary.get("beyond_fault_model"):
                beyond.append(seed)
            if "membership" in summary:
                membership_seeds += 1
                changed += summary["membership"]["changes"] > 0
                changes += summary["membership"]["changes"]
            if not ok:
                failed.append(seed)
                print(f"\nseed {seed} FAILED: {violation}\n  replay: python -m smrd.simulation --seed {seed}{flags} --trace",
                      flush=True)
            if done % 50 == 0 or done == len(seeds):
                rate = done / (time.monotonic() - began)
                print(f"\r{done}/{len(seeds)} seeds, {len(failed)} failed, {rate:.1f} seeds/s", end="", flush=True)
    print()
    print(f"membership changes in {membership_seeds} seeds' scenarios, decided in {changed} seeds, "
          f"{changes} changes applied; {len(beyond)} runs beyond the fault model (safety checked, "
          f"liveness not owed){': ' + str(sorted(beyond)[:20]) if beyond else ''}; "
          f"{bursty} seeds with bursts")
    if failed:
        print(f"failing seeds: {sorted(failed)}")
        return 1
    print(f"all {len(seeds)} seeds passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
