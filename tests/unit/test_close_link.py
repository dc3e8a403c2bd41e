"""CloseLink, close framing's exchanges with the app (smrd/_core_close.pxi and its pure-Python twin
in smrd/_core_py.py): both twins, side by side, against the same small apps on 127.0.0.1, with
the same outcomes. Every scenario runs on each twin; what is asserted is the contract:
  - one connection per request, a request written only once the reply before it is complete;
  - every connection verified before anything is written on it: by check(), or by the kernel's
    exact listener lookup against the inodes check last vouched for (and back to check on any
    other answer);
  - a connection not used (opened ahead, refused by check, found closed) is reset, never closed
    with a FIN, which the app would read as the empty request;
  - what went wrong is reported exactly (failed: nothing written; lost: that request in doubt).
The apps are threads on blocking sockets: nothing is faked, no clock but the short time-outs
under test.
"""
import errno
import os
import socket
import struct
import threading
import time

import pytest

from smrd import _core_py as P

C = pytest.importorskip("smrd._core", reason="smrd._core is not built: run `pip install -e .`")

HOST = "127.0.0.1"
TWINS = [pytest.param(P, id="python"), pytest.param(C, id="cython")]


class App:
    """Serves close framing one connection at a time (accepting the next only when done with the
    previous, as a strictly sequential app would). handler(app, request, conn) -> reply bytes, or
    None when it answered (or hung up) itself. Records what it read: requests, and "RESET" for a
    connection that was reset instead of carrying a request."""

    def __init__(self, handler=None, port=0):
        self.handler = handler or (lambda app, request, conn: b"R:" + request)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.inode = os.fstat(self.sock.fileno()).st_ino
        self.seen = []
        self.accepted = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                chunks = []
                try:
                    while True:
                        data = conn.recv(65536)
                        if not data:
                            break
                        chunks.append(data)
                except ConnectionResetError:
                    self.seen.append("RESET")
                    continue
                request = b"".join(chunks)
                self.seen.append(request)
                reply = self.handler(self, request, conn)
                if reply is not None:
                    try:
                        conn.sendall(reply)
                    except OSError:
                        pass

    def close(self):
        self.sock.close()


def addr(port):
    return [(socket.AF_INET, (HOST, port))]


def link(twin, port, timeout=2.0, max_reply=1 << 20, recheck=0.05, ahead=True):
    return twin.CloseLink(addr(port), timeout, max_reply, recheck, ahead)


def outcome(run, replies):
    return {"replies": list(replies), "connections": run.connections, "timed_out": run.timed_out,
            "failed": run.failed, "lost": run.lost, "raised": run.raised}


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)  # another thread's progress: nothing to wait on but its state


@pytest.mark.parametrize("twin", TWINS)
def test_requests_in_order_one_connection_each(twin):
    app = App()
    try:
        requests = [b"r%d" % i for i in range(40)] + [b"", b"bin\x00\n\xff", b"x" * 300_000]
        replies, run = [], twin.CloseRun()
        link(twin, app.port).exchange(requests, replies, run)
        assert outcome(run, replies) == {
            "replies": [b"R:" + r for r in requests], "connections": len(requests),
            "timed_out": False, "failed": None, "lost": None, "raised": None}
        assert app.seen == requests  # no empty request from a connection opened ahead
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_starts_at_len_replies_and_keeps_what_is_there(twin):
    app = App()
    try:
        replies, run = [b"earlier"], twin.CloseRun()
        link(twin, app.port).exchange([b"done", b"a", b"b"], replies, run)
        assert replies == [b"earlier", b"R:a", b"R:b"] and app.seen == [b"a", b"b"]
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_check_vouches_once_then_the_kernel_lookup_verifies(twin):
    """check() returns the listener's inode: the next connections are verified by the exact
    lookup (no further calls) until recheck_s; a later call asks check again first."""
    app = App()
    calls = []

    def check():
        calls.append(1)
        return frozenset({app.inode})

    try:
        replies, run = [], twin.CloseRun()
        ln = link(twin, app.port, recheck=60.0)
        ln.exchange([b"a", b"b", b"c", b"d"], replies, run, check)
        assert replies == [b"R:a", b"R:b", b"R:c", b"R:d"] and len(calls) == 1
        replies, run = [], twin.CloseRun()
        ln.exchange([b"e", b"f"], replies, run, check)
        assert replies == [b"R:e", b"R:f"] and len(calls) == 2  # every call starts with check
        replies, run = [], twin.CloseRun()
        link(twin, app.port, recheck=0.0).exchange([b"g", b"h"], replies, run, check)
        assert len(calls) == 4  # trusted for no time: check on every connection
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("spec", [None, frozenset({1}), frozenset(range(1, 20)), "not inodes"])
def test_anything_but_the_reached_listener_goes_back_to_check(twin, spec):
    """No vouching, an inode that does not listen there, too many inodes, junk: check is called
    for every connection, exactly as without the lookup."""
    app = App()
    calls = []

    def check():
        calls.append(1)
        return spec

    try:
        replies, run = [], twin.CloseRun()
        link(twin, app.port, recheck=60.0).exchange([b"a", b"b", b"c"], replies, run, check)
        assert replies == [b"R:a", b"R:b", b"R:c"] and len(calls) == 3
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_a_replaced_listener_is_not_trusted(twin):
    """The app is replaced between two requests (a new listening socket on the same port): the
    lookup answers another inode, so check is asked, and what it raises ends the call with nothing
    written on that connection (which is reset: the new app sees no request)."""
    holder = {}

    def handler(app, request, conn):
        if request == b"swap":
            app.sock.close()  # the old listener goes; a new one takes the port
            holder["new"] = App(port=app.port)
        return b"R:" + request

    old = App(handler)

    class Restarted(Exception):
        pass

    def check():
        new = holder.get("new")
        if new is not None:
            raise Restarted("another socket listens")
        return frozenset({old.inode})

    try:
        replies, run = [], twin.CloseRun()
        link(twin, old.port, recheck=60.0).exchange([b"a", b"swap", b"b"], replies, run, check)
        assert replies == [b"R:a", b"R:swap"]
        assert isinstance(run.raised, Restarted) and run.failed is None and run.lost is None
        assert run.connections == 3
        new = holder["new"]
        # The connection opened ahead for "b" reached the new app, or, when it was opened while
        # the handler was still swapping, the old one's backlog (reset when it closed). Either
        # way nothing was written on it: the new app sees at most that reset, never a request.
        wait_for(lambda: len(new.seen) >= new.accepted)  # every connection it took is read
        assert new.seen in ([], ["RESET"])
    finally:
        old.close()
        if "new" in holder:
            holder["new"].close()


@pytest.mark.parametrize("twin", TWINS)
def test_check_raising_writes_nothing_and_resets_the_connection(twin):
    app = App()
    calls = []

    class Unverified(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Unverified("nothing listens")

    try:
        replies, run = [], twin.CloseRun()
        link(twin, app.port).exchange([b"a", b"b", b"c"], replies, run, check)
        assert replies == [b"R:a"] and isinstance(run.raised, Unverified)
        assert run.connections == 2 and run.failed is None and run.lost is None
        wait_for(lambda: len(app.seen) == 2)
        assert app.seen == [b"a", "RESET"]
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_a_lost_reply_leaves_the_connection_opened_ahead_unused_and_reset(twin):
    def handler(app, request, conn):
        if request == b"die":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None  # closed with a reset: the reply is lost
        return b"R:" + request

    app = App(handler)
    try:
        replies, run = [], twin.CloseRun()
        link(twin, app.port).exchange([b"a", b"die", b"b"], replies, run)
        assert replies == [b"R:a"] and run.lost == ("error", errno.ECONNRESET)
        assert run.connections == 2  # the one opened ahead for b was never taken
        wait_for(lambda: len(app.seen) == 3)
        assert app.seen == [b"a", b"die", "RESET"]
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_no_connection_ahead_when_asked_not_to(twin):
    def handler(app, request, conn):
        return b"R:%d" % app.accepted  # how many connections the app took so far

    app = App(handler)
    try:
        replies, run = [], twin.CloseRun()
        link(twin, app.port, ahead=False).exchange([b"a", b"b"], replies, run)
        assert replies == [b"R:1", b"R:2"]
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_an_empty_reply_is_a_reply_and_a_trickle_times_out(twin):
    def handler(app, request, conn):
        if request == b"empty":
            return b""
        if request == b"trickle":
            for _ in range(100):
                try:
                    conn.sendall(b".")
                except OSError:
                    return None
                time.sleep(0.02)
            return None
        return b"R:" + request

    app = App(handler)
    try:
        replies, run = [], twin.CloseRun()
        start = time.monotonic()
        link(twin, app.port, timeout=0.2).exchange([b"a", b"empty", b"trickle", b"b"], replies, run)
        assert time.monotonic() - start < 1.5
        assert outcome(run, replies) == {
            "replies": [b"R:a", b""], "connections": 3, "timed_out": True, "failed": None,
            "lost": ("timeout", None), "raised": None}
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_a_reply_over_max_reply_is_lost_as_too_large(twin):
    app = App(lambda app, request, conn: b"y" * 10_000)
    try:
        replies, run = [], twin.CloseRun()
        link(twin, app.port, max_reply=5000).exchange([b"a"], replies, run)
        kind, received = run.lost
        assert kind == "too-large" and received > 5000 and replies == []
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_refused_and_closed_at_once_are_failures_with_nothing_written(twin):
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    replies, run = [], twin.CloseRun()
    link(twin, port).exchange([b"a"], replies, run)
    assert run.failed == ("connect", errno.ECONNREFUSED) and run.connections == 0

    closed = threading.Event()

    def check():
        assert closed.wait(5)  # the app's FIN is in before we look

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(4)

    def close_first():
        conn, _ = listener.accept()
        conn.close()
        closed.set()

    thread = threading.Thread(target=close_first, daemon=True)
    thread.start()
    try:
        replies, run = [], twin.CloseRun()
        link(twin, listener.getsockname()[1]).exchange([b"a"], replies, run, check)
        assert run.failed == ("closed", None) and run.connections == 1 and replies == []
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize("twin", TWINS)
def test_a_full_accept_queue_is_a_connect_time_out(twin):
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind((HOST, 0))
        listener.listen(0)
        queued.connect(listener.getsockname())  # fills the queue; nobody ever accepts
        replies, run = [], twin.CloseRun()
        start = time.monotonic()
        link(twin, listener.getsockname()[1], timeout=0.2).exchange([b"a"], replies, run)
        assert time.monotonic() - start < 2
        assert run.failed == ("connect-timeout", None) and run.timed_out


@pytest.mark.parametrize("twin", TWINS)
def test_stop_ends_the_call_after_the_exchange_under_way(twin):
    release = threading.Event()

    def handler(app, request, conn):
        if request == b"slow":
            assert release.wait(5)
        return b"R:" + request

    app = App(handler)
    try:
        replies, run = [], twin.CloseRun()
        worker = threading.Thread(target=link(twin, app.port).exchange,
                                  args=([b"a", b"slow", b"c"], replies, run))
        worker.start()
        wait_for(lambda: b"slow" in app.seen)
        run.stop = True
        release.set()
        worker.join(5)
        assert replies == [b"R:a", b"R:slow"] and run.failed is None and run.lost is None
        wait_for(lambda: len(app.seen) == 3)
        assert app.seen == [b"a", b"slow", "RESET"]  # c's connection, opened ahead, unused
    finally:
        app.close()


@pytest.mark.parametrize("twin", TWINS)
def test_arguments(twin):
    with pytest.raises(ValueError):
        twin.CloseLink([], 1.0, 10)
    with pytest.raises(ValueError):
        twin.CloseLink(addr(1), 0.0, 10)
    with pytest.raises(ValueError):
        twin.CloseLink(addr(1), 1.0, -1)
    with pytest.raises(TypeError):
        twin.CloseLink(addr(1), 1.0, 10).exchange([bytearray(b"x")], [], twin.CloseRun())
    run = twin.CloseRun()
    twin.CloseLink(addr(1), 1.0, 10).exchange([b"a"], [b"A"], run)  # nothing left to do
    assert run.connections == 0 and run.failed is None
