# The simulator's checks must be able to fail: deliberately unsafe protocol variants are run
# through the same swarm and a violation must be found within a bounded number of seeds.
import random
from dataclasses import replace

from smrd import core
from smrd.protocol import CrashFaultPolicy, Replica
from smrd.protocol.membership import Change, Membership
from smrd.protocol.ready import group_commit
from smrd.protocol.replica import _change_in
from smrd.protocol.sessions import SYSTEM
from smrd.simulation import Params, run_seed

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
    for seed in range(BOUND):
        result = run_seed(seed, params=_mid_ready_crashes(seed))
        assert result.ok, f"seed {seed}: {result.violation}"
