# The gateway sends new requests to the replica it takes for the leader, alone (reply_quorum 1):
# the followers learn them from the leader's proposals and neither receive nor answer them. When
# its hint goes stale the requests still complete: a follower passes directed requests on to its
# leader, retransmissions go to every replica, and the next status answers move the hint.
import signal

from .test_faults import Load, wait_converged


def _received(cluster):
    return [cluster.status(i)["requests_received"] for i in range(cluster.n)]


def _loaded(make_cluster):
    """3 replicas under load, their gateway sending to the leader alone: (cluster, load, leader).
    Without the batches sent to every replica for divergence checks (test_gateway.py has them):
    here the followers must receive nothing but retransmissions."""
    cluster = make_cluster(replicas=3, gateways=1, framing="line",
                           settings={"divergence_check_every": 0}).start()
    load = Load(cluster, clients=4, framing="line").start()
    try:
        load.wait_progress(50)
        leader = cluster.leader()
        cluster.gateways[0].wait_for(f"event=gateway_leader leader={leader} ", 10)
    except BaseException:
        load.finish()
        raise
    return cluster, load, leader


def test_followers_receive_no_requests_while_the_gateway_knows_the_leader(make_cluster):
    cluster, load, leader = _loaded(make_cluster)
    try:
        before = _received(cluster)
        load.wait_progress(300)
        after = _received(cluster)
    finally:
        load.finish()
    assert load.history.check().ok
    got = [a - b for a, b in zip(after, before)]
    assert got[leader] >= 300, got
    followers = [got[i] for i in range(3) if i != leader]
    # Retransmissions (a reply later than gateway_retransmit_ms on a loaded machine) reach
    # everyone; nothing else does.
    assert max(followers) <= got[leader] // 10, f"followers received requests: {got}"
    wait_converged(cluster)


def test_requests_complete_when_the_hinted_leader_stops_and_the_hint_moves(make_cluster):
    cluster, load, old = _loaded(make_cluster)
    try:
        # Stopped, not killed: its connections stay up, so only silence tells the others (and
        # the gateway's retransmissions) that it no longer leads.
        cluster.servers[old].signal(signal.SIGSTOP)
        load.wait_progress(100)
        new = cluster.leader()
        assert new != old
        cluster.gateways[0].wait_for(f"event=gateway_leader leader={new} ", 10)
        cluster.servers[old].signal(signal.SIGCONT)
        load.wait_progress(100)
    finally:
        cluster.servers[old].signal(signal.SIGCONT)
        load.finish()
    assert load.history.check().ok
    assert load.errors == 0, load.reasons
    wait_converged(cluster)


def test_a_killed_leader_is_not_taken_for_the_leader_again(make_cluster):
    # Right after the kill the followers still name it (their view change takes ~100 ms): the
    # gateway must not believe them while its connection to it is down, or it sends new
    # requests into the void until its retransmit timer.
    cluster, load, old = _loaded(make_cluster)
    gateway = cluster.gateways[0]
    try:
        seen = len(gateway.lines)
        cluster.kill_replica(old)
        gateway.wait_for("event=gateway_leader leader=none", 10)
        load.wait_progress(100)
        new = cluster.leader()
        gateway.wait_for(f"event=gateway_leader leader={new} ", 10)
        after = [line for line in gateway.lines[seen:] if "event=gateway_leader" in line]
    finally:
        load.finish()
    assert not [line for line in after if f"leader={old} " in line], after
    assert load.history.check().ok
