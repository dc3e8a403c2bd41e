# What drivers read of a replica and ask of it (Replica.snapshot() and the explicit methods):
# each must say exactly what the replica's state says, at every step of real runs, since the
# daemon's status, readiness and log lines are built from them.
import dataclasses

import pytest

from smrd import core
from smrd.protocol import Options, Replica, Sessions
from smrd.protocol import messages as m
from smrd.protocol.membership import ADD_LEARNER, Change, Membership
from smrd.protocol.sessions import DUPLICATE, EXECUTE
from smrd.protocol.status import LogEntry, ReplicaSnapshot
from smrd.simulation import run_seed

OPTS = Options(window=2, batch_max_requests=4, heartbeat_ticks=2, election_ticks=10,
               request_ticks=20, retransmit_ticks=4)


def _assert_agrees(rep, s):
    """`s` (taken just now) against the replica's own fields, one by one."""
    assert isinstance(s, ReplicaSnapshot)
    assert (s.id, s.view, s.leader, s.status, s.role, s.is_leader) == (
        rep.id, rep.view, rep.leader, rep.status, rep.role, rep.is_leader)
    assert (s.commit, s.applied, s.top, s.low, s.evicted) == (
        rep.commit, rep.applied, rep.top, rep.low, rep.evicted)
    assert s.checkpoints == tuple(rep.checkpoints)
    assert s.checkpoint == (rep.checkpoints[-1] if rep.checkpoints else 0)
    assert (s.catchup_target, s.leader_commit) == (rep.catchup_target, rep.leader_commit)
    assert s.known_commit == max(rep.commit, rep.catchup_target, rep.leader_commit)
    assert s.membership is rep.membership  # drivers notice a change by identity
    assert s.pending_changes == tuple(rep.pending_changes)
    assert (s.auto_join, s.leaving) == (rep.auto_join, rep.leaving)
    assert s.transfer_from == rep.transfer_from
    assert s.view_change_reason == rep.view_change_reason
    assert s.has_quorum_contact == rep.has_quorum_contact()
    assert dict(s.contact_ages) == {r: rep.now - t for r, t in rep.contact.items()}
    assert list(s.contact_ages) == list(rep.contact)  # the same order as before: the status JSON's
    assert (s.pending, s.proposed) == (len(rep.pending), len(rep.proposed))
    assert dict(s.stats) == rep.stats
    # The status JSON, key by key and in order, as it was built from the fields themselves.
    assert list(rep.describe().items()) == list({
        "id": rep.id, "view": rep.view, "leader": rep.leader, "status": rep.status,
        "commit": rep.commit, "applied": rep.applied, "top": rep.top, "low": rep.low,
        "evicted": rep.evicted, "checkpoint": rep.checkpoints[-1] if rep.checkpoints else 0,
        "role": rep.role, "membership": rep.membership.describe(),
        "pending": len(rep.pending), "proposed": len(rep.proposed), **rep.stats}.items())
    # Values: decided ones still in memory, and every slot as it is.
    for i in range(max(rep.low, rep.evicted) - 2, rep.top + 2):
        slot = rep.log.get(i)
        assert rep.value_of(i) == (slot.value if slot is not None and slot.decided else None)
        assert rep.log_entry(i) == (None if slot is None else (slot.view, slot.value, slot.decided))
    for i in range(max(rep.low, rep.evicted) + 1, rep.commit + 1):
        assert rep.value_of(i) is not None, "every instance up to the commit point is decided"


class CheckedReplica(Replica):
    """A replica that checks its snapshot against itself each time its driver takes a Ready."""
    seen = set()

    def ready(self):
        out = super().ready()
        s = self.snapshot()
        _assert_agrees(self, s)
        seen = CheckedReplica.seen
        seen.add(s.status)
        seen.add("leader" if s.is_leader else s.role)
        if s.checkpoints:
            seen.add("checkpoint")
        if s.evicted > s.low:
            seen.add("evicted")
        if s.transfer_from is not None:
            seen.add("transfer")
        if s.pending_changes:
            seen.add("change in flight")
        if s.leaving:
            seen.add("leaving")
        return out


def test_the_snapshot_agrees_with_the_replica_at_every_ready_of_simulated_runs():
    CheckedReplica.seen = set()
    for seed in range(24):
        result = run_seed(seed, replica_class=CheckedReplica)
        assert result.ok, result.violation
    # The runs went through every state the snapshot describes.
    assert CheckedReplica.seen >= {"normal", "view-change", "recovering", "leader", "voter",
                                   "learner", "none", "checkpoint", "evicted", "transfer",
                                   "change in flight", "leaving"}, CheckedReplica.seen


def test_a_snapshot_cannot_change_and_keeps_what_was_true_when_taken():
    rep = Replica(1, n=3, options=OPTS)
    before = rep.snapshot()
    rep.step(0, m.Propose(0, 1, core.pack_batch([(1, 1, b"PUT a 1")]), 0))
    rep.step(0, m.Commit(0, 1))
    rep.tick()
    after = rep.snapshot()
    assert (before.commit, before.top, before.leader_commit) == (0, 0, 0)
    assert dict(before.contact_ages) == {}
    assert (after.commit, after.top, after.leader_commit) == (1, 1, 1)
    assert dict(after.contact_ages) == {0: 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.commit = 5
    with pytest.raises(TypeError):
        after.stats["stale_messages"] = 5
    with pytest.raises(TypeError):
        after.contact_ages[0] = 0
    rep.stats["stale_messages"] += 1
    assert after.stats["stale_messages"] == 0, "a snapshot holds a copy of the counters"


def test_the_snapshot_of_a_leader_says_whether_it_hears_a_quorum():
    rep = Replica(0, n=3, options=OPTS)
    s = rep.snapshot()
    assert s.is_leader and s.role == "voter" and not s.has_quorum_contact
    rep.step(1, m.Ack(0, 0))
    assert rep.snapshot().has_quorum_contact
    for _ in range(OPTS.election_ticks):
        rep.tick()
    s = rep.snapshot()
    assert not s.has_quorum_contact and s.contact_ages[1] == OPTS.election_ticks


def test_value_of_gives_decided_values_held_in_memory_and_log_entry_every_slot():
    rep = Replica(1, n=3, options=OPTS)
    one = core.pack_batch([(1, 1, b"PUT a 1")])
    two = core.pack_batch([(1, 2, b"PUT a 2")])
    rep.step(0, m.Propose(0, 1, one, 0))
    rep.step(0, m.Propose(0, 2, two, 0))
    assert rep.value_of(1) is None, "accepted is not decided"
    assert rep.log_entry(1) == LogEntry(0, one, False)
    rep.step(0, m.Commit(0, 1))
    assert (rep.value_of(1), rep.value_of(2)) == (one, None)
    assert rep.log_entry(1) == LogEntry(view=0, value=one, decided=True)
    assert rep.evict(1) == 1
    assert rep.value_of(1) is None and rep.log_entry(1) is None, "evicted: the log files hold it"
    assert rep.value_of(3) is None and rep.log_entry(3) is None


def _changes_sent(rd):
    return [Change.decode(payload) for _, msg in rd.messages if type(msg) is m.Forward
            for _, _, payload in core.Batch(msg.batch)]


def test_stop_auto_join_stops_a_replica_asking_to_join():
    asking = Replica(3, n=4, options=OPTS, voters=[0, 1, 2], auto_join=True)
    asking.tick()
    assert _changes_sent(asking.ready()) == [Change(ADD_LEARNER, 3, 0)] * 3  # one per voter
    removed = Replica(3, n=4, options=OPTS, voters=[0, 1, 2], auto_join=True)
    removed.stop_auto_join()
    assert not removed.snapshot().auto_join and not removed.auto_join
    for _ in range(3 * OPTS.election_ticks):
        removed.tick()
        assert _changes_sent(removed.ready()) == []


def test_request_join_takes_back_a_request_to_leave():
    rep = Replica(3, n=4, options=OPTS, voters=[0, 1, 2])
    rep.request_leave()
    s = rep.snapshot()
    assert s.leaving and not s.auto_join
    rep.request_join()
    s = rep.snapshot()
    assert not s.leaving and s.auto_join and (rep.leaving, rep.auto_join) == (False, True)
    rep.tick()
    assert _changes_sent(rep.ready()) == [Change(ADD_LEARNER, 3, 0)] * 3


def test_replace_sessions_plans_with_the_new_table_and_keeps_the_applied_membership():
    rep = Replica(1, n=3, options=OPTS, sessions=Sessions(8, 10 ** 9))
    applied = rep.membership
    old = rep.sessions
    rebuilt = Sessions(8, 10 ** 9)
    rebuilt.membership = Membership(0, frozenset({0}))  # what a checkpoint's table may say
    rep.replace_sessions(rebuilt)
    assert rep.sessions is rebuilt and rebuilt.membership is applied
    assert rep.snapshot().membership is applied
    rep.step(0, m.Propose(0, 1, core.pack_batch([(7, 1, b"PUT a 1")]), 0))
    rep.step(0, m.Commit(0, 1))
    [(instance, _, plan)] = rep.ready().apply
    assert instance == 1 and [p[:3] for p in plan] == [(7, 1, EXECUTE)]
    assert rebuilt.classify(7, 1) == DUPLICATE and old.classify(7, 1) == EXECUTE
    empty = Sessions(8, 10 ** 9)
    rep.replace_sessions(empty)
    assert empty.membership is applied, "a table without a membership gets the applied one"
