# What outside clients see at a gateway, with real processes: idempotency keys across gateways,
# divergence detection, a clear error when the cluster cannot answer, and the http mode.
import signal
import socket
import sys
import threading
from pathlib import Path

from smrd.apps.kvclient import KVClient
from smrd.config.settings import SETTINGS

FAST = {"gateway_request_deadline_ms": 2000, "gateway_retransmit_ms": 200}


def test_idempotency_key_executes_once_across_gateways(make_cluster):
    cluster = make_cluster(replicas=3, gateways=2, framing="line").start()
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as a, \
            KVClient("127.0.0.1", cluster.gateway_port(1), "line") as b:
        assert a.request("PUT x 1") == b"OK"
        # REMOVE answers OK only the first time it runs: a retry that ran again would say NOT_FOUND.
        assert a.request("SMRD-IDEM retry-42 REMOVE x") == b"OK"
        assert b.request("SMRD-IDEM retry-42 REMOVE x") == b"OK"
        assert b.request("REMOVE x") == b"NOT_FOUND"
        assert a.request("SMRD-IDEM bad!key GET x").startswith(b"ERR smrd:")


def test_divergent_replies_are_detected_and_logged(make_cluster):
    # Replies are compared only where more than one replica answers a request: with
    # reply_quorum 1 a gateway that knows the leader sends new requests to it alone (and, since
    # it asks every 100 ms until it knows one, it does from the first request on).
    cluster = make_cluster(replicas=3, gateways=1, framing="line", settings={"reply_quorum": 2}).start()
    with KVClient("127.0.0.1", cluster.app_port(2), "line") as app2:
        assert app2.request("PUT secret only-on-2") == b"OK"   # behind smrd's back
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        c.request("GET secret")
    cluster.gateways[0].wait_for("divergence", 10)


def test_divergence_is_detected_with_the_default_settings_too(make_cluster):
    # reply_quorum 1: new requests go to the leader alone, except one batch in
    # divergence_check_every, which goes to every replica so that their replies are compared.
    cluster = make_cluster(replicas=3, gateways=1, framing="line").start()
    cluster.gateways[0].wait_for("event=gateway_leader leader=", 10)  # from now on: directed
    with KVClient("127.0.0.1", cluster.app_port(2), "line") as app2:
        assert app2.request("PUT secret only-on-2") == b"OK"   # behind smrd's back
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        for _ in range(2 * SETTINGS["divergence_check_every"].default):
            c.request("GET secret")  # one at a time: a batch each
    cluster.gateways[0].wait_for("divergence", 10)


def test_a_cluster_without_quorum_gets_a_clear_error_not_a_hang(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", settings=FAST).start()
    for i in (1, 2):
        cluster.servers[i].signal(signal.SIGSTOP)
    try:
        with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
            reply = c.request("PUT a 1")
        assert reply.startswith(b"ERR smrd: no reply from the replicas within 2 s")
    finally:
        for i in (1, 2):
            cluster.servers[i].signal(signal.SIGCONT)
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
        assert c.request("GET a") in (b"VALUE 1", b"NOT_FOUND")  # the timed-out PUT may have run


def _http(port, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(body) < length:
            body += s.recv(4096)
        return head.split(b"\r\n")[0] + b" " + body


def test_http_mode_round_trip_idempotency_and_503(make_cluster):
    app = str(Path(__file__).with_name("http_counter_app.py"))
    cluster = make_cluster(replicas=3, gateways=1, framing="http", settings=FAST,
                           app_command=lambda i, port: [sys.executable, app, str(port)]).start()
    port = cluster.gateway_port(0)
    post = b"POST /incr HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n%s\r\n"
    assert _http(port, post % b"") == b"HTTP/1.1 200 OK 1"
    assert _http(port, post % b"Idempotency-Key: abc\r\n") == b"HTTP/1.1 200 OK 2"
    assert _http(port, post % b"Idempotency-Key: abc\r\n") == b"HTTP/1.1 200 OK 2"
    assert _http(port, b"GET /value HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 200 OK 2"
    for i in (0, 1):
        cluster.servers[i].signal(signal.SIGSTOP)
    try:
        assert _http(port, post % b"").startswith(b"HTTP/1.1 503")
    finally:
        for i in (0, 1):
            cluster.servers[i].signal(signal.SIGCONT)


def _read_lines(sock, count):
    f = sock.makefile("rb")
    return [f.readline() for _ in range(count)], f


def test_one_connection_pipelined_half_closed_and_not_reading_gets_every_reply_in_order(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line").start()
    port = cluster.gateway_port(0)
    # Pipelined: 300 requests in one write; replies come back in request order.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"".join(b"PUT p%d v%d\nGET p%d\n" % (i, i, i) for i in range(150)))
        replies, _ = _read_lines(s, 300)
    assert replies == [r for i in range(150) for r in (b"OK\n", b"VALUE v%d\n" % i)]
    # Half-closed after its requests: still answered, then the gateway closes.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"".join(b"GET p%d\n" % i for i in range(40)))
        s.shutdown(socket.SHUT_WR)
        replies, f = _read_lines(s, 40)
        assert f.read() == b""
    assert replies == [b"VALUE v%d\n" % i for i in range(40)]
    # Good requests, then an oversized one: the good ones are answered, then the error, then EOF.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET p1\nGET p2\nPUT big " + b"x" * (2 << 20) + b"\n")
        replies, f = _read_lines(s, 3)
        assert f.read() == b""
    assert replies[:2] == [b"VALUE v1\n", b"VALUE v2\n"]
    assert replies[2].startswith(b"ERR smrd: request too large")
    # Clients that write far faster than they read. 20,000 small requests at once: the gateway
    # stops reading while 1,024 of them are unanswered and resumes as they are answered. 3,000
    # requests for 12 MB of replies: its replies back up too. Every reply comes back, in order.
    for value, count in ((b"z", 20000), (b"y" * 4000, 3000)):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # a stall fails
            writer = threading.Thread(target=s.sendall,
                                      args=(b"PUT fat " + value + b"\n" + b"GET fat\n" * count,))
            writer.start()
            replies, _ = _read_lines(s, count + 1)
            writer.join()
        assert replies[0] == b"OK\n" and set(replies[1:]) == {b"VALUE " + value + b"\n"}
