"""smrd.app_watch: tells a restarted (empty) app from the one smrd fed, and never gives up
watching because of a moment when nothing listened.

Real listener processes on 127.0.0.1; the only thing faked is psutil's answer in the one case
this machine cannot produce (a listener whose process is hidden from us)."""
import logging
import socket
import subprocess
import sys
from collections import namedtuple

import psutil
import pytest

from smrd import app_watch
from smrd.app_watch import ABSENT_LIMIT, AppRestarted, AppWatch

LISTENER = ("import socket, sys\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
            "print('up', flush=True); sys.stdin.read()\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """A separate process listening on the port, as the app would: its own pid and start time."""

    def __init__(self, port):
        self.proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "up"  # listening from here on

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def test_nothing_listening_is_retried_and_a_later_listener_is_adopted():
    port = free_port()
    watch = AppWatch(port)
    watch.check()                        # the app that accepted us is already gone
    assert watch.identity is None and watch.visible, "a moment with no listener is not 'hidden'"
    with Listener(port) as app:
        watch.check()
        assert watch.identity == (app.proc.pid, psutil.Process(app.proc.pid).create_time())
        watch.check()                    # same process: nothing to say


def test_a_listener_never_seen_while_connections_succeed_stops_the_watching():
    # The app's socket lives where psutil cannot see it (another network namespace): scanning
    # every socket again on every connection would be paid per request in close mode.
    watch = AppWatch(free_port())
    for _ in range(ABSENT_LIMIT - 1):
        watch.check()
        assert watch.visible
    watch.check()
    assert not watch.visible and watch.identity is None


def test_a_replaced_app_is_reported_as_restarted():
    port = free_port()
    watch = AppWatch(port)
    first = Listener(port)
    watch.check()
    assert watch.identity[0] == first.proc.pid
    first.kill()
    with Listener(port):
        with pytest.raises(AppRestarted, match=f"was pid {first.proc.pid}"):
            watch.check()


def test_an_app_that_outlived_smrd_is_recognised_from_the_record(tmp_path):
    port = free_port()
    record = str(tmp_path / "app.json")
    with Listener(port) as app:
        AppWatch(port, record).check()           # an earlier smrd fed this process
        assert AppWatch(port, record).fed_before()[0] == app.proc.pid
    with Listener(port):                         # a new, empty app
        assert AppWatch(port, record).fed_before() is None


def test_a_listener_whose_process_is_hidden_stops_watching_with_a_warning(monkeypatch, caplog):
    port = free_port()
    conn = namedtuple("conn", "status laddr pid")
    addr = namedtuple("addr", "ip port")
    monkeypatch.setattr(app_watch.psutil, "net_connections",
                        lambda kind: [conn(psutil.CONN_LISTEN, addr("127.0.0.1", port), None)])
    watch = AppWatch(port)
    with caplog.at_level(logging.WARNING, logger="smrd.app_watch"):
        watch.check()
        watch.check()
    assert watch.identity is None and not watch.visible
    assert len([r for r in caplog.records if "cannot see the process" in r.message]) == 1
