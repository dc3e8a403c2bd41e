# End-to-end regression benchmark: a real 3-replica cluster (smrd.ops.local, memory durability, line
# framing, the hashmap app) behind one gateway, driven by 16 closed-loop clients over connections
# kept open between rounds. One round = 1,000 requests (50/50 PUT/GET, 64-byte values), so the
# reported time is seconds per 1,000 requests through the whole system.
#
#   python -m pytest bench/test_bench_e2e.py --benchmark-only
#
# Compared against bench/baseline/ by the gate in docs/benchmarks.md. Never asserts on timings
# (the compare does); it does assert that every request got a normal reply.
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.loadgen import ClosedLoop
from bench.systems import PortAllocator, SmrdSystem

CLIENTS = 16
REQUESTS_PER_ROUND = 1000
ROUNDS = 20  # the gate compares the fastest round: more rounds, more chances of a quiet one


@pytest.fixture(scope="module")
def cluster():
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="smrd-bench-e2e-", dir=shm))
    try:
        system = SmrdSystem(durability="memory", data_dir=root / "cluster", log_dir=root / "logs",
                            ports=PortAllocator()).start()  # stops what it started if it fails
        yield system
        system.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def clients(cluster):
    load = ClosedLoop(cluster.ports[0], CLIENTS)
    assert load.run(2 * REQUESTS_PER_ROUND) == 0  # warm: sessions open, app connections up
    yield load
    load.close()


def test_e2e_line_3_replicas_16_clients(benchmark, clients):
    benchmark.group = (f"e2e: {REQUESTS_PER_ROUND} requests, 3 replicas, 1 gateway, {CLIENTS} "
                       "clients, line, memory")
    benchmark.extra_info["requests_per_round"] = REQUESTS_PER_ROUND
    errors = benchmark.pedantic(clients.run, args=(REQUESTS_PER_ROUND,), rounds=ROUNDS,
                                warmup_rounds=1, iterations=1)
    assert errors == 0
    benchmark.extra_info["ops_per_s"] = round(REQUESTS_PER_ROUND / benchmark.stats.stats.median, 1)
