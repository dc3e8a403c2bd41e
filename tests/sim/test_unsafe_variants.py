# The simulator's checks must be able to fail: deliberately unsafe protocol variants are run
# through the same swarm and a violation must be found within a bounded number of seeds.
from dataclasses import replace

from smrd.protocol import CrashFaultPolicy, Replica
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
    return replace(Params.swarm(seed), crash=0.03, restart_after=10, duplicate=0.1, max_delay=8,
                   drop=0.05, clients=3, client_window=2, reply_cache=4)


def _first_violation(params=None, **kw):
    for seed in range(BOUND):
        result = run_seed(seed, params=params(seed) if params else None, **kw)
        if not result.ok:
            return seed, result.violation
    return None, None


def test_minority_quorum_is_caught():
    seed, violation = _first_violation(policy_class=MinorityQuorum)
    assert seed is not None, f"no violation in {BOUND} seeds with quorum floor(n/2)"
    assert "agreement" in violation or "differ" in violation


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
    return replace(Params.swarm(seed), wipe=0.01, crash=0.01, restart_after=10, duplicate=0.05,
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
