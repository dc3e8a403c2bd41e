# The simulator's checks must be able to fail: deliberately unsafe protocol variants are run
# through the same swarm and a violation must be found within a bounded number of seeds.
import random
from dataclasses import replace

from smrd import core
from smrd.protocol import CrashFaultPolicy, Replica, Sessions
from smrd.protocol.membership import ADD_LEARNER, SYSTEM_CLIENT, Change, Membership
from smrd.protocol.messages import Propose, Requests
from smrd.protocol.ready import VOTE_RECORDS, GroupCommit, group_commit
from smrd.protocol.records import AcceptRecord, CommitRecord
from smrd.protocol.replica import _change_in
from smrd.protocol.sessions import SYSTEM
from smrd.simulation import Params, Simulation, run_seed

BOUND = 60


class MinorityQuorum(CrashFaultPolicy):
    """floor(n/2) votes: two quorums need not intersect."""

    def __init__(self, n):
        super().__init__(n)
        self.quorum = max(1, n // 2)

    def quorum_for(self, voters):
        return max(1, voters // 2)


class SkipGather(Replica):
    """A new leader that ignores what the quorum accepted and starts from its own commit point."""

    def _choose_values(self, dvcs, start):
        return {}


class VoteWithoutPersisting(Replica):
    """Votes, then forgets undecided votes when it crashes (the PySyncObj PR #202 class of bug)."""

    def _restore(self, durable):
        durable.entries = {i: e for i, e in durable.entries.items() if e[2] or i <= durable.commit}
        super()._restore(durable)


def _crash_heavy(seed):
    # Forgotten votes only matter when crashes and restarts are frequent and messages linger.
    # (A fixed membership: these variants are about votes and disks, and seeds whose membership
    # changes, often to one or two voters, dilute what they are run for.)
    return replace(Params.swarm(seed, membership=False), crash=0.03, restart_after=10, duplicate=0.1, max_delay=8,
                   drop=0.05, clients=3, client_window=2, reply_cache=4)


def _first_violation(params=None, safety_only=False, **kw):
    for seed in range(BOUND):
        result = run_seed(seed, params=params(seed) if params else None, **kw)
        if not result.ok and not (safety_only and "liveness" in result.violation):
            return seed, result.violation
    return None, None


def test_minority_quorum_is_caught():
    seed, violation = _first_violation(policy_class=MinorityQuorum)
    assert seed is not None, f"no violation in {BOUND} seeds with quorum floor(n/2)"
    # The quorum check (a decided value was accepted by a majority of the voters in force)
    # usually fires first; agreement breaks a little later in the same runs.
    assert "quorum" in violation or "agreement" in violation or "differ" in violation


def test_leader_change_without_gathering_is_caught():
    seed, violation = _first_violation(replica_class=SkipGather)
    assert seed is not None, f"no violation in {BOUND} seeds when the new leader skips gathering"


def test_the_safe_protocol_passes_the_same_seeds():
    # The same seeds with the real protocol: the violations above come from the variants.
    for seed in range(BOUND):
        result = run_seed(seed)
        assert result.ok, f"seed {seed}: {result.violation}"


def test_votes_not_persisted_are_caught():
    seed, violation = _first_violation(replica_class=VoteWithoutPersisting, params=_crash_heavy)
    assert seed is not None, f"no violation in {BOUND} crash-heavy seeds when votes are not durable"


def test_the_safe_protocol_passes_crash_heavy_seeds():
    for seed in range(BOUND):
        result = run_seed(seed, params=_crash_heavy(seed))
        assert result.ok, f"seed {seed}: {result.violation}"


class RejoinWithoutRecovery(Replica):
    """A replica back with an empty disk that votes at once, as if the cluster were new."""

    def __init__(self, *args, recovery_nonce=None, **kw):
        super().__init__(*args, **kw)


def _wipe_heavy(seed):
    return replace(Params.swarm(seed, membership=False), wipe=0.01, crash=0.01, restart_after=10, duplicate=0.05,
                   max_delay=4, drop=0.02, clients=3, client_window=2, reply_cache=4)


def test_rejoining_with_an_empty_disk_without_recovery_is_caught():
    seed, violation = _first_violation(replica_class=RejoinWithoutRecovery, params=_wipe_heavy)
    assert seed is not None, f"no violation in {BOUND} seeds when wiped replicas skip recovery"


def test_the_safe_protocol_passes_wipe_heavy_seeds():
    for seed in range(BOUND):
        result = run_seed(seed, params=_wipe_heavy(seed))
        assert result.ok, f"seed {seed}: {result.violation}"


class InstallWithoutSessions(Replica):
    """Takes a transferred checkpoint's app state but starts a fresh session table: requests
    executed before the checkpoint look new again (exactly-once is lost)."""

    def install_checkpoint(self, instance, sessions):
        return super().install_checkpoint(instance, type(sessions)(sessions.k, sessions.ttl_ms))


def _checkpoint_heavy(seed):
    p = _wipe_heavy(seed)
    return replace(p, options=replace(p.options, checkpoint_every=3), crash=0.02)


def test_a_checkpoint_installed_without_its_session_table_is_caught():
    seed, violation = _first_violation(replica_class=InstallWithoutSessions, params=_checkpoint_heavy)
    assert seed is not None, f"no violation in {BOUND} seeds when transfers drop the session table"


def test_the_safe_protocol_passes_checkpoint_heavy_seeds():
    for seed in range(BOUND):
        result = run_seed(seed, params=_checkpoint_heavy(seed))
        assert result.ok, f"seed {seed}: {result.violation}"


# ---------------------------------------------------------------- membership changes
#
# Runs where the membership changes all the time: few bootstrap voters, every other replica
# joining at some point, members asked to leave and back, and operators submitting changes of
# their own (often two at once, often stale), on top of each seed's faults.
#
# Not here: a view change that skips M3 (waits for a majority of its applied membership only).
# It went uncaught in 400 such seeds: with one change in flight at a time (M1) a majority of the
# applied membership meets every quorum of the next one, so skipping M3 only matters to a new
# leader at least two changes behind whose quorum holds both changes but none of what followed.


def _membership_heavy(seed):
    p = Params.swarm(seed, membership=False)
    r = random.Random(seed * 13 + 7)
    voters = tuple(sorted(r.sample(range(p.n), max(1, p.n // 2))))
    joiners = tuple((c, r.choice([0, r.randint(1, p.fault_ticks // 2)])) for c in range(p.n) if c not in voters)
    return replace(p, voters=voters, joiners=joiners, leave=0.01, rejoin=0.02, admin=0.05)


def _rebased(payload, cfg):
    change = Change.decode(payload)
    return payload if change is None else replace(change, base=cfg.index).encode()


def _ignoring_base(cfg, change, n):
    return Membership.check(cfg, replace(change, base=cfg.index), n)


class OverlappingChanges(Replica):
    """Two membership changes at once: the leader proposes a change without waiting for the log
    to drain, while another is in flight, planning each on the membership it has applied; and a
    change applies to whatever membership it meets (its base is ignored), so two changes made
    for the same membership both take effect. Votes above the second change are then counted by
    a membership that never holds. (The reference applies changes by the same rule: what is
    caught is what the rule does to quorums, not a different answer.)"""

    def _propose(self):
        held, self.pending_changes = self.pending_changes, []  # M1 stops at changes in flight
        try:
            super()._propose()
        finally:
            self.pending_changes = held + self.pending_changes

    def _propose_change(self, key, req):
        cfg = self.sessions.membership
        req.payload = _rebased(req.payload, cfg)
        why = self._precheck_change(req.payload)
        self.queue.popleft()
        del self.pending[key]
        if why:
            self._release_origin(req)
            if req.origin is not None:
                self._ready.replies.append((req.origin, key[0], key[1], SYSTEM, f"REFUSED {why}".encode()))
            return True
        new, _ = cfg.check(Change.decode(req.payload), self.n)
        self.proposed[key] = req
        self.pending_changes.append((self.next_instance, new))
        self._propose_value(core.pack_batch([(key[0], key[1], req.payload)], timestamp=self._stamp()))
        return True

    def _apply_change(self, payload):
        return super()._apply_change(_rebased(payload, self.sessions.membership))

    def _changes_in(self, chosen, start):
        changes, cfg = [], self.sessions.membership
        for i in sorted(chosen):
            slot = self.log.get(i)
            change = _change_in(slot.value if slot is not None and slot.decided else chosen[i][1])
            if change is not None:
                new, _ = _ignoring_base(cfg, change, self.n)
                if new is not None:
                    changes.append((i, new))
                    cfg = new
        return changes


class LearnersVote(Replica):
    """Counts the votes of learners (and of voters of any membership) as if they were voters of
    the membership in force at the instance (rule M2)."""

    def _vote(self, i, replica):
        cfg = self._config_of(i) if self.pending_changes else self.sessions.membership
        if replica in cfg.members and self._tracker_of(cfg).add(i, self.view, replica):
            self.log[i].decided = True


def test_overlapping_membership_changes_are_caught():
    # The reference applies changes by the variant's own rule, so only what that rule does to
    # quorums can be caught: a value decided by voters of a membership that never held.
    seed, violation = _first_violation(replica_class=OverlappingChanges, params=_membership_heavy,
                                       membership_rule=_ignoring_base, safety_only=True)
    assert seed is not None, f"no violation in {BOUND} seeds when two changes take effect at once"
    assert "quorum" in violation or "agreement" in violation


def test_a_change_applied_to_a_membership_it_was_not_made_for_is_caught():
    # Against the protocol's rule, the first stale change the variant applies gives another
    # answer and another membership than the decided order does.
    seed, violation = _first_violation(replica_class=OverlappingChanges, params=_membership_heavy)
    assert seed is not None, f"no violation in {BOUND} seeds when changes ignore their base"
    assert "differ" in violation or "membership" in violation


def test_votes_of_learners_are_caught():
    seed, violation = _first_violation(replica_class=LearnersVote, params=_membership_heavy)
    assert seed is not None, f"no violation in {BOUND} seeds when learners' votes count"


def test_the_safe_protocol_passes_membership_heavy_seeds():
    for seed in range(BOUND):
        result = run_seed(seed, params=_membership_heavy(seed))
        assert result.ok, f"seed {seed}: {result.violation}"
        assert result.summary["membership"]["changes"] > 0, f"seed {seed} changed no membership"


def send_before_persisting(readies):
    """A driver that lets every message leave before the fsync of the records it depends on
    (votes, view promises), not only a leader's proposals."""
    commit = group_commit(readies)
    for rd in readies:
        commit.early += rd.messages
        rd.messages = []
    return commit


def _mid_ready_crashes(seed):
    # Crashes that land between writing and the fsync are what this variant is about.
    return replace(_crash_heavy(seed), crash_mid_ready=0.5)


def test_a_driver_that_sends_before_persisting_is_caught():
    seed, violation = _first_violation(group_commit=send_before_persisting, params=_mid_ready_crashes)
    assert seed is not None, f"no violation in {BOUND} seeds when messages leave before their fsync"


def test_the_safe_rules_pass_the_same_seeds():
    # The real rules with the crashes the two driver variants above are caught with.
    for seed in range(BOUND):
        result = run_seed(seed, params=_mid_ready_crashes(seed))
        assert result.ok, f"seed {seed}: {result.violation}"


def count_own_vote_before_fsync(readies):
    """A driver that lets the leader go on without the fsync of its own accepts (as an fsync
    handed to another thread whose completion nobody waits for would): a burst of votes that
    holds PROPOSEs is written and not synced, so the leader reads the followers' ACCEPTED and
    counts its own vote while its AcceptRecord can still be lost."""
    proposes = any(type(msg) is Propose for rd in readies for _, msg in rd.messages)
    commit = group_commit(readies)
    if proposes and all(type(r) in VOTE_RECORDS for r in commit.records):
        commit.sync = False
    return commit


def test_a_leader_that_counts_its_own_vote_before_its_fsync_is_caught():
    # What the Raft overlap (PROPOSEs before the leader's own fsync) stands on, in
    # docs/PROTOCOL.md ("What is persisted when"): the quorum that decides holds durable votes.
    # The simulator counts a vote once it is durable, so the quorum check fires at the first
    # instance the leader's unsynced accept helped decide, crash or not.
    seed, violation = _first_violation(group_commit=count_own_vote_before_fsync, params=_mid_ready_crashes)
    assert seed is not None, f"no violation in {BOUND} seeds when the leader's own accepts are not synced"
    assert "quorum" in violation


class _WrittenVotesCount(Simulation):
    """Counts a vote once it is written, not once it is durable: the quorum check no longer sees
    an unsynced vote, and only a crash that loses one can show what it did."""

    def _write(self, r, records):
        super()._write(r, records)
        for record in records:
            if type(record) is AcceptRecord and record.instance > self.ref_applied:
                self._support(record.instance, record.view, record.value, r)


def _leader_crashes(seed):
    # Three replicas, so a lost leader vote leaves a decided value on one follower alone, and
    # crashes often and short, so a new view forms without that follower before it is repaired.
    return replace(_mid_ready_crashes(seed), n=3, crash=0.05, restart_after=5)


def test_a_crash_loses_the_leaders_unsynced_vote():
    # The harm itself, and the disk model under it: a leader that crashes before any fsync of its
    # accepts restarts without them, a new view decides other values, and agreement breaks.
    for seed in range(BOUND):
        result = _WrittenVotesCount(seed, _leader_crashes(seed), group_commit=count_own_vote_before_fsync).run()
        if not result.ok:
            assert "agreement" in result.violation or "differ" in result.violation, result.violation
            return
    raise AssertionError(f"no violation in {BOUND} seeds when crashes lose the leader's unsynced votes")


def test_the_safe_rules_pass_leader_crashes():
    for seed in range(BOUND):
        result = run_seed(seed, params=_leader_crashes(seed))
        assert result.ok, f"seed {seed}: {result.violation}"


# ---------------------------------------------------------------- one voter, bursts
#
# A single voter's own vote is a quorum: it decides an instance the moment it accepts it, in
# memory. In a burst (several messages stepped, then one group commit) a later PROPOSE carries
# that decision in its commit point, and learners execute what it covers. So a PROPOSE whose
# commit point covers an accept of its own burst must wait for the fsync (smrd.protocol.ready).


def early_proposes_whatever_their_commit(readies):
    """The rule before that: every PROPOSE of a burst of votes leaves before the fsync, whatever
    commit point it carries."""
    records, early = [], []
    sync = promised = False
    for rd in readies:
        if not rd.persist:
            continue
        records.extend(rd.persist)
        if all(type(r) is CommitRecord for r in rd.persist):
            continue
        sync = True
        if not all(type(r) in VOTE_RECORDS for r in rd.persist):
            promised = True
        elif rd.messages and not promised:
            early += [(d, msg) for d, msg in rd.messages if type(msg) is Propose]
            rd.messages = [(d, msg) for d, msg in rd.messages if type(msg) is not Propose]
    return GroupCommit(records, sync, early)


def _leader_burst(voters, learners=()):
    """Replica 0 leads `voters` (with `learners`), steps two client requests and hands over
    every Ready it has then: one burst, as the daemon's loop makes it."""
    rep = Replica(0, n=len(voters) + len(learners), sessions=Sessions(4, 10 ** 9), voters=voters,
                  recovery_nonce=None)
    for t in range(10, 60, 10):
        rep.tick(t)
        while rep.has_ready():
            rep.ready()
    for k, learner in enumerate(learners):
        change = Change(ADD_LEARNER, learner, rep.membership.index)
        rep.step(("admin", 0), Requests(core.pack_batch([(SYSTEM_CLIENT, (1 << 62) + k, change.encode())])))
        while rep.has_ready():
            rep.ready()
    assert rep.is_leader and rep.membership.learners == frozenset(learners)
    rep.step(("g", 1), Requests(core.pack_batch([(1000, 1, b"PUT a 1")])))
    rep.step(("g", 2), Requests(core.pack_batch([(1001, 1, b"PUT b 2")])))
    readies = []
    while rep.has_ready():
        readies.append(rep.ready())
    return readies


def _proposes(messages):
    return sorted((msg.instance, msg.commit) for _, msg in messages if type(msg) is Propose)


def test_a_single_voters_propose_that_announces_its_bursts_decision_waits_for_the_fsync():
    readies = _leader_burst(voters=[0], learners=[1])
    commit = group_commit(readies)
    assert commit.sync and [r.instance for r in commit.records if type(r) is AcceptRecord] == [2, 3]
    # Instance 1 (the learner's addition) is durable; 2 and 3 are accepted in this burst, and the
    # voter's own vote decided 2 at once. PROPOSE(2) announces only 1: it may leave early.
    # PROPOSE(3) announces 2, which a crash before the fsync erases: it leaves after the fsync.
    assert _proposes(commit.early) == [(2, 1)]
    assert _proposes(m for rd in readies for m in rd.messages) == [(3, 2)]
    # The old rule lets PROPOSE(3) out with the rest: the test tells the two apart.
    old = early_proposes_whatever_their_commit(_leader_burst(voters=[0], learners=[1]))
    assert _proposes(old.early) == [(2, 1), (3, 2)]


def test_proposes_of_a_burst_still_leave_early_with_three_voters():
    # Deciding takes another voter's ACCEPTED, read in a later burst: no PROPOSE of this burst
    # announces an instance it accepted, and all of them leave before the fsync, as before.
    readies = _leader_burst(voters=[0, 1, 2])
    commit = group_commit(readies)
    assert commit.sync
    assert _proposes(commit.early) == [(1, 0), (1, 0), (2, 0), (2, 0)]
    assert not _proposes(m for rd in readies for m in rd.messages)


def _single_voter_bursts(seed):
    # One bootstrap voter; the other two start at once and join (as learners, then promoted), and
    # members leave, come back and are changed by operators, so memberships of one voter with
    # learners recur. Bursts, and crashes that land before the fsync. Catch-up in chunks of 64:
    # a single voter runs far ahead of learners that were down, and chunks of one would not
    # catch up within the liveness budget.
    p = Params.swarm(seed, membership=False)
    return replace(p, n=3, voters=(0,), joiners=((1, 0), (2, 0)), leave=0.005, rejoin=0.01, admin=0.01,
                   crash=0.03, crash_mid_ready=0.8, restart_after=5, wipe=0.0, clients=4, client_window=3,
                   reply_cache=7, bursts=True, options=replace(p.options, window=4, catchup_max_entries=64))


def test_a_single_voters_early_propose_announcing_an_unsynced_decision_is_caught():
    # A learner executes an instance whose only vote (the voter's unsynced accept) a crash then
    # erases: the quorum check fires (a decided value no voter durably accepted), or agreement
    # breaks once the restarted voter decides that instance again. (Without bursts it is not
    # caught: a Ready then holds what one message produced.)
    seed, violation = _first_violation(group_commit=early_proposes_whatever_their_commit,
                                       params=_single_voter_bursts)
    assert seed is not None, f"no violation in {BOUND} seeds when a single voter's PROPOSEs announce unsynced decisions"
    assert "quorum" in violation or "agreement" in violation or "differ" in violation


def test_the_safe_rules_pass_single_voter_bursts():
    for seed in range(BOUND):
        result = run_seed(seed, params=_single_voter_bursts(seed))
        assert result.ok, f"seed {seed}: {result.violation}"
