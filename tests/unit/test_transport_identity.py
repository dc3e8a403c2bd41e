"""smrd.net.transport: routing ids. Every incarnation of a replica connects under an id of its own,
so a replica that restarted is heard at once, even while its peers still hold the connection of
its dead predecessor (which they do after a death they could not see: killed inside a partition,
a host that lost power). A connection that claims an id in use is refused, and cannot cut the
real peer off.

Real ZeroMQ sockets over loopback TCP; the router is the one smrd binds for peer and gateway
ports (Channels.bind_router), the peers are DEALERs as Channels.connect_dealer makes them."""
import time

import zmq

from smrd.net.transport import Channels, parse_replica_identity, replica_identity


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


def test_each_incarnation_has_its_own_routing_id_that_names_the_replica():
    ids = {replica_identity(3) for _ in range(50)}
    assert len(ids) == 50
    assert {parse_replica_identity(i) for i in ids} == {3}
    assert parse_replica_identity(b"r3") == 3  # an smrd from before the suffix
    for bad in (b"g0-0a1b2c3d", b"r", b"rx-0a1b2c3d", b"r3-0A1B2C3D", b"r3-0a1b", b"r1234567",
                b"r3-0a1b2c3d-", b"r-1"):
        assert parse_replica_identity(bad) is None, bad


def test_a_replica_restarted_before_its_peers_saw_it_die_is_heard_at_once():
    # Its predecessor's connection is still open (its death went unseen). With one routing id for
    # every incarnation the router refused the newcomer, and never delivered a message from it,
    # even after the old connection closed.
    channels = Channels()
    try:
        router, endpoint, ghost = _connected(channels, replica_identity(1))
        restarted = channels.connect_dealer(endpoint, replica_identity(1))
        restarted.send(b"again")
        got = _receive(router, b"again", 5)
        assert got is not None, "the restarted replica was not heard"
        assert parse_replica_identity(got[0]) == 1
        ghost.close(0)
        restarted.send(b"still")
        assert _receive(router, b"still", 5) is not None
    finally:
        channels.close()


def test_a_forged_duplicate_routing_id_is_refused_and_the_real_peer_keeps_its_link():
    channels = Channels()
    try:
        identity = replica_identity(0)
        router, endpoint, real = _connected(channels, identity)
        forger = channels.connect_dealer(endpoint, identity)
        forger.send(b"forged")
        # The forger's message is never delivered; meanwhile the real peer still gets through.
        # (With ROUTER_HANDOVER the forger took the routing id over, and the real peer was cut
        # off, silently, until its heartbeat timed out ~4 s later.)
        for i in range(20):
            real.send(b"real %d" % i)
        forger.close(0)
        assert _receive(router, b"real 19", 2) == (identity, b"real 19")
        real.send(b"after")
        assert _receive(router, b"after", 2) == (identity, b"after"), \
            "the real peer lost its link to a forged identity"
    finally:
        channels.close()
