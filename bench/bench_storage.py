"""Write-ahead log throughput: group commit in each durability mode.

For every mode (fsync, nosync, memory) and group size (records per sync: 1, 16, 256) this appends
64-byte AcceptRecords, one append() call per record as a busy driver would, and calls sync()
after every group, for --seconds. It prints syncs/s, records/s, MB/s and sync latency, and writes
the same numbers as JSON to --out.

    python bench/bench_storage.py --out bench-storage.json [--dir /path/on/the/real/volume]

The numbers belong to the file system under --dir (default: the system temp directory): run it
on the volume the log will live on. fsync cost is the disk's, not smrd's.
"""
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smrd import core  # noqa: E402
from smrd.protocol.records import AcceptRecord  # noqa: E402
from smrd.replica.wal.log import WriteAheadLog  # noqa: E402

VALUE = bytes(range(64))


def run_one(base: str, mode: str, group: int, seconds: float) -> dict:
    directory = tempfile.mkdtemp(prefix=f"wal-{mode}-{group}-", dir=base)
    try:
        wal = WriteAheadLog(directory, durability=mode)
        wal.open()
        pool = [[AcceptRecord(i, 1, VALUE)] for i in range(group)]  # built outside the clock
        latencies = []
        records = 0
        start = time.perf_counter()
        deadline = start + seconds
        now = start
        while now < deadline:
            for one in pool:
                wal.append(one)
            t0 = time.perf_counter()
            wal.sync()
            now = time.perf_counter()
            latencies.append(now - t0)
            records += group
        elapsed = now - start
        wal.close()
        latencies.sort()
        return {
            "mode": mode,
            "group": group,
            "seconds": round(elapsed, 3),
            "syncs": len(latencies),
            "records": records,
            "syncs_per_s": round(len(latencies) / elapsed, 1),
            "records_per_s": round(records / elapsed, 1),
            "mb_per_s": round(wal.bytes_written / elapsed / 1e6, 2),
            "sync_us_median": round(statistics.median(latencies) * 1e6, 1),
            "sync_us_p99": round(latencies[int(len(latencies) * 0.99)] * 1e6, 1),
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def file_system(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout
        fields = out.splitlines()[1].split()
        return f"{fields[1]} on {fields[0]}"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write the results as JSON here")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the logs")
    parser.add_argument("--seconds", type=float, default=2.0, help="per mode and group size")
    parser.add_argument("--modes", default="fsync,nosync,memory")
    parser.add_argument("--groups", default="1,16,256")
    args = parser.parse_args(argv)

    env = {
        "python": platform.python_version(),
        "core": core.IMPLEMENTATION,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dir": os.path.abspath(args.dir),
        "file_system": file_system(args.dir),
        "record": "AcceptRecord with a 64-byte value (96 bytes framed), one append() per record",
    }
    print(f"# {env['file_system']}, core={env['core']}, python {env['python']}, {env['cpus']} cpus")
    print(f"{'mode':8} {'group':>5} {'syncs/s':>10} {'records/s':>11} {'MB/s':>7} "
          f"{'sync us p50':>11} {'p99':>9}")
    results = []
    for mode in args.modes.split(","):
        for group in (int(g) for g in args.groups.split(",")):
            r = run_one(args.dir, mode, group, args.seconds)
            results.append(r)
            print(f"{mode:8} {group:>5} {r['syncs_per_s']:>10.0f} {r['records_per_s']:>11.0f} "
                  f"{r['mb_per_s']:>7.1f} {r['sync_us_median']:>11.1f} {r['sync_us_p99']:>9.1f}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
        f.write("\n")
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
