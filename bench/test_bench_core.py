# Benchmarks of the hot path, both twins side by side (one benchmark group per operation, so the
# table's relative column reads as "how many times slower than the compiled twin").
#   pytest bench/test_bench_core.py --benchmark-only
# Per-message operations run 100 calls per round from a plain loop, as a driver would call them;
# per-batch operations handle 1,000 requests of 64 bytes per round.
# Never: assert on timings here (machines differ); the numbers are for reading and reporting.
import importlib
import os

import pytest

from smrd import _core_py

try:
    _core_c = importlib.import_module("smrd._core")
except ImportError:  # pragma: no cover - depends on the build
    _core_c = None

CALLS = 100
REQUESTS = [(1_000_000 + i, i + 1, os.urandom(64)) for i in range(1000)]
PAYLOAD_64 = os.urandom(64)
PAYLOAD_4K = os.urandom(4096)


@pytest.fixture(params=["c", "py"])
def impl(request):
    if request.param == "py":
        return _core_py
    if _core_c is None:
        pytest.skip("smrd._core is not built: run `pip install -e .`")
    return _core_c


@pytest.mark.parametrize("size", [64, 4096], ids=["64B", "4KiB"])
def test_encode_frame(benchmark, impl, size):
    benchmark.group = f"encode_frame {size} B x{CALLS}"
    payload = PAYLOAD_64 if size == 64 else PAYLOAD_4K
    encode = impl.encode_frame

    def run():
        for _ in range(CALLS):
            encode(3, 1, 7, 123456, payload)

    benchmark(run)


@pytest.mark.parametrize("size", [64, 4096], ids=["64B", "4KiB"])
def test_decode_frame(benchmark, impl, size):
    benchmark.group = f"decode_frame {size} B x{CALLS}"
    frame = impl.encode_frame(3, 1, 7, 123456, PAYLOAD_64 if size == 64 else PAYLOAD_4K)
    decode = impl.decode_frame

    def run():
        for _ in range(CALLS):
            decode(frame)

    benchmark(run)


def test_pack_batch(benchmark, impl):
    benchmark.group = "pack_batch 1000 x 64 B"
    result = benchmark(impl.pack_batch, REQUESTS, 42)
    assert len(result) == 16 + 1000 * (20 + 64)


def test_batch_unpack_and_iterate(benchmark, impl):
    benchmark.group = "Batch() + iterate 1000 x 64 B"
    packed = impl.pack_batch(REQUESTS, 42)
    Batch = impl.Batch

    def run():
        n = 0
        for _client_id, _seq, _payload in Batch(packed):
            n += 1
        return n

    assert benchmark(run) == 1000


def test_batch_builder(benchmark, impl):
    benchmark.group = "BatchBuilder add x1000 + build"
    BatchBuilder = impl.BatchBuilder

    def run():
        builder = BatchBuilder(1000, 1 << 20)
        add = builder.add
        for client_id, seq, payload in REQUESTS:
            add(client_id, seq, payload)
        return builder.build(42)

    assert len(benchmark(run)) == 16 + 1000 * (20 + 64)


def test_quorum_tracker(benchmark, impl):
    benchmark.group = "QuorumTracker add 1000 instances x 3 votes"
    QuorumTracker = impl.QuorumTracker

    def run():
        tracker = QuorumTracker(3, 2)
        add = tracker.add
        decided = 0
        for instance in range(1000):
            decided += add(instance, 1, 0)
            decided += add(instance, 1, 1)
            decided += add(instance, 1, 2)
        return decided

    assert benchmark(run) == 1000


def test_reply_cache(benchmark, impl):
    benchmark.group = "ReplyCache check+put 1000 requests"
    ReplyCache = impl.ReplyCache
    NEW = impl.NEW
    # 100 clients x 10 seqs each, k = 4: lookups, inserts and evictions all happen.
    requests = [(client, seq, payload) for seq in range(1, 11) for client in range(100)
                for payload in (PAYLOAD_64,)]

    def run():
        cache = ReplyCache(4)
        check = cache.check
        put = cache.put
        for client_id, seq, reply in requests:
            if check(client_id, seq) == NEW:
                put(client_id, seq, reply, seq)
        return len(cache)

    assert benchmark(run) == 100
