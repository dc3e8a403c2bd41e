# A real, unmodified Redis replicated by smrd in resp framing: three redis-server processes as
# the apps, real replicas and a gateway, and redis-cli (or a raw socket, where the test needs the
# exact bytes on the wire) as the client. Needs redis-server and redis-cli: run
# scripts/install-system-tools.sh (as root) where they are missing.
import random
import shutil
import socket
import subprocess
import time

import pytest

from smrd.framing import make_decoder
from smrd.framing.resp import encode_command
from smrd.ops.local import LocalCluster

from .conftest import free_base_port
from .closed_loop import ClosedLoop
from .test_faults import wait_caught_up, wait_converged

TIMEOUT = 10.0


def redis_argv(data_dir):
    # The app contract: start empty (no RDB/AOF), and nothing time-driven that changes what a
    # reply contains (active rehashing reorders hash tables on a timer; see docs/app-contract.md).
    def argv(i, port):
        return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--activerehashing", "no", "--dir", str(data_dir),
                "--enable-debug-command", "local"]  # DEBUG DIGEST, asked directly by the test
    return argv


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [t for t in ("redis-server", "redis-cli") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: run scripts/install-system-tools.sh "
                    "as root (Debian packages redis-server, redis-tools)")
    data = tmp_path_factory.mktemp("redis")
    c = LocalCluster(replicas=3, gateways=1, framing="resp", base_port=free_base_port(3, 2),
                     data_dir=data / "cluster", app_command=redis_argv(data), app_ready="port")
    try:
        yield c.start()
    finally:
        c.stop()


def cli(port, *args, stdin=None):
    """redis-cli's output for one command (its --no-raw form shows types and nesting)."""
    done = subprocess.run(["redis-cli", "-p", str(port), "--no-raw", *args], input=stdin,
                          capture_output=True, timeout=TIMEOUT)
    return done.stdout.decode()


def cmd(*args):
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


class Raw:
    """A raw client socket: send bytes exactly, read n whole RESP replies."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.decoder = make_decoder("resp", 1 << 20, "response")
        self.replies = []

    def send(self, data):
        self.sock.sendall(data)

    def read(self, n):
        while len(self.replies) < n:
            data = self.sock.recv(65536)
            assert data, f"connection closed after {len(self.replies)} of {n} replies"
            self.replies += self.decoder.feed(data)
        out, self.replies = self.replies[:n], self.replies[n:]
        return out

    def closed(self):
        """True once the peer closed (EOF) with nothing more sent."""
        return self.sock.recv(65536) == b""

    def close(self):
        self.sock.close()


def app_digests(cluster):
    """DEBUG DIGEST of each replica's Redis, asked directly (behind smrd: read-only)."""
    return [cli(cluster.app_port(i), "DEBUG", "DIGEST") for i in range(cluster.n)]


def assert_apps_equal(cluster):
    # The gateway answers once enough replicas did; the others execute the same requests a
    # moment later. There is no event to wait on from outside, so poll to a deadline.
    deadline = time.monotonic() + TIMEOUT
    while len(set(digests := app_digests(cluster))) != 1:
        assert time.monotonic() < deadline, f"the replicas' Redis differ: {digests}"
        time.sleep(0.05)
    return digests[0]


def test_commands_through_redis_cli(cluster):
    g = cluster.gateway_port(0)
    assert cli(g, "SET", "greeting", "hello") == "OK\n"
    assert cli(g, "GET", "greeting") == '"hello"\n'
    assert cli(g, "GET", "missing") == "(nil)\n"
    assert cli(g, "INCR", "n") == "(integer) 1\n"
    assert cli(g, "INCR", "n") == "(integer) 2\n"
    assert cli(g, "RPUSH", "list", "a", "b", "c") == "(integer) 3\n"
    assert cli(g, "LRANGE", "list", "0", "-1") == '1) "a"\n2) "b"\n3) "c"\n'
    assert cli(g, "HSET", "h", "f1", "v1", "f2", "v2") == "(integer) 2\n"
    assert cli(g, "HGETALL", "h") == '1) "f1"\n2) "v1"\n3) "f2"\n4) "v2"\n'
    assert cli(g, "INCR", "greeting").startswith("(error) ERR value is not an integer")
    # Nested replies: a stream entry is [id, [field, value, ...]].
    assert cli(g, "XADD", "s", "1-1", "f", "v") == '"1-1"\n'
    assert cli(g, "XRANGE", "s", "-", "+") == '1) 1) "1-1"\n   2) 1) "f"\n      2) "v"\n'
    # Inline commands (as telnet sends them) are replicated as RESP arrays.
    raw = Raw(g)
    raw.send(b'SET inline "a b"\r\nGET inline\r\n')
    assert raw.read(2) == [b"+OK\r\n", b"$3\r\na b\r\n"]
    raw.close()
    assert_apps_equal(cluster)


def test_pipelined_requests(cluster):
    g = cluster.gateway_port(0)
    raw = Raw(g)
    raw.send(b"".join(cmd("INCR", "pipe") for _ in range(300)) + cmd("GET", "pipe"))
    assert raw.read(301) == [b":%d\r\n" % i for i in range(1, 301)] + [b"$3\r\n300\r\n"]
    raw.close()
    # redis-cli --pipe: mass insertion, then its own ECHO to find the end of the replies.
    wire = b"".join(cmd("SET", f"bulk:{i}", f"value {i}") for i in range(1000))
    out = subprocess.run(["redis-cli", "-p", str(g), "--pipe"], input=wire, capture_output=True,
                         timeout=TIMEOUT, check=True).stdout.decode()
    assert "errors: 0, replies: 1000" in out, out
    assert cli(g, "GET", "bulk:999") == '"value 999"\n'
    assert_apps_equal(cluster)


def test_multi_exec_in_one_write_is_one_request(cluster):
    g = cluster.gateway_port(0)
    raw = Raw(g)
    block = cmd("MULTI") + cmd("SET", "tx", "1") + cmd("INCR", "tx") + cmd("LRANGE", "list", "0", "0") + cmd("EXEC")
    raw.send(block + cmd("GET", "tx"))
    assert raw.read(6) == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n",
                           b"*3\r\n+OK\r\n:2\r\n*1\r\n$1\r\na\r\n", b"$1\r\n2\r\n"]
    # Many blocks pipelined, interleaved with plain commands, from two clients at once.
    other = Raw(g)
    raw.send((cmd("MULTI") + cmd("INCR", "txn") + cmd("INCR", "txn") + cmd("EXEC")) * 50)
    other.send(cmd("INCR", "txn") * 100)
    mine = raw.read(200)
    assert [r for r in mine if r.startswith(b"*")] and all(
        r in (b"+OK\r\n", b"+QUEUED\r\n") or r.startswith(b"*2\r\n:") for r in mine)
    # Each block's two INCRs are adjacent: no other client's INCR ran between them.
    for r in mine:
        if r.startswith(b"*2\r\n"):
            first, second = (int(line[1:]) for line in r.split(b"\r\n")[1:3])
            assert second == first + 1, r
    assert len(other.read(100)) == 100
    assert cli(g, "GET", "txn") == '"200"\n'
    raw.close()
    other.close()
    assert_apps_equal(cluster)


MULTI_ALONE = ("ERR smrd: MULTI must be sent together with its commands and EXEC in one write "
               "(per-connection state, see docs/app-contract.md)")


def test_per_connection_state_is_refused_and_never_interleaves(cluster):
    g = cluster.gateway_port(0)
    # redis-cli sends one command and waits for its reply: a MULTI alone is refused.
    assert cli(g, "MULTI") == f"(error) {MULTI_ALONE}\n"
    a, b = Raw(g), Raw(g)
    a.send(cmd("MULTI"))
    assert a.read(1) == [f"-{MULTI_ALONE}\r\n".encode()]
    # Another client's command meanwhile runs normally, outside anybody's transaction...
    b.send(cmd("SET", "shared", "from-b"))
    assert b.read(1) == [b"+OK\r\n"]
    # ...and what the first client sends before its EXEC runs nowhere.
    a.send(cmd("SET", "shared", "from-a") + cmd("SET", "a-only", "1") + cmd("EXEC"))
    r1, r2, r3 = a.read(3)
    assert r1.startswith(b"-ERR smrd: inside a refused block: MULTI must") and r2 == r1
    assert r3 == b"-EXECABORT smrd: Transaction discarded because smrd refused it\r\n"
    a.send(cmd("GET", "shared") + cmd("EXISTS", "a-only"))
    assert a.read(2) == [b"$6\r\nfrom-b\r\n", b":0\r\n"]
    for refused, rule in [(("SELECT", "1"), "connection"), (("BLPOP", "l", "0"), "blocking"),
                          (("SPOP", "set"), "random"), (("SET", "k", "v", "EX", "10"), "clock"),
                          (("EVAL", "return 1", "0"), "script"), (("CLIENT", "SETNAME", "x"), "connection"),
                          (("SUBSCRIBE", "ch"), "connection"), (("DEBUG", "SLEEP", "0"), "server")]:
        b.send(cmd(*refused))
        (reply,) = b.read(1)
        assert reply.startswith(b"-ERR smrd: ") and f"(rule '{rule}'".encode() in reply, reply
    # The connection still works, and QUIT is answered by the gateway, which then closes.
    b.send(cmd("PING") + cmd("QUIT"))
    assert b.read(2) == [b"+PONG\r\n", b"+OK\r\n"]
    assert b.closed()
    a.close()
    b.close()
    # Every replica's Redis has the same data, and none has what was refused.
    assert_apps_equal(cluster)
    for i in range(cluster.n):
        assert cli(cluster.app_port(i), "EXISTS", "a-only") == "(integer) 0\n"
        assert cli(cluster.app_port(i), "GET", "shared") == '"from-b"\n'


class AppProbe:
    """One connection to each replica's Redis, kept open: reading through it opens no new
    connection, so the apps' connection counts show whether smrd's own connection was dropped."""

    def __init__(self, cluster):
        self.conns = [Raw(cluster.app_port(i)) for i in range(cluster.n)]

    def ask(self, *args):
        out = []
        for conn in self.conns:
            conn.send(cmd(*args))
            out += conn.read(1)
        return out

    def sync(self, gateway_port, value):
        """Write `value` through the gateway and wait until every app has it: every replica
        then has executed all requests before it (and holds its connection to the app)."""
        assert cli(gateway_port, "SET", "sync-marker", value) == "OK\n"
        want = [b"$%d\r\n%s\r\n" % (len(value), value.encode())] * len(self.conns)
        deadline = time.monotonic() + TIMEOUT
        while self.ask("GET", "sync-marker") != want:
            assert time.monotonic() < deadline, f"{value!r} did not reach every app"
            time.sleep(0.05)

    def connections_received(self):
        return [int(info.split(b"total_connections_received:")[1].split(b"\r\n")[0])
                for info in self.ask("INFO", "stats")]

    def close(self):
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("bad", [
    b"*1\r\n+PING\r\n",                    # not a bulk string in a command
    b"*2\r\n$3\r\nGET\r\n$99999999999\r\n",  # a huge declared length
    b"*1\r\n" * 40 + b"$4\r\nPING\r\n",      # nested arrays
    b'SET a "unbalanced\r\n',              # inline with unbalanced quotes
    b"*1\r\n$4\r\nPINGxx\r\n",             # bulk not followed by CRLF
    b"*2\r\n$3\r\nGET\r\n\x00\xff\r\n",      # binary garbage where a length belongs
])
def test_malformed_requests_get_an_error_and_nothing_reaches_the_apps(cluster, bad):
    g = cluster.gateway_port(0)
    probe = AppProbe(cluster)
    probe.sync(g, f"before {bad!r}")
    before = probe.connections_received()
    raw = Raw(g)
    raw.send(cmd("SET", "before-bad", repr(bad)) + bad)
    ok, err = raw.read(2)
    assert ok == b"+OK\r\n"
    assert err.startswith(b"-ERR smrd: ") and (b"malformed request" in err or b"too large" in err), err
    assert raw.closed()
    raw.close()
    # A request after it, through a new connection, reaches every app. Had any byte of the bad
    # request reached one, Redis would have closed smrd's connection with a protocol error and
    # smrd would have connected again (and reset that app): its connection count would show it.
    probe.sync(g, f"after {bad!r}")
    assert probe.connections_received() == before
    probe.close()
    assert_apps_equal(cluster)


def _fuzz_input(rng):
    """Random, truncated, huge-length and deeply nested RESP, or a valid command."""
    names = [b"GET", b"SET", b"INCR", b"RPUSH", b"MULTI", b"EXEC", b"PING", b"HSET", b"BLPOP"]
    args = [rng.choice(names)] + [bytes(rng.randrange(256) for _ in range(rng.randrange(5)))
                                  for _ in range(rng.randrange(3))]
    wire = bytearray(cmd(*args) * rng.randrange(1, 3))
    kind = rng.randrange(6)
    if kind == 0:
        wire = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    elif kind == 1:
        del wire[rng.randrange(len(wire)):]                              # truncated
    elif kind == 2:
        wire += rng.choice([b"$99999999999999\r\n", b"*2147483647\r\n", b"$1048577\r\n",
                            b"*1\r\n$" + b"9" * 30 + b"\r\n"])           # huge lengths
    elif kind == 3:
        wire += b"*1\r\n" * rng.randrange(2, 3000)                        # deep nesting
    elif kind == 4:
        i = rng.randrange(len(wire))
        wire[i] = rng.choice(b"*$+-:\r\n\x00\xff%")                       # one byte wrong
    return bytes(wire)


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_fuzzed_input_at_the_gateway(cluster):
    rng = random.Random(0xBAD5EED)
    g = cluster.gateway_port(0)
    probe = AppProbe(cluster)
    probe.sync(g, "before fuzz")
    before = probe.connections_received()
    rss = _rss_kib(cluster.gateways[0].proc.pid)
    errors = 0
    for n in range(300):
        wire = _fuzz_input(rng)
        with socket.create_connection(("127.0.0.1", g), timeout=TIMEOUT) as s:
            s.sendall(wire)
            s.shutdown(socket.SHUT_WR)   # EOF: a truncated request is cut short here
            got = bytearray()
            while data := s.recv(65536):
                got += data
        # Whatever came back is well-formed RESP (replies, and at most one smrd error at the end).
        replies = make_decoder("resp", 1 << 20, "response")
        out = replies.feed(got) + replies.eof()
        assert b"".join(out) == bytes(got), (wire, got)
        errors += any(r.startswith(b"-ERR smrd: malformed") or b"too large" in r for r in out)
    assert errors > 50   # the mix really was mostly bad input
    # No app lost its connection to smrd (nothing malformed reached one), the gateway's memory
    # did not grow with what it was sent, and it still serves.
    probe.sync(g, "after fuzz")
    assert probe.connections_received() == before
    assert _rss_kib(cluster.gateways[0].proc.pid) - rss < 64 * 1024
    probe.close()
    assert_apps_equal(cluster)


def test_after_redis_benchmark_the_three_servers_are_equal(cluster):
    g = cluster.gateway_port(0)
    done = subprocess.run(["redis-benchmark", "-p", str(g), "-c", "16", "-n", "1500", "-r", "500",
                           "-t", "set,get,incr,lpush,rpush,lpop,sadd,hset,mset", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "requests per second" in done.stdout, done.stdout + done.stderr
    digest = assert_apps_equal(cluster)
    assert len(digest.strip().strip('"')) == 40 and set(digest.strip().strip('"')) != {"0"}


# ---------------------------------------------------------------------- faults

KEYS = [f"lin{i}" for i in range(5)]


class RedisLoad(ClosedLoop):
    """Closed-loop clients (SET/GET/DEL on a few keys) through the gateway; an error reply or a
    lost connection leaves the op open."""

    def __init__(self, port, clients=3):
        self.port = port
        super().__init__(clients)

    def _client(self, c):
        rnd, n, raw = random.Random(c), 0, None
        while not self.stop.is_set():
            key, n, r = rnd.choice(KEYS), n + 1, rnd.random()
            if r < 0.5:
                op, wire = self.history.invoke(c, "put", key, f"c{c}-{n}"), cmd("SET", key, f"c{c}-{n}")
            elif r < 0.85:
                op, wire = self.history.invoke(c, "get", key), cmd("GET", key)
            else:
                op, wire = self.history.invoke(c, "remove", key), cmd("DEL", key)
            try:
                raw = raw or Raw(self.port)
                raw.send(wire)
                (reply,) = raw.read(1)
            except (OSError, AssertionError) as e:
                self._failed(e)
                if raw is not None:
                    raw.close()
                raw = None
                continue
            if reply.startswith(b"-"):
                self._failed(reply.decode())  # an smrd error: outcome unknown, op stays open
                continue
            self._completed(op, None if r < 0.5 else bulk_value(reply) if r < 0.85 else reply == b":1\r\n")
        if raw is not None:
            raw.close()


def bulk_value(reply):
    """A GET's reply: the string, or None for a missing key."""
    return None if reply == b"$-1\r\n" else reply.split(b"\r\n")[1].decode()


def test_leader_kill_and_a_pod_restart_stay_linearizable(tmp_path):
    c = LocalCluster(replicas=3, gateways=1, framing="resp", base_port=free_base_port(3, 2),
                     data_dir=tmp_path / "cluster", app_command=redis_argv(tmp_path),
                     app_ready="port", settings={"gateway_request_deadline_ms": 3000})
    try:
        c.start()
        load = RedisLoad(c.gateway_port(0)).start()
        try:
            load.wait_progress(100)
            leader = c.leader()
            c.kill_replica(leader)             # the leader's pod dies: smrd and its Redis
            load.wait_progress(100)            # the others elect a leader and go on
            c.start_replica(leader)            # the pod comes back: an empty Redis, the log replayed
            wait_caught_up(c, leader)
            follower = next(i for i in range(3) if i != c.leader())
            c.kill_replica(follower)           # a follower's pod restarted, as Kubernetes does
            c.start_replica(follower)
            wait_caught_up(c, follower)
            load.wait_progress(100)
        finally:
            load.finish()
        final = Raw(c.gateway_port(0))
        for key in KEYS:                       # acknowledged writes must be read back
            op = load.history.invoke("final", "get", key)
            final.send(cmd("GET", key))
            (reply,) = final.read(1)
            load.history.complete(op, bulk_value(reply))
        final.close()
        result = load.history.check()
        assert result.ok, str(result)
        wait_converged(c)
        assert_apps_equal(c)
    finally:
        c.stop()
