"""smrd.replica.app_watch and smrd.replica.sockdiag: the app is identified by the socket listening on its port,
never by whether an old pid still exists.

Real listener processes on 127.0.0.1, real zombies (held by a parent that never reaps), real
sockets; nothing is faked."""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from smrd.replica.app_adapter import AppUnverified
from smrd.replica.app_watch import AppRestarted, AppWatch, is_local_host
from smrd.replica.sockdiag import ListenerQuery, _from_proc

LISTENER = ("import socket, sys\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
            "print('up', flush=True); sys.stdin.read()\n")

# A parent that starts the listener and never calls wait(): once the listener is killed, it stays
# a zombie for as long as this parent lives (as an app's does while a slow PID 1 has not reaped it).
HOLDER = ("import os, signal, sys\n"
          "pid = os.fork()\n"
          "if pid == 0:\n"
          "    os.execv(sys.executable, [sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
          "print(pid, flush=True)\n"
          "signal.pause()\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, timeout=10):
    query = ListenerQuery()
    deadline = time.monotonic() + timeout
    while not query.listeners(port):
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.01)  # another process's listen(): nothing to wait on but the port


class Listener:
    """A separate process listening on the port, as the app would: its own pid and start time."""

    def __init__(self, port):
        self.proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "up"  # listening from here on
        self.pid = self.proc.pid

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


class HeldListener:
    """A listener whose parent never reaps it: killed, it becomes (and stays) a zombie."""

    def __init__(self, port):
        # stdin: a pipe that stays open, so the listener's read() blocks until close().
        self.holder = subprocess.Popen([sys.executable, "-c", HOLDER, LISTENER, str(port)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       start_new_session=True)
        line = self.holder.stdout.readline().strip()
        while not line.isdigit():  # the listener's "up" may come first: both share the pipe
            line = self.holder.stdout.readline().strip()
        self.pid = int(line)
        wait_listening(port)

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def close(self):
        os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(10)


def test_sock_diag_and_proc_agree_on_the_listening_socket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        inode = os.fstat(s.fileno()).st_ino
        query = ListenerQuery()
        assert query.listeners(port) == {inode: os.getuid()}
        assert _from_proc(port) == {inode: os.getuid()}
        assert query.source == "netlink sock_diag"
    assert query.listeners(port) == {}, "a closed socket no longer listens"


def test_a_connected_socket_is_not_a_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                assert set(ListenerQuery().listeners(port)) == {os.fstat(server.fileno()).st_ino}


def test_the_first_listener_is_adopted_with_its_process():
    port = free_port()
    watch = AppWatch(port)
    with Listener(port) as app:
        watch.check()
        assert watch.identity.pid == app.pid
        assert watch.identity.create_time == psutil.Process(app.pid).create_time()
        watch.check()  # the same socket: nothing to say


def test_a_connection_with_nothing_listening_is_not_trusted():
    watch = AppWatch(free_port())
    with pytest.raises(AppUnverified, match="nothing listens"):
        watch.check()
    assert watch.identity is None


def test_a_replaced_app_is_reported_as_restarted():
    port = free_port()
    watch = AppWatch(port)
    first = Listener(port)
    watch.check()
    first.kill()
    with Listener(port) as second:
        with pytest.raises(AppRestarted, match=f"was pid {first.pid}") as info:
            watch.check()
        assert info.value.new.pid == second.pid and info.value.old.pid == first.pid
        assert not info.value.new.same_process(info.value.old)


def test_an_app_replaced_while_the_old_one_is_a_zombie_is_reported_as_restarted():
    # The bug this module was rewritten for: psutil calls a zombie running, so "is the old pid
    # still there" said yes and the new, empty app was taken for the old one.
    port = free_port()
    watch = AppWatch(port)
    held = HeldListener(port)
    try:
        watch.check()
        assert watch.identity.pid == held.pid
        held.kill()
        assert psutil.Process(held.pid).is_running(), "the zombie still 'runs' for psutil"
        with pytest.raises(AppUnverified):
            watch.check()  # the zombie holds no socket: nothing listens yet
        with Listener(port) as new:
            with pytest.raises(AppRestarted) as info:
                watch.check()
            assert info.value.new.pid == new.pid
    finally:
        held.close()


def test_an_app_that_outlived_smrd_is_recognised_from_the_record(tmp_path):
    port = free_port()
    record = str(tmp_path / "app.json")
    with Listener(port) as app:
        AppWatch(port, record).check()           # an earlier smrd fed this process
        assert AppWatch(port, record).fed_before().pid == app.pid
    with Listener(port):                         # a new, empty app
        assert AppWatch(port, record).fed_before() is None


def test_a_record_from_before_sockets_were_recorded_still_matches_by_process(tmp_path):
    port = free_port()
    record = tmp_path / "app.json"
    with Listener(port) as app:
        record.write_text('{"pid": %d, "create_time": %r}' % (app.pid, psutil.Process(app.pid).create_time()))
        assert AppWatch(port, str(record)).fed_before().pid == app.pid


def test_processes_are_those_of_the_identity_only():
    port = free_port()
    watch = AppWatch(port)
    with Listener(port) as app:
        identity = watch.current()
        assert [p.pid for p in watch.processes(identity)] == [app.pid]
    assert watch.processes(identity) == [], "a dead app's pid is never signalled"


def test_local_hosts():
    assert is_local_host("127.0.0.1") and is_local_host("localhost") and is_local_host("::1")
    assert not is_local_host("192.0.2.1")  # TEST-NET-1: never an address of this host
