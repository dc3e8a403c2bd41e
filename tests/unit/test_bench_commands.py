"""The benchmark commands refuse an --out they cannot use with one line and exit status 2, before
starting anything, rather than with a traceback (bench/out_dir.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["app_concurrency", "failover", "hop_floor", "latency", "memory", "state_transfer"])
def test_an_out_that_is_a_file_is_a_usage_error(tmp_path, command):
    taken = tmp_path / "results"
    taken.write_text("not a directory\n")
    done = subprocess.run([sys.executable, "-m", f"bench.{command}", "--out", str(taken)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"--out {taken}: a file of that name exists" in done.stderr.strip().splitlines()[-1]
    assert taken.read_text() == "not a directory\n"
