"""smrd.transport: a connection that claims the identity of a connected peer cannot cut that
peer off, and a peer whose process restarted gets its identity back at once.

Real ZeroMQ sockets over loopback TCP; the router is the one smrd binds for peer and gateway
ports (Channels.bind_router), the peers are DEALERs as Channels.connect_dealer makes them."""
import subprocess
import sys
import time

import zmq

from smrd.transport import Channels

# The restarted peer: a DEALER made as Channels.connect_dealer makes it, sending until killed.
RESTARTED = ("import sys, time\n"
             "from smrd.transport import Channels\n"
             "dealer = Channels().connect_dealer(sys.argv[1], b'r1')\n"
             "while True:\n"
             "    dealer.send(b'again')\n"
             "    time.sleep(0.05)\n")


def _receive(router, want, timeout_s):
    """The first message whose payload is `want`, as (identity, payload); None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if router.poll(int(left * 1000) + 1):
            identity, payload = router.recv_multipart()
            if payload == want:
                return identity, payload
    return None


def _connected(channels, identity):
    """A bound router and a peer whose first message got through: (router, endpoint, peer)."""
    router = channels.bind_router("tcp://127.0.0.1:*")
    endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    peer = channels.connect_dealer(endpoint, identity)
    peer.send(b"hello")
    assert _receive(router, b"hello", 10) == (identity, b"hello")
    return router, endpoint, peer


def test_a_forged_duplicate_identity_is_refused_and_the_real_peer_keeps_its_link():
    channels = Channels()
    try:
        router, endpoint, real = _connected(channels, b"r0")

        forger = channels.connect_dealer(endpoint, b"r0")
        forger.send(b"forged")
        # The forger's message is never delivered; meanwhile the real peer still gets through.
        # (With ROUTER_HANDOVER the forger took the routing id over, and the real peer was cut
        # off, silently, until its heartbeat timed out ~4 s later.)
        for i in range(20):
            real.send(b"real %d" % i)
        forger.close(0)
        assert _receive(router, b"real 19", 2) == (b"r0", b"real 19")
        real.send(b"after")
        got = _receive(router, b"after", 2)
        assert got == (b"r0", b"after"), "the real peer lost its link to a forged identity"
    finally:
        channels.close()


def test_a_restarted_peer_gets_its_identity_back_at_once():
    # The restart is a new process, as in life: it connects with the same identity some hundred
    # milliseconds after the old connection closed, while the router is being read (a replica
    # drains its sockets all the time). Connecting in the very instant of the close, with the
    # router untouched in between, would race the router's own removal of the old connection:
    # the duplicate would be refused and its connection would idle until its heartbeat timed out.
    channels = Channels()
    try:
        router, endpoint, old = _connected(channels, b"r1")
        old.close(0)  # the process died: its connection closes
        restarted = subprocess.Popen([sys.executable, "-c", RESTARTED, endpoint])
        try:
            assert _receive(router, b"again", 10) == (b"r1", b"again"), \
                "the restarted peer's identity was not taken back"
        finally:
            restarted.kill()
            restarted.wait(10)
    finally:
        channels.close()
