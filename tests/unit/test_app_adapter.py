"""smrd.replica.app_adapter: never reorder, never skip, never invent.

Against the real demo app (a subprocess, line and close framing) and small in-test servers for
what a well-behaved app never does: hang, die mid-reply, come up late, send too much. Waiting is
synchronised on the adapter's on_state_change callback or on the test servers' own events, never
on guessed sleeps; the only clocks are the adapter's short reply time-outs under test.
"""
import asyncio
import contextlib
import gc
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from smrd.replica import app_adapter
from smrd.replica.app_adapter import (
    AppAdapter, AppConnectionLost, AppError, AppProtocolError,
)
from smrd.framing import FramingError

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def run(coro, timeout=15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- the real demo app ------------------------------------------------------------------------

def start_hashmap(framing, port=0, stderr=subprocess.DEVNULL):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smrd.apps.hashmap", "--host", HOST, "--port", str(port),
         "--framing", framing], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"hashmap did not start (exit {proc.wait()}): {line!r}")
    return proc, int(line.split()[1].rsplit(":", 1)[1])


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stdout.close()


@pytest.fixture(scope="module", params=["line", "close"])
def hashmap(request):
    proc, port = start_hashmap(request.param)
    yield request.param, port
    stop(proc)


def kv_workload(n, seed, prefix, close_framing):
    """n random PUT/GET/REMOVE requests and the replies a dict model predicts for them."""
    rng = random.Random(seed)
    model, requests, expected = {}, [], []
    end = b"\n" if close_framing else b""  # close framing: the reply is followed by "\n"
    for i in range(n):
        key = b"%s-k%d" % (prefix, rng.randrange(20))
        op = rng.choice((b"PUT", b"PUT", b"GET", b"GET", b"REMOVE"))
        if op == b"PUT":
            value = b"v%d" % i
            requests.append(b"PUT " + key + b" " + value)
            model[key] = value
            expected.append(b"OK" + end)
        elif op == b"GET":
            requests.append(b"GET " + key)
            expected.append((b"VALUE " + model[key] if key in model else b"NOT_FOUND") + end)
        else:
            requests.append(b"REMOVE " + key)
            expected.append((b"OK" if model.pop(key, None) is not None else b"NOT_FOUND") + end)
    return requests, expected


@pytest.mark.parametrize("pipeline", [64, 7, 1])
def test_hashmap_order_preserved_against_dict_model(hashmap, pipeline):
    mode, port = hashmap
    n = 1000 if mode == "line" else 150  # close mode: one connection per request

    async def main():
        states = []
        async with AppAdapter(HOST, port, mode, pipeline=pipeline,
                              on_state_change=lambda r, why: states.append(r)) as adapter:
            requests, expected = kv_workload(n, seed=pipeline, prefix=b"p%d" % pipeline,
                                             close_framing=mode == "close")
            replies = await adapter.execute(requests)
            assert replies == expected
            # A second call on the same adapter continues the same app state and connection.
            more = await adapter.execute([b"SIZE", b"GET nobody"])
            assert more[1] == (b"NOT_FOUND\n" if mode == "close" else b"NOT_FOUND")
            assert adapter.ready and states == [True]
            assert adapter.stats["requests"] == n + 2
            if mode == "line":
                assert adapter.stats["connections"] == 1
            else:
                assert adapter.stats["connections"] == n + 2
            assert adapter.stats["errors"] == adapter.stats["retries"] == 0
    run(main())


def test_hashmap_killed_with_requests_in_flight_then_restarted(tmp_path):
    """SIGSTOP the app so it cannot answer, write a window, SIGKILL it: every written request is
    in doubt (the adapter cannot know the app never read them) and is reported, not resent. A
    restarted app is reached again, and it is empty: the adapter hides nothing from the caller,
    which owns rebuilding the app's state."""
    proc, port = start_hashmap("line")
    try:
        async def main():
            states = []
            adapter = AppAdapter(HOST, port, "line", timeout_s=5,
                                 on_state_change=lambda r, why: states.append(r))
            assert await adapter.execute([b"PUT a 1"]) == [b"OK"]
            os.kill(proc.pid, signal.SIGSTOP)
            task = asyncio.create_task(adapter.execute([b"PUT b 2", b"GET a", b"GET b"]))
            await asyncio.sleep(0)  # the task writes its window in its first step
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            with pytest.raises(AppConnectionLost) as info:
                await task
            assert info.value.executed_unknown == [0, 1, 2]
            assert info.value.replies_so_far == [] and info.value.not_written == []
            assert states == [True, False] and not adapter.ready

            proc2, _ = start_hashmap("line", port=port)
            try:
                assert await adapter.execute([b"GET a"]) == [b"NOT_FOUND"]
                assert states == [True, False, True]
            finally:
                stop(proc2)
            await adapter.close()
        run(main())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


# -- in-test apps -----------------------------------------------------------------------------

class App:
    """A small asyncio server: handler(reader, writer) per connection. Counts connections, how
    many were open at once, and how many requests were being served at once (handlers mark that
    with `serving()`), and records every request it read (`seen`)."""

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.busy = 0
        self.max_busy = 0
        self.seen = []
        self.writers = set()
        self.event = asyncio.Event()
        self.server = None
        self.port = None

    async def start(self, port=0):
        self.server = await asyncio.start_server(self._handle, HOST, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.writers.add(writer)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            self.writers.discard(writer)
            writer.close()

    @contextlib.contextmanager
    def serving(self):
        """From a whole request read until its reply is written (the connection closes right
        after, with nothing awaited in between)."""
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        try:
            yield
        finally:
            self.busy -= 1

    async def stop(self):
        self.server.close()
        for writer in list(self.writers):  # handlers still waiting: hang up on the adapter
            writer.transport.abort()
        await asyncio.sleep(0)


async def read_lines(app, reader, n):
    lines = []
    for _ in range(n):
        line = (await reader.readuntil(b"\n"))[:-1]
        app.seen.append(line)
        lines.append(line)
    return lines


async def echo_lines(app, reader, writer):
    while True:
        line = await reader.readline()
        if not line:
            return
        app.seen.append(line[:-1])
        writer.write(b"R:" + line)


async def echo_close(app, reader, writer):
    request = await reader.read()  # until the adapter half-closes
    with app.serving():
        app.seen.append(request)
        await asyncio.sleep(0.002)  # overlapping requests would show up in max_busy
        writer.write(b"R:" + request)
        await writer.drain()


def reset(writer):
    """Die the way a crashed process with unread input does: a RST, not a FIN."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_close_mode_one_connection_per_request_strictly_sequential():
    async def main():
        app = await App(echo_close).start()
        requests = [b"req %d" % i for i in range(30)] + [b"", b"bin\x00\n\r\xff"]
        async with AppAdapter(HOST, app.port, "close") as adapter:
            replies = await adapter.execute(requests)
        assert replies == [b"R:" + r for r in requests]
        assert app.seen == requests
        assert app.connections == len(requests)
        assert app.max_busy == 1
        # The next request's connection may be open while a reply is awaited, never more.
        assert app.max_active <= 2
        await app.stop()
    run(main())


def test_length_mode_pipelined_binary_and_empty_messages():
    async def handler(app, reader, writer):
        while True:
            try:
                prefix = await reader.readexactly(4)
            except asyncio.IncompleteReadError:
                return
            body = await reader.readexactly(int.from_bytes(prefix, "big"))
            app.seen.append(body)
            reply = b"L:" + body[::-1]
            writer.write(len(reply).to_bytes(4, "big") + reply)

    async def main():
        app = await App(handler).start()
        rng = random.Random(7)
        requests = [bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
                    for _ in range(1000)]
        requests[3] = b""
        requests[4] = b"x" * 100_000
        async with AppAdapter(HOST, app.port, "length", pipeline=16) as adapter:
            replies = await adapter.execute(requests)
        assert replies == [b"L:" + r[::-1] for r in requests]
        assert app.seen == requests and app.connections == 1
        await app.stop()
    run(main())


def http_request(method, target, body=None):
    head = b"%s %s HTTP/1.1\r\nHost: app\r\n" % (method, target)
    if body is None:
        return head + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def http_app(app, reader, writer):
    """GET: Content-Length body; HEAD: Content-Length but no body; POST: chunked echo;
    /close: answers with Connection: close and stops reading (RFC 9112 §9.6)."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        method, target = head.split(b" ")[:2]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        app.seen.append(method + b" " + target)
        payload = b"%s %s" % (method, target)
        if method == b"POST":
            writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        elif target == b"/close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(payload), payload))
            await writer.drain()
            return
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
            if method != b"HEAD":
                writer.write(payload)


def test_http_mode_head_chunked_and_connection_close_mid_pipeline():
    async def main():
        app = await App(http_app).start()
        requests = [http_request(b"GET", b"/a"), http_request(b"HEAD", b"/b"),
                    http_request(b"POST", b"/c", b"hello"), http_request(b"GET", b"/close"),
                    http_request(b"GET", b"/d"), http_request(b"HEAD", b"/e"),
                    http_request(b"GET", b"/f")]
        async with AppAdapter(HOST, app.port, "http") as adapter:
            replies = await adapter.execute(requests)
            assert replies == [
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nGET /a",
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",  # HEAD: no body, length kept
                b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nGET /close",
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nGET /d",
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nGET /f",
            ]
            # Requests after the closing response were not processed there; each ran exactly
            # once, in order, the rest on a new connection.
            assert app.seen == [b"GET /a", b"HEAD /b", b"POST /c", b"GET /close", b"GET /d",
                                b"HEAD /e", b"GET /f"]
            assert app.connections == 2 and adapter.stats["reconnects"] == 1
            assert adapter.stats["errors"] == 0
        await app.stop()
    run(main())


async def http_close_delimited(app, reader, writer):
    """An HTTP/1.0-style app: reads one request, answers without a length, closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    app.seen.append(head.split(b" ")[1])
    writer.write(b"HTTP/1.1 200 OK\r\n\r\nbody of " + head.split(b" ")[1])
    await writer.drain()


def test_http_close_delimited_replies_pipelined_leave_the_rest_in_doubt():
    """A reply delimited by the close promises nothing about requests pipelined behind it (unlike
    Connection: close): they are in doubt, never resent. pipeline=1 serves such an app."""
    async def main():
        app = await App(http_close_delimited).start()
        requests = [http_request(b"GET", b"/%d" % i) for i in range(3)]
        adapter = AppAdapter(HOST, app.port, "http")
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute(requests)
        assert info.value.replies_so_far == [
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nbody of /0"]
        assert info.value.executed_unknown == [1, 2]
        one_by_one = AppAdapter(HOST, app.port, "http", pipeline=1)
        replies = await one_by_one.execute(requests)
        assert [r[-10:] for r in replies] == [b"body of /0", b"body of /1", b"body of /2"]
        assert one_by_one.stats["connections"] == 3 and one_by_one.stats["errors"] == 0
        assert app.seen == [b"/0", b"/0", b"/1", b"/2"]
        await app.stop()
    run(main())


# -- failures: down, hung, dying, misbehaving apps --------------------------------------------

@pytest.mark.parametrize("mode", ["line", "close"])
def test_app_down_at_first_then_up(mode):
    async def main():
        port = free_port()
        states = []
        went_down = asyncio.Event()

        def on_state(ready, reason):
            states.append((ready, reason))
            if not ready:
                went_down.set()

        adapter = AppAdapter(HOST, port, mode, on_state_change=on_state)
        task = asyncio.create_task(adapter.execute([b"one", b"two", b"three"]))
        await went_down.wait()  # the adapter met a refused connect and is backing off
        assert not adapter.ready and "cannot connect" in states[0][1]
        app = await App(echo_lines if mode == "line" else echo_close).start(port)
        replies = await task
        assert replies == [b"R:one", b"R:two", b"R:three"]
        assert [ready for ready, _ in states] == [False, True] and adapter.ready
        assert adapter.stats["retries"] >= 1
        assert app.seen == [b"one", b"two", b"three"]  # nothing skipped, nothing twice
        await adapter.close()
        await app.stop()
    run(main())



def _back_off_cancelled_after(count, monkeypatch):
    """Replaces the adapter's back-off sleep: records each delay and raises CancelledError on the
    count-th, as a replica shutting down would. Returns the list the delays go into."""
    delays = []

    async def fake_sleep(delay):
        delays.append(delay)
        if len(delays) == count:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    monkeypatch.setattr(app_adapter, "_sleep", fake_sleep)
    return delays

def test_backoff_to_an_app_never_reached_grows_from_20_ms_to_100_ms(monkeypatch):
    delays = _back_off_cancelled_after(12, monkeypatch)

    async def main():
        adapter = AppAdapter(HOST, free_port(), "line")
        with pytest.raises(asyncio.CancelledError):
            await adapter.execute([b"x"])
        # An app never reached yet is most likely starting: at most 100 ms between attempts.
        assert delays == pytest.approx([0.02, 0.03, 0.045, 0.0675, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
        assert adapter.stats["retries"] == 12 and adapter.stats["connections"] == 0
    run(main())


def test_hung_app_times_out_with_requests_in_doubt():
    async def handler(app, reader, writer):
        lines = await read_lines(app, reader, 5)
        writer.write(b"R:%s\nR:%s\n" % (lines[0], lines[1]))  # then never another byte
        app.event.set()
        await asyncio.Event().wait()

    async def main():
        app = await App(handler).start()
        states = []
        adapter = AppAdapter(HOST, app.port, "line", timeout_s=0.2,
                             on_state_change=lambda r, why: states.append((r, why)))
        requests = [b"r%d" % i for i in range(5)]
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute(requests)
        err = info.value
        assert err.replies_so_far == [b"R:r0", b"R:r1"]
        assert err.executed_unknown == [2, 3, 4] and err.not_written == []
        assert "no reply" in err.reason and "2..4" in str(err)
        assert [r for r, _ in states] == [True, False] and not adapter.ready
        assert adapter.stats["timeouts"] == 1 and adapter.stats["errors"] == 1
        await app.stop()
    run(main())


def test_app_closes_mid_reply():
    async def handler(app, reader, writer):
        await read_lines(app, reader, 10)
        writer.write(b"R:0\nR:1\nR:2\nR:3-cut-sh")  # three replies and part of the fourth
        await writer.drain()

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line")
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"%d" % i for i in range(10)])
        assert info.value.replies_so_far == [b"R:0", b"R:1", b"R:2"]
        assert info.value.executed_unknown == list(range(3, 10))
        assert "mid-reply" in info.value.reason
        await app.stop()
    run(main())


def test_app_dies_after_reading_requests():
    async def handler(app, reader, writer):
        await read_lines(app, reader, 10)
        writer.write(b"R:0\nR:1\nR:2\n")
        await writer.drain()
        reset(writer)

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line")
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"%d" % i for i in range(10)])
        assert info.value.replies_so_far == [b"R:0", b"R:1", b"R:2"]
        assert info.value.executed_unknown == list(range(3, 10))
        await app.stop()
    run(main())


def test_app_dies_with_small_window_never_resends_and_reports_exactly():
    """pipeline < n: how much was written when the app died depends on timing, but the report is
    always exact: everything the app read is answered or in doubt, and nothing in doubt or not
    written was ever answered."""
    async def handler(app, reader, writer):
        for _ in range(20):
            line = (await read_lines(app, reader, 1))[0]
            writer.write(b"R:" + line + b"\n")
        await writer.drain()  # then closes, with unread requests: a reset

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line", pipeline=8)
        requests = [b"%d" % i for i in range(50)]
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute(requests)
        err = info.value
        assert err.replies_so_far == [b"R:%d" % i for i in range(20)]
        assert err.executed_unknown == list(range(20, 20 + len(err.executed_unknown)))
        assert 1 <= len(err.executed_unknown) <= 8
        assert err.not_written == list(range(20 + len(err.executed_unknown), 50))
        assert app.seen == requests[:20]
        await app.stop()
    run(main())


def test_close_mode_hang_and_reset_are_in_doubt():
    async def handler(app, reader, writer):
        request = await reader.read()
        app.seen.append(request)
        if request == b"hang":
            await asyncio.Event().wait()
        if request == b"reset":
            writer.write(b"partial")
            await writer.drain()
            reset(writer)
            return
        writer.write(b"R:" + request)

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "close", timeout_s=0.2)
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"a", b"hang", b"c"])
        assert info.value.replies_so_far == [b"R:a"]
        assert info.value.executed_unknown == [1] and info.value.not_written == [2]
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"reset", b"d"])
        assert info.value.replies_so_far == [] and info.value.executed_unknown == [0]
        assert await adapter.execute([b"e"]) == [b"R:e"]
        assert app.seen == [b"a", b"hang", b"reset", b"e"]  # never resent, never skipped ahead
        assert adapter.stats["timeouts"] == 1 and adapter.stats["errors"] == 2
        await app.stop()
    run(main())


@pytest.mark.parametrize("mode", ["line", "close"])
def test_too_large_reply_is_a_protocol_error(mode):
    async def handler(app, reader, writer):
        if mode == "close":
            request = await reader.read()
            writer.write(b"x" * 2000 if request == b"big" else b"R:" + request)
            return
        for line in await read_lines(app, reader, 3):
            writer.write((b"x" * 2000 if line == b"big" else b"R:" + line) + b"\n")
        await asyncio.Event().wait()

    async def main():
        app = await App(handler).start()
        states = []
        adapter = AppAdapter(HOST, app.port, mode, max_reply_bytes=1000,
                             on_state_change=lambda r, why: states.append(r))
        with pytest.raises(AppProtocolError) as info:
            await adapter.execute([b"ok", b"big", b"ok2"])
        err = info.value
        assert err.replies_so_far == [b"R:ok"]
        assert err.executed_unknown == ([1, 2] if mode == "line" else [1])
        assert "exceeds the limit of 1000" in err.reason
        assert states == [True, False]
        await app.stop()
    run(main())


def test_unparsable_http_reply_is_a_protocol_error():
    async def handler(app, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"I am not HTTP\r\n\r\n")
        await asyncio.Event().wait()

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "http")
        with pytest.raises(AppProtocolError) as info:
            await adapter.execute([http_request(b"GET", b"/")])
        assert info.value.executed_unknown == [0] and "bad reply" in info.value.reason
        await app.stop()
    run(main())


def test_extra_replies_are_a_protocol_error():
    async def handler(app, reader, writer):
        line = (await read_lines(app, reader, 1))[0]
        writer.write(b"R:" + line + b"\nsurprise\n")  # two replies to one request, one write
        await asyncio.Event().wait()

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line")
        with pytest.raises(AppProtocolError, match="2 replies to 1 requests"):
            await adapter.execute([b"a"])
        await app.stop()
    run(main())


def test_unsolicited_bytes_between_calls_are_reported_then_a_new_connection_is_used():
    async def handler(app, reader, writer):
        if app.connections > 1:
            return await echo_lines(app, reader, writer)
        line = (await read_lines(app, reader, 1))[0]
        writer.write(b"R:" + line + b"\n")
        await app.event.wait()
        writer.write(b"late\n")  # a reply to nothing
        await asyncio.Event().wait()

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line")
        assert await adapter.execute([b"a"]) == [b"R:a"]
        app.event.set()
        while adapter._conn.usable:  # until the stray bytes have arrived
            await asyncio.sleep(0.002)
        with pytest.raises(AppProtocolError) as info:
            await adapter.execute([b"b"])
        assert info.value.executed_unknown == [] and info.value.not_written == [0]
        assert await adapter.execute([b"b"]) == [b"R:b"]  # on a second connection
        assert app.seen == [b"a", b"b"] and app.connections == 2
        await app.stop()
    run(main())


def test_idle_connection_closed_by_app_reconnects_transparently():
    async def handler(app, reader, writer):
        line = (await read_lines(app, reader, 1))[0]
        writer.write(b"R:" + line + b"\n")
        await writer.drain()  # then close: an app that drops idle connections

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line")
        assert await adapter.execute([b"a"]) == [b"R:a"]
        while adapter._conn.usable:  # until the adapter has seen the app's FIN
            await asyncio.sleep(0.002)
        assert await adapter.execute([b"b"]) == [b"R:b"]
        assert adapter.stats["reconnects"] == 1 and adapter.stats["errors"] == 0
        assert app.seen == [b"a", b"b"]
        await app.stop()
    run(main())


def test_cancel_drops_the_connection_so_late_replies_are_never_misattributed():
    async def handler(app, reader, writer):
        while True:
            line = await reader.readline()
            if not line:
                return
            app.seen.append(line[:-1])
            if line == b"slow\n":
                app.event.set()
                await asyncio.sleep(0.1)
            writer.write(b"R:" + line)
            await writer.drain()

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "line")
        task = asyncio.create_task(adapter.execute([b"slow"]))
        await app.event.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await adapter.execute([b"fast"]) == [b"R:fast"]
        assert adapter.stats["connections"] == 2
        await adapter.close()
        with pytest.raises(RuntimeError):
            await adapter.execute([b"x"])
        await app.stop()
    run(main())


def test_execute_is_not_reentrant():
    async def main():
        app = await App(lambda app, r, w: asyncio.Event().wait()).start()
        adapter = AppAdapter(HOST, app.port, "line")
        task = asyncio.create_task(adapter.execute([b"a"]))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="not reentrant"):
            await adapter.execute([b"b"])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await app.stop()
    run(main())


def test_nothing_to_do_and_uncarriable_requests_touch_nothing():
    async def main():
        adapter = AppAdapter(HOST, free_port(), "line")
        assert await adapter.execute([]) == []
        with pytest.raises(FramingError):
            await adapter.execute([b"ok", b"two\nlines"])
        with pytest.raises(FramingError):
            await AppAdapter(HOST, 1, "http").execute([b"\x00not http"])
        assert adapter.stats["connections"] == 0 and adapter.stats["retries"] == 0
        assert adapter._state is None
    run(main())


def test_bad_arguments():
    with pytest.raises(ValueError):
        AppAdapter(HOST, 1, "udp")
    with pytest.raises(ValueError):
        AppAdapter(HOST, 1, "line", pipeline=0)
    with pytest.raises(ValueError):
        AppAdapter(HOST, 1, "line", timeout_s=0)
    with pytest.raises(ValueError):
        AppAdapter(HOST, 1, "line", max_reply_bytes=-1)


def test_errors_share_one_base():
    assert issubclass(AppConnectionLost, AppError) and issubclass(AppProtocolError, AppError)
    err = AppConnectionLost("gone", executed_unknown=range(2, 4), replies_so_far=[b"a", b"b"])
    assert err.executed_unknown == [2, 3] and err.replies_so_far == [b"a", b"b"]
    assert "gone" in str(err) and "2..3" in str(err)


# -- close mode's worker thread: every exit from a hop ---------------------------------------

def close_workers():
    """Close mode's worker threads now alive (one per adapter that ran close mode)."""
    return {t for t in threading.enumerate() if t.name == "smrd-app-close"}


def test_close_mode_reset_without_a_reply_and_an_empty_reply():
    """A reset is a lost reply (in doubt, never resent); a plain close with no bytes is the
    app's empty reply (docs/framing.md), not a loss."""
    async def handler(app, reader, writer):
        request = await reader.read()
        app.seen.append(request)
        if request == b"reset":
            reset(writer)
        elif request != b"empty":
            writer.write(b"R:" + request)

    async def main():
        app = await App(handler).start()
        states = []
        adapter = AppAdapter(HOST, app.port, "close",
                             on_state_change=lambda r, why: states.append(r))
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"a", b"empty", b"reset", b"b", b"c"])
        err = info.value
        assert err.replies_so_far == [b"R:a", b""]
        assert err.executed_unknown == [2] and err.not_written == [3, 4]
        assert "connection to the app lost" in err.reason
        assert states == [True, False] and adapter.stats["errors"] == 1
        assert adapter.stats["connections"] == 3 and adapter.stats["requests"] == 0
        assert await adapter.execute([b"b"]) == [b"R:b"]
        assert app.seen == [b"a", b"empty", b"reset", b"b"]
        await adapter.close()
        await app.stop()
    run(main())


def test_close_mode_reply_deadline_covers_the_whole_reply():
    """A hung app that trickles bytes does not keep the exchange alive: timeout_s bounds the
    whole reply, as the event loop's wait did."""
    async def handler(app, reader, writer):
        request = await reader.read()
        app.seen.append(request)
        if request == b"trickle":
            while True:
                writer.write(b".")
                await writer.drain()
                await asyncio.sleep(0.02)
        writer.write(b"R:" + request)

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "close", timeout_s=0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"a", b"trickle", b"c"])
        assert loop.time() - start < 2  # not kept alive by the bytes
        err = info.value
        assert err.reason == "no reply from the app within 0.2 s"
        assert err.replies_so_far == [b"R:a"]
        assert err.executed_unknown == [1] and err.not_written == [2]
        assert adapter.stats["timeouts"] == 1 and adapter.stats["errors"] == 1
        assert app.seen == [b"a", b"trickle"]
        await adapter.close()
        await app.stop()
    run(main())


def test_close_mode_app_not_reading_a_large_request_times_out():
    """Writing counts against timeout_s too: an app that stops reading cannot stall the adapter
    for longer (the request is in doubt: part of it was written)."""
    async def handler(app, reader, writer):
        await reader.readexactly(1000)
        app.seen.append(b"started")
        await asyncio.Event().wait()  # never reads the rest

    async def main():
        app = await App(handler).start()
        adapter = AppAdapter(HOST, app.port, "close", timeout_s=0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(AppConnectionLost) as info:
            await adapter.execute([b"x" * (64 << 20), b"next"])
        assert loop.time() - start < 2
        assert info.value.reason == "no reply from the app within 0.2 s"
        assert info.value.executed_unknown == [0] and info.value.not_written == [1]
        assert app.seen == [b"started"] and adapter.stats["timeouts"] == 1
        await adapter.close()
        await app.stop()
    run(main())


def test_close_mode_app_gone_mid_batch_then_back_resumes_where_it_stopped(monkeypatch):
    """Refused at request 2 after two replies: nothing is resent, the back-off starts afresh at
    20 ms for the new request, and the batch resumes at request 2 once the app listens again."""
    delays = []
    app = None
    # Request 2's connection, opened ahead while request 1 runs, may be accepted before the app
    # stops listening, and asyncio's server then drops it unanswered (with no on_connect here
    # to see that nothing listens): request 2 would be in doubt, not refused. This test is about
    # the refusal; test_close_mode_connection_opened_ahead_* are about connections opened ahead.
    monkeypatch.setattr(app_adapter, "CLOSE_CONNECT_AHEAD", False)

    async def fake_sleep(delay):
        delays.append(delay)
        if len(delays) == 2:
            await app.start(app.port)  # back on the same port
        await asyncio.sleep(0)

    monkeypatch.setattr(app_adapter, "_sleep", fake_sleep)

    async def handler(app, reader, writer):
        request = await reader.read()
        app.seen.append(request)
        if request == b"1":
            app.server.close()  # stop listening before answering: request 2 is refused
        writer.write(b"R:" + request)

    async def main():
        nonlocal app
        app = await App(handler).start()
        states = []
        adapter = AppAdapter(HOST, app.port, "close",
                             on_state_change=lambda r, why: states.append((r, why)))
        replies = await adapter.execute([b"0", b"1", b"2", b"3"])
        assert replies == [b"R:0", b"R:1", b"R:2", b"R:3"]
        assert app.seen == [b"0", b"1", b"2", b"3"]
        assert delays == pytest.approx([0.02, 0.03])
        assert [r for r, _ in states] == [True, False, True]
        assert "cannot connect" in states[1][1]
        assert adapter.stats["retries"] == 2 and adapter.stats["errors"] == 0
        assert adapter.stats["connections"] == 4 and adapter.stats["requests"] == 4
        await adapter.close()
        await app.stop()
    run(main())


def test_close_mode_backoff_and_cancel_during_it(monkeypatch):
    delays = _back_off_cancelled_after(7, monkeypatch)

    async def main():
        adapter = AppAdapter(HOST, free_port(), "close")
        with pytest.raises(asyncio.CancelledError):
            await adapter.execute([b"x", b"y"])
        assert delays == pytest.approx([0.02, 0.03, 0.045, 0.0675, 0.1, 0.1, 0.1])
        assert adapter.stats["retries"] == 7 and adapter.stats["connections"] == 0
        assert not adapter.ready
        await adapter.close()
    run(main())


def test_close_mode_close_during_back_off_ends_execute(monkeypatch):
    adapter = None

    async def fake_sleep(delay):
        await adapter.close()  # the caller closed without cancelling first: a caller's bug
        await asyncio.sleep(0)

    monkeypatch.setattr(app_adapter, "_sleep", fake_sleep)

    async def main():
        nonlocal adapter
        adapter = AppAdapter(HOST, free_port(), "close")
        with pytest.raises(RuntimeError, match="close"):
            await adapter.execute([b"x"])
        assert adapter.stats["retries"] == 1 and adapter.stats["connections"] == 0
    run(main())


def test_close_mode_unresolvable_host_is_retried(monkeypatch):
    reasons = []
    _back_off_cancelled_after(2, monkeypatch)

    def no_such_host(host, *args, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # no resolver needed

    async def main():
        adapter = AppAdapter("app.invalid", 7000, "close",
                             on_state_change=lambda r, why: reasons.append(why))
        with pytest.raises(asyncio.CancelledError):
            await adapter.execute([b"x"])
        assert reasons == ["cannot connect to app.invalid:7000: Name or service not known"]
        assert adapter.stats["retries"] == 2 and adapter.stats["connections"] == 0
        await adapter.close()
    run(main())


def test_close_mode_host_name_is_resolved():
    async def main():
        app = await App(echo_close).start()
        async with AppAdapter("localhost", app.port, "close") as adapter:
            try:
                replies = await adapter.execute([b"a", b"b"])
            except AppError:
                pytest.skip("localhost does not resolve to 127.0.0.1 here")
        assert replies == [b"R:a", b"R:b"]
        await app.stop()
    run(main())


def test_close_mode_connect_timeout_is_retried(monkeypatch):
    """A listener whose accept queue is full drops the SYN: connect times out (timeout_s)."""
    delays = _back_off_cancelled_after(1, monkeypatch)

    async def main():
        with socket.socket() as listener, socket.socket() as queued:
            listener.bind((HOST, 0))
            listener.listen(0)
            queued.connect(listener.getsockname())  # fills the queue; nobody ever accepts
            states = []
            adapter = AppAdapter(HOST, listener.getsockname()[1], "close", timeout_s=0.2,
                                 on_state_change=lambda r, why: states.append(why))
            with pytest.raises(asyncio.CancelledError):
                await adapter.execute([b"x"])
            assert states == [f"connect to {HOST}:{adapter.port} timed out after 0.2 s"]
            assert adapter.stats["timeouts"] == 1 and adapter.stats["retries"] == 1
            assert adapter.stats["connections"] == 0 and delays == [0.02]
            await adapter.close()
    run(main())


def test_close_mode_connection_closed_before_anything_was_written_is_retried():
    """Accepted, then closed by the app before a byte was written: nothing can have run, so the
    request goes again on a new connection. on_connect (in the worker thread) holds the write back
    until the app's FIN is in, so that the adapter sees it every time."""
    closed = threading.Event()

    async def handler(app, reader, writer):
        if app.connections == 1:
            writer.close()
            await writer.wait_closed()
            closed.set()
            return
        await echo_close(app, reader, writer)

    def on_connect():
        if not closed.is_set():
            assert closed.wait(5)

    async def main():
        app = await App(handler).start()
        states = []
        adapter = AppAdapter(HOST, app.port, "close",
                             on_state_change=lambda r, why: states.append(why))
        adapter.on_connect = on_connect
        assert await adapter.execute([b"a", b"b"]) == [b"R:a", b"R:b"]
        assert states[0] == f"{HOST}:{app.port} closed the connection at once"
        assert len(states) == 2
        assert app.seen == [b"a", b"b"] and app.connections == 3
        assert adapter.stats["connections"] == 3 and adapter.stats["retries"] == 1
        assert adapter.stats["errors"] == 0
        await adapter.close()
        await app.stop()
    run(main())


def test_close_mode_on_connect_raising_writes_nothing_more():
    class Restarted(AppError):
        pass

    calls = []
    raised = Restarted("the app's process changed")

    def on_connect():
        calls.append(1)
        if len(calls) == 3:
            raise raised

    async def main():
        app = await App(echo_close).start()
        states = []
        adapter = AppAdapter(HOST, app.port, "close",
                             on_state_change=lambda r, why: states.append(r))
        adapter.on_connect = on_connect
        with pytest.raises(Restarted) as info:
            await adapter.execute([b"a", b"b", b"c", b"d"])
        assert info.value is raised  # crossed from the worker thread as it was raised
        assert app.seen == [b"a", b"b"]
        assert adapter.stats["connections"] == 3 and adapter.stats["errors"] == 0
        assert states == [True]
        adapter.on_connect = None
        assert await adapter.execute([b"e"]) == [b"R:e"]
        # The third connection was dropped with nothing written on it, by a reset: a FIN would
        # have been the empty request to the app (a request nobody decided).
        assert app.seen == [b"a", b"b", b"e"]
        await adapter.close()
        await app.stop()
    run(main())


async def _held_at_slow(app, reader, writer):
    """Close mode: answers each request at once, except b"slow": held until app.release is set."""
    request = await reader.read()
    with app.serving():
        app.seen.append(request)
        if request == b"slow":
            app.event.set()
            await app.release.wait()
        writer.write(b"R:" + request)


def test_close_mode_cancel_mid_batch_writes_no_further_request():
    """Cancelled while the worker waits for a reply: that exchange ends on its own, nothing after
    it is written, and the next call starts only once it has ended (one connection at a time)."""
    async def main():
        app = await App(_held_at_slow).start()
        app.release = asyncio.Event()
        adapter = AppAdapter(HOST, app.port, "close")
        task = asyncio.create_task(adapter.execute([b"a", b"slow", b"c", b"d"]))
        await app.event.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        later = asyncio.create_task(adapter.execute([b"e"]))
        await asyncio.sleep(0.05)  # not a synchronisation: a chance to misbehave, if it could
        assert not later.done() and app.seen == [b"a", b"slow"]  # queued behind "slow"
        app.release.set()
        assert await later == [b"R:e"]
        assert app.seen == [b"a", b"slow", b"e"] and app.max_busy == 1
        await adapter.close()
        await app.stop()
    run(main())


def test_close_mode_close_during_execute_does_not_hang_and_ends_the_thread():
    async def main():
        app = await App(_held_at_slow).start()
        app.release = asyncio.Event()
        before = close_workers()
        adapter = AppAdapter(HOST, app.port, "close")
        task = asyncio.create_task(adapter.execute([b"a", b"slow", b"c"]))
        await app.event.wait()
        (thread,) = close_workers() - before
        await adapter.close()  # returns at once, with the worker mid-exchange
        assert not task.done()
        app.release.set()
        with pytest.raises(RuntimeError, match="close"):
            await task
        thread.join(5)
        assert not thread.is_alive()
        assert app.seen == [b"a", b"slow"]  # the exchange under way finished; nothing after it
        with pytest.raises(RuntimeError):
            await adapter.execute([b"x"])
        await app.stop()
    run(main())


def test_close_mode_large_request_and_reply():
    """Requests and replies larger than the socket buffers and than one read."""
    async def handler(app, reader, writer):
        request = await reader.read()
        app.seen.append(len(request))
        writer.write(request[::-1] * 2)
        await writer.drain()

    async def main():
        app = await App(handler).start()
        rng = random.Random(3)
        big = rng.randbytes(1 << 20)
        async with AppAdapter(HOST, app.port, "close") as adapter:
            replies = await adapter.execute([big, b"x", big[:70_000]])
        assert replies == [big[::-1] * 2, b"xx", big[:70_000][::-1] * 2]
        assert app.seen == [1 << 20, 1, 70_000]
        await app.stop()
    run(main())


def test_close_mode_thread_ends_with_an_adapter_never_closed():
    async def main():
        app = await App(echo_close).start()
        before = close_workers()
        adapter = AppAdapter(HOST, app.port, "close")
        assert await adapter.execute([b"a"]) == [b"R:a"]
        (thread,) = close_workers() - before
        del adapter
        gc.collect()
        thread.join(5)
        assert not thread.is_alive()
        await app.stop()
    run(main())
