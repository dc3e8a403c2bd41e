# Tests of the demo app (smrd/apps/hashmap.py) run as a real subprocess in both framings, and of
# the kvclient CLI and API against it. The app's port comes from its start line (`--port 0`), never
# from sleeping. Everything here is loopback-only and quick.
import ast
import asyncio
import base64
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import smrd
from smrd.apps import hashmap, kvclient
from smrd.apps.kvclient import (AsyncKVClient, KVClient, KVNoReply, KVReplyError, KVUnavailable)

PACKAGE_PARENT = str(Path(smrd.__file__).resolve().parent.parent)
START_TIMEOUT = 15.0


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


class App:
    """The hashmap app in a subprocess; `port` is parsed from its start line."""

    def __init__(self, framing, *extra):
        self.framing = framing
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smrd.apps.hashmap", "--host", "127.0.0.1", "--port", "0",
             "--framing", framing, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("listening "):
            self.stop()
            raise AssertionError(f"no start line (got {line!r}); stderr: {self.process.stderr.read()!r}")
        self.start_line = line.strip()
        self.port = int(line.strip().rpartition(":")[2])

    def stop(self, signum=signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=10)
        finally:
            self.stderr = self.process.stderr.read() if self.process.poll() is not None else b""
            self.process.stdout.close()
            self.process.stderr.close()

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client(self, **kwargs) -> KVClient:
        return KVClient("127.0.0.1", self.port, self.framing, **kwargs)


@pytest.fixture
def line_app():
    app = App("line")
    yield app
    app.stop()


@pytest.fixture(scope="module")
def shared_line_app():
    """For tests that leave no state behind that another could see: saves a process start each."""
    app = App("line")
    yield app
    app.stop()


@pytest.fixture
def close_app():
    app = App("close")
    yield app
    app.stop()


def connect(port) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_lines(sock, count) -> list:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    lines = data.split(b"\n")
    assert lines[count:] == [b""], "more bytes than the replies asked for"
    return lines[:count]


def read_to_eof(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return data
        data += chunk


def ask_line(sock, request: bytes) -> bytes:
    sock.sendall(request + b"\n")
    return read_lines(sock, 1)[0]


def ask_close(port, request: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- line framing ---------------------------------------------------------------------------------

def test_line_every_command(line_app):
    assert line_app.start_line == f"listening 127.0.0.1:{line_app.port}"
    with connect(line_app.port) as sock:
        script = [
            (b"GET a", b"NOT_FOUND"), (b"SIZE", b"SIZE 0"), (b"SCAN", b"SCAN 0"),
            (b"PUT b 2", b"OK"), (b"PUT a 1", b"OK"), (b"PUT a 11", b"OK"),
            (b"GET a", b"VALUE 11"), (b"SIZE", b"SIZE 2"), (b"SCAN", b"SCAN 2 a 11 b 2"),
            (b"REMOVE a", b"OK"), (b"REMOVE a", b"NOT_FOUND"), (b"GET a", b"NOT_FOUND"),
            (b"SIZE", b"SIZE 1"), (b"PUT  c \t 3 ", b"OK"), (b"GET c", b"VALUE 3"),
        ]
        for request, reply in script:
            assert ask_line(sock, request) == reply, request
        snapshot = ask_line(sock, b"SNAPSHOT")
        assert snapshot.startswith(b"SNAPSHOT ") and len(snapshot.split()) == 2
        assert ask_line(sock, b"RESTORE " + base64.b64encode(hashmap.serialize({}))) == b"OK"
        assert ask_line(sock, b"SIZE") == b"SIZE 0"
        assert ask_line(sock, snapshot.replace(b"SNAPSHOT", b"RESTORE")) == b"OK"
        assert ask_line(sock, b"SCAN") == b"SCAN 2 b 2 c 3"


def test_line_crlf_and_pipelining(line_app):
    with connect(line_app.port) as sock:
        requests = b"".join(b"PUT k%d %d\r\n" % (n, n) for n in range(500))
        requests += b"".join(b"GET k%d\n" % n for n in range(500)) + b"SIZE\n"
        sock.sendall(requests)  # everything before reading anything
        replies = read_lines(sock, 1001)
        assert replies[:500] == [b"OK"] * 500
        assert replies[500:1000] == [b"VALUE %d" % n for n in range(500)]
        assert replies[1000] == b"SIZE 500"


@pytest.mark.parametrize("request_line, reply", [
    (b"", b"ERR empty request"),
    (b"   ", b"ERR empty request"),
    (b"HELLO", b"ERR unknown command"),
    (b"put a 1", b"ERR unknown command"),
    (b"PUT a", b"ERR usage: PUT <key> <value>"),
    (b"PUT a 1 2", b"ERR usage: PUT <key> <value>"),
    (b"GET", b"ERR usage: GET <key>"),
    (b"GET a b", b"ERR usage: GET <key>"),
    (b"REMOVE", b"ERR usage: REMOVE <key>"),
    (b"SIZE 1", b"ERR usage: SIZE"),
    (b"SCAN x", b"ERR usage: SCAN"),
    (b"SNAPSHOT x", b"ERR usage: SNAPSHOT"),
    (b"RESTORE", b"ERR usage: RESTORE <base64>"),
    (b"RESTORE !!!!", b"ERR bad snapshot: not base64"),
    (b"RESTORE " + base64.b64encode(b"junk"), b"ERR bad snapshot: truncated"),
    (b"\xff\xfe GET", b"ERR unknown command"),
])
def test_bad_commands_get_err_and_keep_the_connection(shared_line_app, request_line, reply):
    with connect(shared_line_app.port) as sock:
        assert ask_line(sock, b"PUT keep 1") == b"OK"
        assert ask_line(sock, request_line) == reply
        assert ask_line(sock, b"GET keep") == b"VALUE 1"


def test_line_oversized_request_is_refused_and_closed():
    app = App("line", "--max-request", "1024")
    try:
        with connect(app.port) as sock:
            assert ask_line(sock, b"PUT a " + b"x" * 1000) == b"OK"  # within the limit
            sock.sendall(b"GET a\n" + b"PUT b " + b"y" * 5000 + b"\nGET a\n")
            assert read_to_eof(sock) == b"VALUE " + b"x" * 1000 + b"\nERR request too large\n"
        with connect(app.port) as sock:  # the limit also holds for a line still missing its "\n"
            sock.sendall(b"z" * 3000)
            assert read_to_eof(sock) == b"ERR request too large\n"
        with connect(app.port) as sock:  # the app is still serving
            assert ask_line(sock, b"SIZE") == b"SIZE 1"
    finally:
        assert app.stop() == 0


def test_line_big_values():
    with App("line") as app:
        with connect(app.port) as sock:
            value = b"0123456789abcdef" * (hashmap.MAX_TOKEN_BYTES // 16)  # exactly the limit
            assert ask_line(sock, b"PUT big " + value) == b"OK"
            assert ask_line(sock, b"GET big") == b"VALUE " + value
            assert ask_line(sock, b"PUT big " + value + b"x") == b"ERR value too large"
            assert ask_line(sock, b"PUT " + value + b"x 1") == b"ERR key too large"
            assert ask_line(sock, b"SIZE") == b"SIZE 1"


def test_unterminated_fragment_at_eof_is_not_executed(line_app):
    with connect(line_app.port) as sock:
        sock.sendall(b"PUT a 1\nPUT b 2")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"OK\n"
    with connect(line_app.port) as sock:
        assert ask_line(sock, b"SCAN") == b"SCAN 1 a 1"


# -- close framing --------------------------------------------------------------------------------

def test_close_every_command(close_app):
    port = close_app.port
    assert ask_close(port, b"GET a") == b"NOT_FOUND\n"
    assert ask_close(port, b"PUT a 1\n") == b"OK\n"
    assert ask_close(port, b"PUT b 2") == b"OK\n"
    assert ask_close(port, b"GET a\r\n") == b"VALUE 1\n"
    assert ask_close(port, b"SIZE") == b"SIZE 2\n"
    assert ask_close(port, b"SCAN") == b"SCAN 2\na 1\nb 2\n"
    assert ask_close(port, b"REMOVE a") == b"OK\n"
    assert ask_close(port, b"REMOVE a") == b"NOT_FOUND\n"
    assert ask_close(port, b"") == b"ERR empty request\n"
    assert ask_close(port, b"FROB") == b"ERR unknown command\n"
    snapshot = ask_close(port, b"SNAPSHOT").split()
    assert snapshot[0] == b"SNAPSHOT"
    assert ask_close(port, b"RESTORE " + snapshot[1]) == b"OK\n"
    assert ask_close(port, b"SCAN") == b"SCAN 1\nb 2\n"


def test_close_oversized_request():
    app = App("close", "--max-request", "1000")
    try:
        assert ask_close(app.port, b"PUT a " + b"v" * 3000) == b"ERR request too large\n"
        assert ask_close(app.port, b"SIZE") == b"SIZE 0\n"
    finally:
        assert app.stop() == 0


def test_snapshot_restores_into_a_second_instance(line_app, close_app):
    rng = random.Random(3)
    with line_app.client() as source:
        for n in range(200):
            source.put(f"key{rng.randrange(100)}", f"value{n}")
        for n in range(30):
            source.remove(f"key{rng.randrange(100)}")
        snapshot = source.snapshot()
        expected = source.scan()
    assert expected and list(expected) == sorted(expected)
    target = close_app.client()
    target.put("stale", "gone")
    target.restore(snapshot)
    assert target.scan() == expected
    assert target.size() == len(expected)
    assert target.snapshot() == snapshot  # the serialization is canonical
    with pytest.raises(KVReplyError, match="bad snapshot"):
        target.restore(base64.b64encode(b"\x00" + base64.b64decode(snapshot)).decode())
    assert target.scan() == expected  # a refused snapshot changes nothing


# -- process behaviour ----------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_even_with_open_connections(signum):
    app = App("line")
    idle = connect(app.port)
    busy = connect(app.port)
    try:
        busy.sendall(b"PUT a 1\nPUT b")  # a half-sent request
        assert read_lines(busy, 1) == [b"OK"]
        assert app.stop(signum) == 0
        assert app.stderr == b"", "a clean exit logs nothing"
    finally:
        idle.close()
        busy.close()


@pytest.mark.parametrize("args, message", [
    (["--framing", "length"], "invalid choice"),
    (["--port", "70000"], "port must be in 0..65535"),
    (["--port", "http"], "not a port number"),
    (["--max-request", "0"], "must be at least 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as caught:
        hashmap.main(args)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_2_as_a_process():
    done = subprocess.run([sys.executable, "-m", "smrd.apps.hashmap", "--framing", "length"],
                          env=_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr and "Traceback" not in done.stderr


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as caught:
        hashmap.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for word in ("PUT", "GET", "REMOVE", "SCAN", "SNAPSHOT", "--framing", "--max-request"):
        assert word in out


def test_port_in_use_is_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "smrd.apps.hashmap", "--port", str(port)],
                              env=_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_app_imports_nothing_from_smrd():
    tree = ast.parse(Path(hashmap.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the app"
            imported.add(node.module)
    assert imported and not any(name == "smrd" or name.startswith("smrd.") for name in imported)


# -- determinism and the snapshot format, in process ----------------------------------------------

def test_same_requests_same_replies_and_state():
    rng = random.Random(11)
    requests = []
    for _ in range(3000):
        command = rng.choice(["PUT", "GET", "REMOVE", "SIZE", "SCAN", "BAD"])
        key = f"k{rng.randrange(30)}".encode()
        requests.append({b"PUT": b"PUT " + key + b" v%d" % rng.randrange(1000), b"GET": b"GET " + key,
                         b"REMOVE": b"REMOVE " + key}.get(command.encode(), command.encode()))
    first, second = hashmap.HashMap(), hashmap.HashMap()
    assert [first.execute(r) for r in requests] == [second.execute(r) for r in requests]
    assert first.execute(b"SNAPSHOT") == second.execute(b"SNAPSHOT")


def test_snapshot_format_round_trip_and_rejections():
    entries = {b"b": b"2", b"a": b"1", b"c" * 10: b"3" * 100}
    blob = hashmap.serialize(entries)
    assert hashmap.deserialize(blob) == entries
    assert hashmap.serialize(dict(sorted(entries.items(), reverse=True))) == blob
    flipped = bytearray(blob)
    flipped[12] ^= 1
    for bad in (b"", blob[:-1], bytes(flipped), blob + b"x"):
        with pytest.raises(hashmap.BadSnapshot):
            hashmap.deserialize(bad)


# -- the kvclient API ------------------------------------------------------------------------------

@pytest.mark.parametrize("framing", ["line", "close"])
def test_kvclient_api(framing):
    with App(framing) as app, app.client(timeout=5) as client:
        assert client.get("a") is None
        assert client.put("a", "1") is None
        assert client.put("b", b"2") is None
        assert client.get(b"a") == "1"
        assert client.size() == 2
        assert client.scan() == {"a": "1", "b": "2"}
        assert client.remove("a") is True
        assert client.remove("a") is False
        assert client.request("SIZE") == b"SIZE 1"
        with pytest.raises(KVReplyError) as caught:
            client.restore("nope")
        assert caught.value.reply.startswith(b"ERR bad snapshot")
        with pytest.raises(ValueError):
            client.put("a b", "1")
        with pytest.raises(ValueError):
            client.get("")
        with pytest.raises(ValueError):
            client.request("GET a\nGET b")


@pytest.mark.parametrize("framing", ["line", "close"])
def test_async_kvclient_api(framing):
    app = App(framing)

    async def scenario():
        clients = [AsyncKVClient("127.0.0.1", app.port, framing, timeout=5) for _ in range(4)]
        await asyncio.gather(*(c.put(f"k{n}", f"v{n}") for n, c in enumerate(clients)))
        values = await asyncio.gather(*(c.get(f"k{n}") for n, c in enumerate(clients)))
        assert values == [f"v{n}" for n in range(4)]
        assert await clients[0].size() == 4
        assert await clients[1].remove("k0") is True
        assert await clients[2].scan() == {f"k{n}": f"v{n}" for n in range(1, 4)}
        snapshot = await clients[3].snapshot()
        await clients[3].restore(snapshot)
        for client in clients:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        assert app.stop() == 0


def test_kvclient_unavailable_and_no_reply():
    with pytest.raises(KVUnavailable, match="connection refused"):
        KVClient("127.0.0.1", closed_port(), "line", timeout=2).get("a")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (via the backlog), never answers
        port = silent.getsockname()[1]
        for framing in ("line", "close"):
            started = time.monotonic()
            with pytest.raises(KVNoReply, match="timed out"):
                KVClient("127.0.0.1", port, framing, timeout=0.3).put("a", "1")
            assert time.monotonic() - started < 3

        async def async_no_reply():
            with pytest.raises(KVNoReply):
                await AsyncKVClient("127.0.0.1", port, "line", timeout=0.3).get("a")

        asyncio.run(async_no_reply())


def test_line_client_reconnects_after_the_server_dropped_it():
    app = App("line", "--max-request", "64")
    try:
        with app.client(timeout=5) as client:
            client.put("a", "1")
            for _ in range(5):
                assert client.request("PUT a " + "x" * 100) == b"ERR request too large"
                # The server closes that connection; the next request must open a new one.
                assert client.get("a") == "1"
    finally:
        app.stop()


# -- the kvclient CLI ------------------------------------------------------------------------------

def test_cli_success_not_found_and_err(line_app, capsys):
    base = ["--port", str(line_app.port), "--framing", "line"]
    assert kvclient.main(base + ["PUT", "a", "1"]) == 0
    assert kvclient.main(base + ["GET", "a"]) == 0
    assert kvclient.main(base + ["GET", "zz"]) == 0
    assert kvclient.main(base + ["FROB"]) == 3
    out = capsys.readouterr()
    assert out.out.splitlines() == ["OK", "VALUE 1", "NOT_FOUND", "ERR unknown command"]
    assert out.err == ""


def test_cli_close_framing_scan(close_app, capsys):
    base = ["--port", str(close_app.port), "--framing", "close"]
    assert kvclient.main(base + ["PUT", "a", "1"]) == 0
    assert kvclient.main(base + ["SCAN"]) == 0
    assert capsys.readouterr().out.splitlines() == ["OK", "SCAN 1", "a 1"]


def test_cli_refused_port_is_one_clear_line(capsys):
    started = time.monotonic()
    code = kvclient.main(["--port", str(closed_port()), "--retries", "2", "PUT", "a", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "connection refused" in err and "after 3 attempts" in err
    assert time.monotonic() - started < 5


def test_cli_retries_reads_but_not_writes_after_sending(capsys):
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        port = silent.getsockname()[1]

        def attempts_made():
            silent.setblocking(False)
            count = 0
            while True:
                try:
                    conn, _ = silent.accept()
                except BlockingIOError:
                    return count
                conn.close()
                count += 1

        base = ["--port", str(port), "--timeout", "0.2", "--retries", "2"]
        assert kvclient.main(base + ["PUT", "a", "1"]) == 1
        assert attempts_made() == 1
        assert "not retried" in capsys.readouterr().err
        assert kvclient.main(base + ["GET", "a"]) == 1
        assert attempts_made() == 3
        assert kvclient.main(base + ["--retry-writes", "REMOVE", "a"]) == 1
        assert attempts_made() == 3
        assert "after 3 attempts" in capsys.readouterr().err


def test_cli_as_a_process_against_a_closed_port():
    done = subprocess.run(
        [sys.executable, "-m", "smrd.apps.kvclient", "--port", str(closed_port()), "--retries", "0",
         "GET", "a"], env=_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("kvclient: error: cannot connect to 127.0.0.1:")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["--timeout", "0", "GET", "a"], ["--port", "0", "GET", "a"],
                                  ["--retries", "-1", "GET", "a"], []])
def test_cli_bad_arguments_exit_2(args):
    with pytest.raises(SystemExit) as caught:
        kvclient.main(args)
    assert caught.value.code == 2
