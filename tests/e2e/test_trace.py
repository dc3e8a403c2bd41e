# The opt-in request trace (SMRD_TRACE, smrd/ops/trace.py) read by `python -m bench.latency`: real
# processes stamp every hop of every request, and the stamps join into one row per request.
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_hop_of_every_request_is_stamped_and_joined(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "bench.latency", "--out", str(out), "--only", "tmpfs", "--no-floor",
         "--requests", "60", "--tmpfs", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((out / "latency.json").read_text())["tmpfs"]
    assert result["traced_requests"] == 60
    hops = {h["hop"]: h for h in result["hops"]}
    for hop in hops.values():
        # Every request passes every hop once; the follower rows come from the follower whose
        # ACCEPTED reached the leader first, so they are there for every request too.
        assert hop["samples"] == 60, hop
        assert hop["median_us"] is not None and hop["median_us"] >= 0, hop
    chained = sum(h["median_us"] for h in hops.values() if not h["overlapped"])
    # Medians of consecutive hops add up to about the median of the whole (not exactly).
    assert 0.5 * result["p50_us"] < chained < 2.0 * result["p50_us"], (chained, result["p50_us"])
    assert "leader -> app -> leader (TCP), app executes" in run.stdout
    assert not list(Path(tmp_path).glob("smrd-latency*")), "the cluster's directory is left behind"
