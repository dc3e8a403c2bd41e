# Apps smrd did not write, run unchanged beside real replicas:
# - sqlite3 behind socat, in close framing (one connection, one sqlite3 process per request),
#   under load with a leader kill: the history is linearizable and the three database files end
#   holding the same rows;
# - HTTP servers whose Date header comes from their own clock: no divergence is reported for it
#   (volatile_reply_headers), while a body that differs still is.
# Redis has its own file (test_redis.py). The Debian tools come from scripts/install-system-tools.sh.
import random
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from smrd.ops.local import user_app

from .closed_loop import ClosedLoop
from .test_faults import wait_caught_up, wait_converged

HTTP_APP = str(Path(__file__).with_name("http_counter_app.py"))


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `bash scripts/install-system-tools.sh` "
                    f"as root (make install-test does)")


# ---------------------------------------------------------------------- sqlite3 behind socat

SQL_KEYS = [f"k{i}" for i in range(5)]
SQLITE_CMD = ("socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork "
              "EXEC:'sqlite3 -batch {dir}/kv.sqlite'")


def close_request(port, request: bytes, timeout=15) -> bytes:
    """One request in close framing: connect, write, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class SQLLoad(ClosedLoop):
    """Closed-loop clients of a key-value table in SQLite, through the gateway."""

    def __init__(self, port, clients=3):
        self.port = port
        super().__init__(clients)

    def _client(self, c):
        rnd = random.Random(c)
        n = 0
        while not self.stop.is_set():
            key, n, r = rnd.choice(SQL_KEYS), n + 1, rnd.random()
            if r < 0.5:
                value = f"c{c}-{n}"
                op = self.history.invoke(c, "put", key, value)
                sql = f"INSERT OR REPLACE INTO kv VALUES('{key}', '{value}');\n"
            elif r < 0.85:
                op = self.history.invoke(c, "get", key)
                sql = f"SELECT v FROM kv WHERE k = '{key}';\n"
            else:
                op = self.history.invoke(c, "remove", key)
                sql = f"DELETE FROM kv WHERE k = '{key}'; SELECT changes();\n"
            try:
                reply = close_request(self.port, sql.encode())
            except OSError as e:
                self._failed(e)
                continue
            if reply.startswith(b"ERR") or b"Error" in reply:
                self._failed(reply.decode("utf-8", "replace"))
                continue
            text = reply.decode().strip()
            self._completed(op, None if r < 0.5 else (text or None) if r < 0.85 else text == "1")


def test_sqlite_behind_socat_survives_a_leader_kill_linearizable_and_equal(make_cluster, tmp_path):
    need("sqlite3", "socat")
    data_dir = tmp_path / "sqlite"
    # What `smrd local --framing close --app-cmd ... --app-data-paths '{dir}/kv.sqlite'` runs.
    app_command, replica_args = user_app(SQLITE_CMD, "{dir}/kv.sqlite", data_dir, 3)
    # Supervised: with app_data_paths, smrd ends an app it cannot account for (at its own start,
    # too) and counts on the app's supervisor to start it again.
    cluster = make_cluster(replicas=3, gateways=1, framing="close", data_dir=data_dir,
                           app_command=app_command, replica_args=replica_args, app_ready="port",
                           supervise=True).start()
    gateway = cluster.gateway_port(0)
    assert close_request(gateway, b"CREATE TABLE IF NOT EXISTS kv(k TEXT PRIMARY KEY, v TEXT);\n") == b""
    load = SQLLoad(gateway).start()
    try:
        load.wait_progress(30)
        leader = cluster.leader()
        cluster.kill_replica(leader)            # the leader's pod dies: smrd, socat, sqlite3
        load.wait_progress(30)                  # the survivors elect a leader and go on
        # The supervisor (a kubelet's part) starts both again: smrd empties the app's file,
        # has the fresh app restarted and replays its log into it.
        wait_caught_up(cluster, leader)
        load.wait_progress(30)
    finally:
        load.finish()
    for key in SQL_KEYS:                        # acknowledged writes must be read back
        op = load.history.invoke("final", "get", key)
        text = close_request(gateway, f"SELECT v FROM kv WHERE k = '{key}';\n".encode()).decode().strip()
        load.history.complete(op, text or None)
    result = load.history.check()
    assert result.ok, str(result)
    assert load.done >= 90

    wait_converged(cluster)
    dumps = [subprocess.run(["sqlite3", str(data_dir / f"app-{i}-files" / "kv.sqlite"), ".dump"],
                            capture_output=True, check=True, timeout=30).stdout for i in range(3)]
    assert dumps[0] == dumps[1] == dumps[2], "the three database files differ"
    assert dumps[0].count(b"INSERT INTO kv") >= 1


# ---------------------------------------------------------------------- HTTP, volatile headers

def http_request(port, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
        while len(body) < length:
            body += s.recv(4096)
        return head + b"\r\n\r\n" + body


def divergences(cluster) -> float:
    url = f"http://127.0.0.1:{cluster.gateway_metrics_port(0)}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return float(re.search(r"(?m)^smrd_divergences_total(?:\{[^}]*\})? (\S+)$", text).group(1))


@pytest.mark.parametrize("app_flag, volatile, diverges", [
    ("--date-varies", "Date", False),   # the default: a server's clock is not divergence
    ("--date-varies", "", True),        # every byte counts: the same app is reported
    ("--body-varies", "Date", True),    # a body that differs is always reported
])
def test_http_replies_are_compared_without_their_volatile_headers(make_cluster, app_flag, volatile,
                                                                  diverges):
    # Where nothing may be reported, reply_quorum 3: a reply reaches the client only once all
    # three agreed (so the count read afterwards covers every comparison). Where a divergence is
    # expected, the replies never agree, so the default quorum with every batch sent to every
    # replica (divergence_check_every 1): the first reply answers, the later ones are compared.
    settings = {"volatile_reply_headers": volatile}
    settings.update({"divergence_check_every": 1} if diverges else {"reply_quorum": 3})
    cluster = make_cluster(
        replicas=3, gateways=1, framing="http", settings=settings,
        app_command=lambda i, port: [sys.executable, HTTP_APP, str(port), app_flag]).start()
    port = cluster.gateway_port(0)
    for n in range(1, 6):
        reply = http_request(port, b"POST /incr HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n%d" % n)
        # The client gets one replica's reply unchanged: its Date is there, a server's clock.
        if app_flag == "--date-varies":
            assert re.search(rb"(?m)^Date: \d+\r$", reply), reply
        reply = http_request(port, b"GET /value HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
    if diverges:
        cluster.gateways[0].wait_for("event=divergence", 10)
        assert divergences(cluster) >= 1
    else:
        assert divergences(cluster) == 0
