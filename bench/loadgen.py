# Closed-loop load generator for a hashmap-protocol endpoint (an smrd gateway or the app itself).
# Each simulated client keeps exactly one request outstanding. Reports throughput, latency (mean,
# the paper's trimmed mean that drops the 5% most deviating samples, p50, p99) and the load
# generator's own CPU time, since on a small machine it competes with what it measures.
#
#   python bench/loadgen.py --port 11900 --framing line --clients 64 --seconds 10 --out r.json
import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time


def trimmed_mean(samples, drop=0.05):
    if not samples:
        return 0.0
    mean = statistics.fmean(samples)
    keep = sorted(samples, key=lambda s: abs(s - mean))[: max(1, int(len(samples) * (1 - drop)))]
    return statistics.fmean(keep)


def percentile(sorted_samples, p):
    if not sorted_samples:
        return 0.0
    return sorted_samples[min(len(sorted_samples) - 1, int(len(sorted_samples) * p))]


def make_request(rnd, mix, keys, value):
    key = f"k{rnd.randrange(keys)}"
    if mix == "put" or (mix == "mixed" and rnd.random() < 0.5):
        return f"PUT {key} {value}".encode()
    return f"GET {key}".encode()


async def line_client(host, port, stop, lat, rnd, args, value, errors):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while not stop.is_set():
            req = make_request(rnd, args.mix, args.keys, value)
            t0 = time.perf_counter_ns()
            writer.write(req + b"\n")
            reply = await reader.readline()
            if not reply:
                errors.append("connection closed")
                return
            if reply.startswith(b"ERR"):
                errors.append(reply[:80].decode("ascii", "replace"))
            lat.append(time.perf_counter_ns() - t0)
    finally:
        writer.close()


async def close_client(host, port, stop, lat, rnd, args, value, errors):
    while not stop.is_set():
        req = make_request(rnd, args.mix, args.keys, value)
        t0 = time.perf_counter_ns()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(req)
            writer.write_eof()
            reply = await reader.read()
            writer.close()
        except OSError as e:
            errors.append(str(e))
            continue
        if reply.startswith(b"ERR"):
            errors.append(reply[:80].decode("ascii", "replace"))
        lat.append(time.perf_counter_ns() - t0)


async def run(args):
    stop = asyncio.Event()
    lat, errors = [], []
    value = "v" * args.value_size
    client = line_client if args.framing == "line" else close_client
    tasks = [asyncio.create_task(client(args.host, args.port, stop, lat, random.Random(i), args, value, errors))
             for i in range(args.clients)]
    await asyncio.sleep(args.warmup)
    lat.clear()
    errors.clear()
    cpu0, t0 = os.times(), time.perf_counter()
    await asyncio.sleep(args.seconds)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    count = len(lat)
    samples = lat[:count]
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    us = sorted(s / 1000 for s in samples)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "framing": args.framing, "clients": args.clients, "mix": args.mix, "value_size": args.value_size,
        "seconds": round(elapsed, 3), "ops": count, "ops_per_s": round(count / elapsed, 1),
        "latency_us": {"mean": round(statistics.fmean(us), 1) if us else 0,
                       "trimmed_mean": round(trimmed_mean(us), 1),
                       "p50": round(percentile(us, 0.50), 1), "p99": round(percentile(us, 0.99), 1)},
        "errors": len(errors), "first_errors": errors[:3],
        "loadgen_cpu_s": round(cpu, 3), "loadgen_cpu_us_per_op": round(cpu * 1e6 / count, 1) if count else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--framing", choices=("line", "close"), default="line")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--mix", choices=("put", "get", "mixed"), default="mixed")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=64)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["ops"] else 1


if __name__ == "__main__":
    sys.exit(main())
