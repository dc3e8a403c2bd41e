# Scripted scenarios for the protocol core, in the spirit of raft_paper_test: a tiny lossless
# in-memory router, then one behaviour per test. Faults at scale are the simulator's job.
from smrd import core
from smrd.protocol import (
    AcceptRecord, Accepted, DurableState, Options, Replica, Requests, StartViewChange, ViewRecord,
)
from smrd.protocol import messages as m
from smrd.protocol.sessions import DUPLICATE, EXECUTE, Sessions, execute_batch, run_plan
from smrd.simulation.kvapp import KVApp

OPTS = Options(window=2, batch_max_requests=4, heartbeat_ticks=2, election_ticks=10,
               request_ticks=20, retransmit_ticks=4)


class Cluster:
    def __init__(self, n=3, opts=OPTS):
        self.replicas = [Replica(r, n=n, options=opts) for r in range(n)]
        self.records = [[] for _ in range(n)]
        self.apps = [KVApp() for _ in range(n)]
        self.applied = [[] for _ in range(n)]
        self.replies = [[] for _ in range(n)]
        self.down = set()
        self.inbox = []

    def request(self, client_id, seq, payload, to=None):
        batch = core.pack_batch([(client_id, seq, payload)])
        for r in (to if to is not None else range(len(self.replicas))):
            self.inbox.append(("gw", r, Requests(batch)))
        self.flush()

    def flush(self, limit=10_000):
        for r in range(len(self.replicas)):
            self._drain(r)
        while self.inbox and limit:
            limit -= 1
            src, dst, msg = self.inbox.pop(0)
            if dst in self.down or src in self.down:
                continue
            self.replicas[dst].step(src, msg)
            self._drain(dst)

    def tick(self, times=1):
        for _ in range(times):
            for r, rep in enumerate(self.replicas):
                if r not in self.down:
                    rep.tick()
            self.flush()

    def _drain(self, r):
        rep = self.replicas[r]
        while rep.has_ready():
            rd = rep.ready()
            self.records[r].extend(rd.persist)
            for dst, msg in rd.messages:
                self.inbox.append((r, dst, msg))
            for instance, value, plan in rd.apply:
                self.applied[r].append((instance, value))
                self.replies[r].extend(run_plan(rep.sessions, plan, self.apps[r].execute))
            self.replies[r].extend(rd.replies)


def test_three_replicas_decide_and_execute_the_same_order():
    c = Cluster()
    c.request(1, 1, b"PUT a 1")
    c.request(1, 2, b"GET a")
    c.tick(3)
    assert c.applied[0] == c.applied[1] == c.applied[2]
    assert [r[3] for r in c.replies[1]] == [b"OK", b"VALUE 1"]
    assert all(rep.commit == 2 for rep in c.replicas)


def test_a_vote_is_persisted_before_it_is_sent():
    rep = Replica(1, n=3, options=OPTS)
    value = core.pack_batch([(1, 1, b"PUT a 1")])
    rep.step(0, m.Propose(0, 1, value, 0))
    rd = rep.ready()
    assert rd.persist == [AcceptRecord(1, 0, value)]
    assert rd.messages == [(0, Accepted(0, 1, 1))]


def test_leader_batches_and_respects_the_window():
    rep = Replica(0, n=3, options=Options(window=1, batch_max_requests=2, heartbeat_ticks=2,
                                           election_ticks=10))
    batch = core.pack_batch([(1, s, b"GET a") for s in range(1, 6)])
    rep.step("gw", Requests(batch))
    proposes = [msg for _, msg in rep.ready().messages if isinstance(msg, m.Propose)]
    assert {p.instance for p in proposes} == {1}, "W=1: one instance in flight"
    assert len(core.Batch(proposes[0].value)) == 2, "batch_max_requests"
    rep.step(1, Accepted(0, 1))
    proposes = [msg for _, msg in rep.ready().messages if isinstance(msg, m.Propose)]
    assert {p.instance for p in proposes} == {2}


def test_leader_crash_elects_the_next_leader_and_keeps_pending_requests():
    c = Cluster()
    c.request(1, 1, b"PUT a 1")
    c.down.add(0)
    c.request(1, 2, b"PUT b 2")      # reaches the followers only: the leader is down
    c.tick(60)
    assert c.replicas[1].is_leader and c.replicas[1].view == 1
    assert [v for _, v in c.applied[1]] == [v for _, v in c.applied[2]]
    executed = [(cid, seq) for cid, seq, st, _ in c.replies[2] if st == EXECUTE]
    assert executed == [(1, 1), (1, 2)]


def test_a_duplicate_request_gets_the_cached_reply_without_ordering():
    c = Cluster()
    c.request(7, 1, b"PUT k v")
    c.tick(3)
    decided = c.replicas[0].commit
    c.request(7, 1, b"PUT k v")
    assert c.replicas[0].commit == decided
    assert (("gw", 7, 1, DUPLICATE, b"OK")) in c.replies[0]


def test_a_restarted_leader_does_not_lead_its_old_view_again():
    c = Cluster()
    c.request(1, 1, b"PUT a 1")
    durable = DurableState.fold(c.records[0])
    restarted = Replica(0, n=3, options=OPTS, durable=durable)
    assert restarted.view == 1 and not restarted.is_leader
    assert ViewRecord(1) in restarted.ready().persist
    assert restarted.commit == durable.commit >= 1


def test_a_lagging_follower_catches_up_from_peers():
    c = Cluster(opts=Options(window=4, batch_max_requests=1, heartbeat_ticks=2, election_ticks=10,
                             request_ticks=20, retransmit_ticks=4, catchup_max_entries=3))
    c.down.add(2)
    for seq in range(1, 11):
        c.request(1, seq, b"PUT k %d" % seq, to=[0, 1])
        c.tick()
    assert c.replicas[0].commit == 10 and c.replicas[2].commit == 0
    c.down.discard(2)
    c.tick(20)
    assert c.replicas[2].commit == 10
    assert c.applied[2] == c.applied[0]


def test_a_higher_view_is_joined_and_stale_views_are_ignored():
    c = Cluster()
    c.replicas[2].step(1, StartViewChange(5))
    assert c.replicas[2].view == 5
    c.flush()
    c.tick(5)
    assert all(rep.view == 5 for rep in c.replicas)
    assert c.replicas[5 % 3].is_leader
    before = c.replicas[0].describe()["stale_messages"]
    c.replicas[0].step(0 if c.replicas[0].id else 1, m.Propose(2, 9, core.pack_batch([]), 0))
    assert c.replicas[0].describe()["stale_messages"] == before + 1


def test_unknown_sender_is_ignored():
    rep = Replica(0, n=3, options=OPTS)
    rep.step(9, m.Commit(0, 5))
    assert rep.describe()["stale_messages"] == 1 and not rep.has_ready()


def test_sessions_reject_too_old_and_expired():
    s = Sessions(k=2, ttl_ms=1000)
    app = KVApp()
    out = execute_batch(s, core.pack_batch([(1, q, b"SIZE") for q in (1, 2, 3)], timestamp=10), app.execute)
    assert [o[2] for o in out] == [EXECUTE] * 3
    out = execute_batch(s, core.pack_batch([(1, 1, b"SIZE"), (1, 3, b"SIZE")], timestamp=20), app.execute)
    assert [o[2] for o in out] == [2, DUPLICATE]          # seq 1 was evicted: TOO_OLD
    execute_batch(s, core.pack_batch([], timestamp=5000), app.execute)
    out = execute_batch(s, core.pack_batch([(1, 9, b"SIZE")], timestamp=5001), app.execute)
    assert out[0][2] == 3                                  # session expired: UNKNOWN_SESSION


def test_one_gateway_cannot_fill_a_replica_with_pending_requests():
    rep = Replica(1, n=3, options=Options(max_pending_per_origin=10, heartbeat_ticks=2,
                                           election_ticks=10))
    rep.step("greedy", Requests(core.pack_batch([(1, s, b"GET a") for s in range(1, 50)])))
    rep.step("polite", Requests(core.pack_batch([(2, s, b"GET a") for s in range(1, 5)])))
    assert len(rep.pending) == 14
    assert rep.describe()["requests_dropped"] == 39
    # Once its requests execute, the greedy gateway may send again.
    value = core.pack_batch([(1, s, b"GET a") for s in range(1, 11)])
    rep.step(0, m.Propose(0, 1, value, 1))
    rep.step(0, m.Commit(0, 1))
    rep.step("greedy", Requests(core.pack_batch([(1, 60, b"GET a")])))
    assert (1, 60) in rep.pending


def test_a_dropped_connection_to_the_leader_shortens_the_wait_to_two_heartbeats():
    from smrd.protocol.replica import Replica as R
    r = R(1, n=3)
    r.step(0, m.Commit(0, 0))
    r.ready()
    r.peer_lost(0)
    ticks = 0
    asked = []
    while not asked:  # it suspects the leader: it asks the other voter first (pre-vote)
        assert ticks < r.opt.election_ticks, "the leader was not suspected"
        r.tick()
        ticks += 1
        asked = [(to, msg) for to, msg in r.ready().messages if type(msg) is m.PreViewChange]
    assert ticks <= 2 * r.opt.heartbeat_ticks + 1 < r.opt.election_ticks
    # Every other voter is asked, the silent leader too (one cut off from a quorum agrees).
    assert sorted(asked) == [(0, m.PreViewChange(0)), (2, m.PreViewChange(0))]
    assert r.status == "normal"
    r.step(2, m.PreViewChangeOk(0))  # replica 2 misses the leader too: a quorum agrees
    r.tick()
    assert r.status == "view-change" and r.view == 1
    assert "connection dropped" in r.view_change_reason


def test_a_replica_that_hears_no_leader_moves_only_once_a_quorum_agrees():
    from smrd.protocol.replica import Replica as R
    r = R(1, n=3)
    r.step(0, m.Commit(0, 0))
    for _ in range(3 * r.opt.election_ticks):  # nobody answers its pre-vote: it stays put
        r.tick()
    assert r.status == "normal" and r.view == 0 and r.stats["pre_view_changes"] == 1
    # A voter that still hears the leader says nothing; one that misses it too agrees.
    other = R(2, n=3)
    other.step(0, m.Commit(0, 0))
    other.ready()
    other.step(1, m.PreViewChange(0))
    assert [msg for _, msg in other.ready().messages if type(msg) is m.PreViewChangeOk] == []
    for _ in range(other.opt.election_ticks):
        other.tick()
    other.ready()
    other.step(1, m.PreViewChange(0))
    assert (1, m.PreViewChangeOk(0)) in other.ready().messages
    r.step(2, m.PreViewChangeOk(0))
    r.tick()
    assert r.status == "view-change" and r.view == 1


def test_a_leader_heard_again_after_its_connection_dropped_is_not_suspected():
    from smrd.protocol.replica import Replica as R
    r = R(1, n=3)
    r.step(0, m.Commit(0, 0))
    r.peer_lost(0)
    r.peer_lost(2)                       # not the leader: no effect
    for _ in range(r.opt.election_ticks - 1):
        r.tick()
        r.step(0, m.Commit(0, 0))        # it reconnected and keeps sending heartbeats
    assert r.status == "normal" and r.view == 0


def test_requests_directed_at_a_follower_reach_the_leader_at_once():
    # A gateway whose leader hint is stale sends to a follower alone: the follower passes the
    # requests on now, so they are ordered without waiting for its request timer.
    c = Cluster()
    batch = core.pack_batch([(1, 1, b"PUT a 1"), (1, 2, b"GET a")])
    c.inbox.append(("gw", 1, Requests(batch, True)))
    c.flush()
    assert c.replicas[1].stats["requests_relayed"] == 2
    assert c.replicas[0].commit == 1 and c.replicas[0].pending == {}  # one batch, one instance
    c.tick(1)  # the commit point reaches the followers with the next heartbeat
    assert c.applied[0] == c.applied[1] == c.applied[2]
    assert [(cid, seq) for cid, seq, _ in core.Batch(c.applied[1][0][1])] == [(1, 1), (1, 2)]
    assert not c.replicas[1].pending, "the relaying follower still holds what was ordered"


def test_requests_sent_to_a_follower_without_the_mark_wait_for_the_request_timer():
    # Sent to every replica (or a retransmission), the leader has its own copy: the followers
    # hold theirs only to suspect a leader that does not order them, and pass nothing on.
    c = Cluster()
    c.request(1, 1, b"PUT a 1", to=[1])
    assert c.replicas[1].stats["requests_relayed"] == 0
    assert c.replicas[0].commit == 0
    c.tick(OPTS.request_ticks + 1)  # ... until the request timer: then it forwards
    assert c.replicas[1].stats["requests_forwarded"] == 1
    assert c.replicas[0].commit == 1


def test_the_leader_orders_requests_directed_at_it():
    c = Cluster()
    c.inbox.append(("gw", 0, Requests(core.pack_batch([(1, 1, b"PUT a 1")]), True)))
    c.flush()
    assert c.replicas[0].commit == 1
    assert all(rep.stats["requests_relayed"] == 0 for rep in c.replicas)
