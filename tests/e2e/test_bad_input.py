# Bad input against real processes: garbage on a replica's ports, truncated and forged frames,
# a message from a peer that is not in hosts.conf, garbage and an oversized request on the
# gateway port. Each is dropped or answered with a clear error and logged; the processes keep
# serving, and nothing acknowledged is lost.
import os
import socket

import pytest
import zmq

from smrd.apps.kvclient import KVClient, parse_get
from smrd.protocol import messages as m


@pytest.fixture
def cluster(make_cluster):
    return make_cluster(replicas=3, gateways=1, framing="line").start()


def _dealer(endpoint, identity):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def _still_serving(cluster, key, value):
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
        assert c.request(f"PUT {key} {value}") == b"OK"
        assert parse_get(c.request(f"GET {key}")) == value
        assert parse_get(c.request("GET before")) == "1", "an acknowledged write was lost"


def test_garbage_and_forged_frames_on_replica_ports_are_dropped(cluster):
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
        assert c.request("PUT before 1") == b"OK"
    leader = cluster.leader()
    good = m.encode(1, m.Commit(0, 10 ** 6))
    garbage = [os.urandom(100), good[:20], good[:-1], good + b"x", b"", bytes(64)]
    for i in range(3):
        # Raw TCP garbage (not even ZeroMQ) on both ports.
        for port in (cluster.peer_port(i), cluster.client_port(i)):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(os.urandom(4096))
        # Well-formed ZeroMQ, malformed smrd frames.
        peer = _dealer(f"tcp://127.0.0.1:{cluster.peer_port(i)}", b"r%d" % ((i + 1) % 3))
        gw = _dealer(f"tcp://127.0.0.1:{cluster.client_port(i)}", b"gx")
        for frame in garbage:
            peer.send(frame)
            gw.send(frame)
        # A peer that is not in hosts.conf, and a valid frame whose sender lies.
        stranger = _dealer(f"tcp://127.0.0.1:{cluster.peer_port(i)}", b"r9")
        stranger.send(m.encode(9, m.StartViewChange(99)))
        # (It connects as replica (i+1) % 3 and claims to be (i+2) % 3. Claiming the identity it
        # connected with would not be a lie: without CURVE keys, a process that can reach a peer
        # port can pass for a replica; see docs/security.md.)
        peer.send(m.encode((i + 2) % 3, m.StartViewChange(99)))
        # A gateway must not be able to speak for a replica.
        gw.send(m.encode(0, m.StartViewChange(99)))
        for s in (peer, gw, stranger):
            s.close(0)
    for i in range(3):
        cluster.servers[i].wait_for("dropped:", 10)
    _still_serving(cluster, "after", "2")
    assert cluster.leader() == leader, "forged view-change messages moved the view"
    st = [cluster.status(i) for i in range(3)]
    assert all(s["bad_messages"] > 0 for s in st)
    assert all(s["view"] == st[0]["view"] for s in st)


def test_gateway_answers_bad_requests_with_errors_and_keeps_serving(cluster):
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
        assert c.request("PUT before 1") == b"OK"
    # An oversized request gets a clear error (the default limit is 1 MiB).
    with socket.create_connection(("127.0.0.1", cluster.gateway_port(0))) as s:
        s.sendall(b"PUT big " + b"x" * (2 << 20) + b"\n")
        reply = s.makefile("rb").readline()
    assert reply.startswith(b"ERR smrd:") and b"large" in reply
    # Random binary garbage reaches the app as a request and gets the app's own error.
    with socket.create_connection(("127.0.0.1", cluster.gateway_port(0))) as s:
        s.sendall(bytes(range(1, 10)) + b"\n")
        assert s.makefile("rb").readline().startswith(b"ERR")
    # A client that connects and drops mid-request.
    with socket.create_connection(("127.0.0.1", cluster.gateway_port(0))) as s:
        s.sendall(b"PUT half")
    _still_serving(cluster, "after", "3")
