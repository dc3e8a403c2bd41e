# Transport behaviour that only real processes show: a peer whose DNS name does not resolve (a pod
# that is not scheduled yet) must not crash anyone, and the others still form a quorum.
from smrd.apps.kvclient import KVClient


def test_an_unresolvable_peer_name_is_retried_not_fatal(make_cluster):
    # A new cluster bootstrapping without one member: the others may not wait for it to recover
    # (an empty log normally asks a quorum of the others first), hence new_cluster.
    cluster = make_cluster(replicas=3, gateways=1, framing="line", settings={"new_cluster": True},
                           replica_host=lambda i: "replica-2.not-yet.invalid" if i == 2 else "127.0.0.1")
    cluster.start_replica(0)
    cluster.start_replica(1)
    cluster.start_gateway(0)
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=15) as c:
        assert c.request("PUT a 1") == b"OK"
        assert c.request("GET a") == b"VALUE 1"
    assert cluster.servers[0].alive and cluster.servers[1].alive and cluster.gateways[0].alive



def test_a_new_cluster_with_a_member_missing_waits_instead_of_guessing(make_cluster):
    # Without new_cluster, an empty replica cannot tell a new cluster from a lost disk while a
    # peer is missing, so it stays recovering (not ready) rather than risk voting with amnesia.
    cluster = make_cluster(replicas=3, gateways=1, framing="line",
                           replica_host=lambda i: "replica-2.not-yet.invalid" if i == 2 else "127.0.0.1")
    cluster.start_replica(0)
    cluster.start_replica(1)
    cluster.servers[0].wait_for("event=recovering", 10)
    assert cluster.status(0)["status"] == "recovering"
    assert cluster.status(1)["status"] == "recovering"
