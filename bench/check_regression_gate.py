# Proves the benchmark regression gate works both ways: the compare against the saved baseline
# (bench/baseline/) must pass as the code is, with every benchmark compared; and with a planted
# slowdown (BENCH_PLANT_SLOWDOWN=1: every benchmarked function does its work 3 times, see
# bench/conftest.py) it must fail with every benchmark reported as regressed. Exits 0 only if
# both hold; otherwise 1, saying which did not.
#
#   python bench/check_regression_gate.py [--fail min:100%]
#
# The gate itself (what CI or a developer runs) is gate_command() below; docs/benchmarks.md says
# why the threshold is what it is on the 2-core machine.
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORAGE = "bench/baseline"
DEFAULT_FAIL = "min:100%"


def gate_command(fail):
    return [sys.executable, "-m", "pytest", "bench", "--benchmark-only", f"--benchmark-storage={STORAGE}",
            "--benchmark-compare", f"--benchmark-compare-fail={fail}", "-q", "-p", "no:cacheprovider"]


def baseline_names():
    """Names of the benchmarks in the latest saved baseline (what every run must be compared on)."""
    files = sorted((ROOT / STORAGE).glob("*/[0-9][0-9][0-9][0-9]_*.json"))
    if not files:
        return set()
    return {b["fullname"] for b in json.loads(files[-1].read_text())["benchmarks"]}


def run(fail, planted):
    env = dict(os.environ)
    env.pop("BENCH_PLANT_SLOWDOWN", None)
    if planted:
        env["BENCH_PLANT_SLOWDOWN"] = "1"
    t0 = time.monotonic()
    done = subprocess.run(gate_command(fail), cwd=ROOT, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    regressed = {line.strip().split(" (", 1)[0] for line in out.splitlines()
                 if line.startswith("\t") and " - Field " in line}
    summary = next((line.strip("= ") for line in reversed(out.splitlines())
                    if " in " in line and any(w in line for w in ("passed", "failed", "error"))), "")
    return {"rc": done.returncode, "compared": "Comparing against benchmarks from:" in out,
            "regressed": regressed, "summary": summary, "out": out, "seconds": time.monotonic() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description="check that the benchmark compare gate passes as is "
                                 "and fails on a planted slowdown")
    ap.add_argument("--fail", default=DEFAULT_FAIL, help="--benchmark-compare-fail expression "
                    "(default %(default)s)")
    args = ap.parse_args(argv)
    names = {n.split("::", 1)[1] for n in baseline_names()}
    if not names:
        print(f"no saved baseline under {STORAGE}: see docs/benchmarks.md (--benchmark-save)")
        return 1
    print("gate:", " ".join(gate_command(args.fail)[1:]), flush=True)
    problems = []
    for planted in (False, True):
        name = "planted slowdown" if planted else "as is"
        r = run(args.fail, planted)
        print(f"\n{name}: exit {r['rc']} after {r['seconds']:.0f} s; compared with the baseline: "
              f"{r['compared']}; {len(r['regressed'])} of {len(names)} benchmarks reported as "
              f"regressed; pytest: {r['summary'] or '(no summary: the regression check raised)'}",
              flush=True)
        for line in sorted(r["regressed"]):
            print("   ", line)
        before = len(problems)
        if not r["compared"]:
            problems.append(f"{name}: no comparison happened (is {STORAGE} there for this Python?)")
        elif planted and not (r["rc"] != 0 and r["regressed"] == names):
            missing = sorted(names - r["regressed"])
            problems.append(f"{name}: exit {r['rc']}; not reported as regressed although slowed "
                            f"down: {missing}")
        elif not planted and not (r["rc"] == 0 and f"{len(names)} passed" in r["summary"]
                                  and "failed" not in r["summary"] and "error" not in r["summary"]):
            problems.append(f"{name}: exit {r['rc']} ({r['summary']}) without a planted slowdown; "
                            f"reported as regressed: {sorted(r['regressed'])}")
        if len(problems) > before:
            print(r["out"][-4000:])
    print()
    for p in problems:
        print("GATE CHECK FAILED:", p)
    if not problems:
        print("gate check OK: passes as is, and every benchmark fails it with the planted slowdown")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
