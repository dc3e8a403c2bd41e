# The examples' READMEs, run as a user would copy them: the first ```sh block's `smrd local`
# command starts the cluster (on free ports and a temporary directory instead of the defaults),
# then every line of the second block is run by bash and, where it ends in `# expected`, its
# output must be that. So an example whose command or output drifts from the code fails here.
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_base_port
from .test_real_apps import need

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GATEWAY = 11900


def blocks(readme: Path):
    return re.findall(r"```sh\n(.*?)```", readme.read_text(), re.S)


@pytest.mark.parametrize("example, tools", [("http", ["curl"]), ("sqlite", ["sqlite3", "socat"]),
                                            ("redis", ["redis-server", "redis-cli"])])
def test_an_example_runs_as_its_readme_says(example, tools, tmp_path):
    need(*tools)
    start, client = blocks(ROOT / "examples" / example / "README.md")[:2]
    command = start.replace("\\\n", " ").strip()
    argv = shlex.split(command)
    assert argv[:2] == ["smrd", "local"], command
    base = free_base_port()
    argv = [sys.executable, "-m", "smrd", *argv[1:], "--base-port", str(base),
            "--data-dir", str(tmp_path / "cluster")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:  # the line that says it is up, or EOF if it failed
            seen.append(line)
            if "is up" in line:
                break
        assert any("is up" in line for line in seen), "".join(seen)
        gateway = str(base + 900)
        for line in client.strip().splitlines():
            shell, _, expected = line.partition("#")
            shell = shell.strip().replace(str(DEFAULT_GATEWAY), gateway)
            out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, (shell, out.stderr)
            if expected.strip():  # compared word by word: redis-cli puts a list on many lines
                assert out.stdout.split() == expected.split(), (shell, out.stdout)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: smrd local stops everything it started
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(seen) + rest
