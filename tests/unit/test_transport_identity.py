"""smrd.transport: a connection that claims the identity of a connected peer cannot cut that
peer off, and a peer whose process restarted gets its identity back at once.

Real ZeroMQ sockets over loopback TCP; the router is the one smrd binds for peer and gateway
ports (Channels.bind_router), the peers are DEALERs as Channels.connect_dealer makes them."""
import time

import zmq

from smrd.transport import Channels


def _receive(router, want, timeout_s):
    """The first message whose payload is `want`, as (identity, payload); None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if router.poll(int(left * 1000) + 1):
            identity, payload = router.recv_multipart()
            if payload == want:
                return identity, payload
    return None


def test_a_forged_duplicate_identity_is_refused_and_the_real_peer_keeps_its_link():
    channels = Channels()
    try:
        router = channels.bind_router("tcp://127.0.0.1:*")
        endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        real = channels.connect_dealer(endpoint, b"r0")
        real.send(b"hello")
        assert _receive(router, b"hello", 10) == (b"r0", b"hello")

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
    channels = Channels()
    try:
        router = channels.bind_router("tcp://127.0.0.1:*")
        endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        gone = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        old = channels.connect_dealer(endpoint, b"r1")
        old.send(b"before")
        assert _receive(router, b"before", 10) == (b"r1", b"before")
        old.close(0)  # the process died: its connection closes ...
        # ... and the router notices within milliseconds, well before a restarted process (a
        # third of a second to start, at the least) connects again. Connecting in the same
        # instant would race that: the duplicate is refused, its connection stays up unused,
        # and it recovers only when its heartbeat times out (about 4 s).
        assert gone.poll(10_000), "the router never saw the old connection go"
        new = channels.connect_dealer(endpoint, b"r1")
        new.send(b"again")
        assert _receive(router, b"again", 2) == (b"r1", b"again")
    finally:
        channels.close()
