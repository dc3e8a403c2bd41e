"""smrd.replica.app_reset: ending an app so that it starts again empty, and waiting for the new one.

Real processes, real files: an "app" that listens and keeps appending to a file of its own."""
import asyncio
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from smrd.replica.app_reset import ResetFailed, empty_paths, end_app, wait_for_new_app
from smrd.replica.app_watch import AppIdentity, AppWatch

# Listens on the port, then appends to DIR/journal as fast as it can: an app with files of its own.
WRITER = ("import os, socket, sys\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
          "print('up', flush=True)\n"
          "with open(os.path.join(sys.argv[2], 'journal'), 'ab', buffering=0) as f:\n"
          "    while True: f.write(b'x' * 64)\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_writer(port, data):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(port), str(data)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_empty_paths_keeps_directories_and_removes_their_contents(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "f").write_text("x")
    (data / "g").write_text("y")
    os.symlink(tmp_path / "outside", data / "link")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("z")
    single = tmp_path / "db.sqlite"
    single.write_text("w")
    assert empty_paths([str(data), str(single), str(tmp_path / "missing")]) == []
    assert data.is_dir() and list(data.iterdir()) == []
    assert not single.exists()
    assert (tmp_path / "outside" / "keep").exists(), "a symlink is removed, never followed"


def test_end_app_freezes_empties_then_kills(tmp_path):
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    proc = start_writer(port, data)
    try:
        watch = AppWatch(port)
        identity = watch.current()
        assert identity.pid == proc.pid
        deadline = time.monotonic() + 10
        while not (data / "journal").exists() or (data / "journal").stat().st_size == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert end_app(watch, identity, [str(data)]) == proc.pid
        assert proc.wait(10) == -9
        # Frozen before the files went, so nothing was written after: the directory stays empty.
        assert list(data.iterdir()) == []
    finally:
        proc.kill()
        proc.wait()


def test_end_app_refuses_an_app_whose_process_it_cannot_see():
    with pytest.raises(ResetFailed, match="cannot see the app's process"):
        end_app(AppWatch(free_port()), AppIdentity(frozenset({1})), [])


def test_end_app_never_signals_a_pid_that_was_reused(tmp_path):
    # The identity's start time no longer matches the process with that pid: not the app.
    me = psutil.Process()
    stale = AppIdentity(frozenset({1}), me.pid, me.create_time() - 100)
    with pytest.raises(ResetFailed):
        end_app(AppWatch(free_port()), stale, [])


def test_waiting_for_a_new_app(tmp_path):
    port = free_port()
    watch = AppWatch(port)

    async def scenario():
        old = AppIdentity(frozenset({12345}))
        assert await wait_for_new_app(watch, old, 0.1) is None  # nothing comes: a bound
        waiting = asyncio.ensure_future(wait_for_new_app(watch, old, 10))
        await asyncio.sleep(0.05)
        proc = start_writer(port, tmp_path)
        try:
            new = await waiting
            assert new.pid == proc.pid
        finally:
            proc.kill()
            proc.wait()

    asyncio.run(scenario())
