# Seeds that once failed, pinned with what they caught. A new failing seed from a soak run
# (python -m smrd.simulation --seeds N) is added here with its cause once fixed. All of them were
# found before bursts (Params.bursts) and replay without them, as they failed.
from dataclasses import replace

import pytest

from smrd import core
from smrd.protocol import CatchupReply, DurableState, RecoveryResponse, Replica, Sessions
from smrd.simulation import Params, Simulation, run_seed

from .test_unsafe_variants import _membership_heavy

# Pinned before membership changes: replayed with the membership those seeds had then (fixed),
# so they run the scenario that once failed.
PINNED = {
    493: "a restarted replica restored its commit point but never re-applied its log",
    179: "a duplicate planned before its original ran lost its reply when k newer seqs evicted it",
    526: "recovering replicas waited forever on a peer that had views but no values",
    1015: "recovering replicas waited forever on a peer that had views but no values",
}

# Membership seeds (Params.swarm as is). Each fails again when the fix named is undone.
PINNED_MEMBERSHIP = {
    54: "a restarted replica started its view change before replaying its log, by the bootstrap "
        "membership (one voter), and decided alone",
    324: "the same (a restart's view change on the bootstrap membership): agreement broke",
    16: "a replica that learned its removal from a transferred checkpoint kept campaigning",
    1155: "a replica that lost its disk took the non-voter shortcut out of recovery, held the "
          "bootstrap membership (itself the only voter, leading view 0) and decided alone",
    812: "a promotion in flight (3 voters becoming 4) made view changes wait for a majority of 4: "
         "the learner never sends DO_VIEW_CHANGE and the voter that lost its disk cannot recover",
    18: "a recovering replica asked only the members of its bootstrap membership",
    15: "a learner with a higher view than the group dropped the leader's messages and never "
        "asked to be promoted",
    53: "recovery waited for the leader of a view only a removed replica had reached",
    93: "a recovering replica asked for catch-up only among the members of its bootstrap membership",
}

# Seeds that failed while the membership scenarios were being written, under an earlier state of
# the generator and the protocol; they no longer fail when their fix is undone, and are kept as
# runs that exercise what they once caught.
ONCE_FAILED = {
    33: "a replica outside the membership polled its view's leader, which knew nothing, for good",
    77: "a change held by a former leader made it suspect every new leader in turn",
    89: "a removed replica asked the same peer for catch-up forever and campaigned alone",
    125: "as 812 (view changes waiting for a majority of 4 voters)",
    431: "every voter held an operator's change removing itself and handed leadership on for good; "
         "then a removed replica led its old view for good, as nobody outside told it otherwise",
}

# Membership-heavy runs (tests/sim/test_unsafe_variants.py), fixed the same way.
PINNED_MEMBERSHIP_HEAVY = {
    3: "every voter held an operator's change removing itself, and each new leader handed "
       "leadership on instead of ordering it (a livelock: 800 view changes, nothing ordered)",
}


# Swarm seeds as the swarm draws them (bursts included), found after bursts.
PINNED_SWARM = {
    4453: "both voters were leaving: each handed the lead to the other for good (232 view "
          "changes), and the joiner was never added",
    4588: "the same with two leaving voters of a 5-replica group and three joiners",
}


@pytest.mark.parametrize("seed", sorted(PINNED_SWARM), ids=lambda s: f"swarm{s}")
def test_pinned_swarm_seed(seed):
    result = run_seed(seed, params=Params.swarm(seed))
    assert result.ok, f"{PINNED_SWARM[seed]} — regressed: {result.violation}"


@pytest.mark.parametrize("seed", sorted(PINNED), ids=lambda s: f"seed{s}")
def test_pinned_seed(seed):
    result = run_seed(seed, params=Params.swarm(seed, membership=False, bursts=False))
    assert result.ok, f"{PINNED[seed]} — regressed: {result.violation}"


@pytest.mark.parametrize("seed", sorted({**PINNED_MEMBERSHIP, **ONCE_FAILED}), ids=lambda s: f"seed{s}")
def test_pinned_membership_seed(seed):
    result = run_seed(seed, params=Params.swarm(seed, bursts=False))
    cause = PINNED_MEMBERSHIP.get(seed) or ONCE_FAILED[seed]
    assert result.ok, f"{cause} — regressed: {result.violation}"


@pytest.mark.parametrize("seed", sorted(PINNED_MEMBERSHIP_HEAVY), ids=lambda s: f"heavy{s}")
def test_pinned_membership_heavy_seed(seed):
    result = run_seed(seed, params=replace(_membership_heavy(seed), bursts=False))
    assert result.ok, f"{PINNED_MEMBERSHIP_HEAVY[seed]} — regressed: {result.violation}"


def test_a_crash_during_recovery_restarts_in_recovery():
    # Replica 0 lost its disk: it asks, learns that replica 1 leads view 1 with commit 3, and
    # catches up instances 1-2 from replica 2 before it crashes.
    noop = core.pack_batch((), timestamp=0)
    rep = Replica(0, n=3, sessions=Sessions(4, 10 ** 9), recovery_nonce=7)
    rep.step(1, RecoveryResponse(1, 7, 3, True, False, ()))
    rep.step(2, RecoveryResponse(1, 7, 2, False, False, ()))
    rep.step(2, CatchupReply(1, 2, ((1, noop), (2, noop))))
    persisted = rep.ready().persist
    assert rep.status == "recovering" and persisted  # values it holds now, not votes it cast
    # The driver's mark (made when it started empty, removed once recovery ended durably) is
    # still there: the replica recovers again, keeping the decided values it already holds.
    restarted = Replica(0, n=3, sessions=Sessions(4, 10 ** 9), durable=DurableState.fold(persisted),
                        recovery_nonce=8, resume_recovery=True)
    assert restarted.status == "recovering" and restarted.commit == 2
    restarted.step(1, RecoveryResponse(1, 8, 2, True, False, ((3, noop),)))  # the leader moved on
    restarted.step(2, RecoveryResponse(1, 8, 2, False, False, ()))
    assert restarted.status == "normal" and restarted.view == 1 and restarted.top == 3


def test_a_seed_replays_identically():
    traces = []
    for _ in range(2):
        lines = []
        sim = Simulation(1, trace=lines.append)
        result = sim.run()
        traces.append((lines, result.summary, sorted(sim.decided.items())))
    assert traces[0] == traces[1]
    assert traces[0][1]["completed"] > 0
