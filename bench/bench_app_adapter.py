"""Throughput of smrd's app adapter against the real demo app, beside a raw asyncio client.

Runs the hashmap app (smrd/apps/hashmap.py, as a bare file: it imports nothing from smrd) once in
line framing and once in close framing, then times the same GET/PUT workload four ways:

  line  adapter  execute() in batches of --batch (pipelined), --requests requests
  line  raw      asyncio streams: write a batch in one write, readline() each reply
  close adapter  execute() in batches of --batch, --close-requests requests (a connection each)
  close raw      asyncio streams: connect, write, write_eof, read to EOF, per request

plus "line adapter, one call" (all --requests in a single execute(), sliding window) and "close
adapter, 1 per call" (execute() of one request at a time: close mode's exchanges run in a worker
thread, one hop to it per call, so this is its worst case). Each case runs --repeat times; the
best and the median are printed and written as JSON to --out, with the client process's CPU time
per request (all its threads; the app runs in its own process, so that is what the client side
costs, whatever the app's speed). --only close (or line) runs one mode's cases.

    python bench/bench_app_adapter.py --out /tmp/bench_app_adapter.json
    python bench/bench_app_adapter.py --only close --close-requests 4000 --repeat 5
"""
import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    from smrd.replica.app_adapter import AppAdapter
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
    from smrd.replica.app_adapter import AppAdapter

HOST = "127.0.0.1"


def start_app(framing):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "smrd" / "apps" / "hashmap.py"), "--host", HOST, "--port",
         "0", "--framing", framing], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        sys.exit(f"hashmap ({framing}) did not start: {line!r}")
    return proc, int(line.split()[1].rsplit(":", 1)[1])


def workload(n, tag):
    """Alternating PUT/GET over 1,000 keys: every GET hits a key PUT just before it."""
    out = []
    for i in range(n):
        key = b"%s%d" % (tag, (i // 2) % 1000)
        out.append(b"PUT %s v%d" % (key, i) if i % 2 == 0 else b"GET " + key)
    return out


def batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


async def line_adapter(port, requests, batch):
    async with AppAdapter(HOST, port, "line", pipeline=batch) as adapter:
        start = time.perf_counter()
        for chunk in batches(requests, batch):
            replies = await adapter.execute(chunk)
        elapsed = time.perf_counter() - start
    assert len(replies) == len(chunk) and replies[-1].startswith(b"VALUE ")
    return elapsed


async def line_adapter_one_call(port, requests, batch):
    async with AppAdapter(HOST, port, "line", pipeline=batch) as adapter:
        start = time.perf_counter()
        replies = await adapter.execute(requests)
        elapsed = time.perf_counter() - start
    assert len(replies) == len(requests) and replies[-1].startswith(b"VALUE ")
    return elapsed


async def line_raw(port, requests, batch):
    reader, writer = await asyncio.open_connection(HOST, port)
    start = time.perf_counter()
    for chunk in batches(requests, batch):
        writer.write(b"".join(r + b"\n" for r in chunk))
        replies = [(await reader.readline())[:-1] for _ in chunk]
    elapsed = time.perf_counter() - start
    writer.close()
    assert replies[-1].startswith(b"VALUE ")
    return elapsed


async def close_adapter(port, requests, batch):
    async with AppAdapter(HOST, port, "close") as adapter:
        start = time.perf_counter()
        for chunk in batches(requests, batch):
            replies = await adapter.execute(chunk)
        elapsed = time.perf_counter() - start
    assert replies[-1].startswith(b"VALUE ")
    return elapsed


async def close_adapter_single(port, requests, batch):
    return await close_adapter(port, requests, 1)


async def close_raw(port, requests, batch):
    start = time.perf_counter()
    for request in requests:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(request)
        writer.write_eof()
        reply = await reader.read()
        writer.close()
    elapsed = time.perf_counter() - start
    assert reply.startswith(b"VALUE ")
    return elapsed


CASES = [
    ("line", "adapter", line_adapter, "requests"),
    ("line", "raw", line_raw, "requests"),
    ("line", "adapter, one call", line_adapter_one_call, "requests"),
    ("close", "adapter", close_adapter, "close_requests"),
    ("close", "adapter, 1 per call", close_adapter_single, "close_requests"),
    ("close", "raw", close_raw, "close_requests"),
]


async def bench(args, ports):
    results = []
    for mode, client, func, count in CASES:
        if args.only and mode != args.only:
            continue
        n = getattr(args, count)
        times, cpu = [], []
        await func(ports[mode], workload(min(n, 200), b"warm"), args.batch)  # warm-up
        for rep in range(args.repeat):
            requests = workload(n, b"%s%d-" % (client.split(",")[0].encode(), rep))
            cpu_start = time.process_time()
            times.append(await func(ports[mode], requests, args.batch))
            cpu.append(time.process_time() - cpu_start)
        best, median = min(times), statistics.median(times)
        # The app runs in its own process: client CPU per request is what the client costs.
        cpu_us = statistics.median(cpu) / n * 1e6
        results.append({
            "mode": mode, "client": client, "requests": n,
            "batch": 1 if func is close_adapter_single else args.batch,
            "seconds": times, "best_ops_per_s": round(n / best),
            "median_ops_per_s": round(n / median),
            "client_cpu_us_per_request": round(cpu_us, 2),
        })
        print(f"{mode:5}  {client:18}  {n:6} requests  best {n / best:10,.0f} ops/s  "
              f"median {n / median:10,.0f} ops/s  client CPU {cpu_us:6.1f} us/request", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="line-mode requests")
    parser.add_argument("--close-requests", type=int, default=2_000, help="close-mode requests")
    parser.add_argument("--batch", type=int, default=64, help="requests per execute() / window")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("line", "close"), help="run one mode's cases")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    procs, ports = [], {}
    try:
        for mode in ("line", "close"):
            if args.only and mode != args.only:
                continue
            proc, ports[mode] = start_app(mode)
            procs.append(proc)
        results = asyncio.run(bench(args, ports))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    report = {
        "benchmark": "app_adapter", "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
