# bench.experiments' headline for issue #17's targets: each row compares with its same-run
# baseline and says met / not met by the stated rule (synthetic results; the measurements
# themselves are bench/'s business).
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.experiments import headline  # noqa: E402


def _latency(p50_tmpfs, p50_disk, floor, fsync):
    def run(p50):
        return {"p50_us": p50, "ops_per_s": round(1e6 / p50), "fsync_us": fsync}
    return {"floor": {"chain_p50_us": floor}, "tmpfs": run(p50_tmpfs), "disk": run(p50_disk)}


def _row(latency):
    return next(r for r in headline({"points": [], "latency": latency}) if "8-hop floor" in r["what"])


def test_one_client_against_the_floor_of_the_same_run():
    met = _row(_latency(400, 600, 200, 300))
    assert met["met"] is True and met["ratio"] == "2.00×"
    assert _row(_latency(401, 600, 200, 300))["met"] is False


def test_the_disk_costs_at_most_one_and_a_half_fsyncs():
    rows = [r for r in headline({"points": [], "latency": _latency(400, 850, 200, 300)})
            if "logs on disk" in r["what"]]
    assert rows and rows[0]["met"] is True and rows[0]["ratio"] == "1.50 fsyncs"
    rows = [r for r in headline({"points": [], "latency": _latency(400, 851, 200, 300)})
            if "logs on disk" in r["what"]]
    assert rows[0]["met"] is False


def test_memory_counts_only_after_a_million_requests():
    def mem(requests, rss):
        return {"requests": requests, "rss_mb_final": [rss, rss - 1, rss - 2], "rss_mb_max": rss,
                "ops_per_s": 10_000, "seconds": 100.0}
    rows = lambda m: [r for r in headline({"points": [], "memory": m}) if "put-only" in r["what"]]  # noqa: E731
    assert rows(mem(1_000_000, 59.0))[0]["met"] is True
    assert rows(mem(1_000_000, 61.0))[0]["met"] is False
    assert rows(mem(999_999, 50.0))[0]["met"] is False
