# A replica that can send but hears nobody (a one-way partition; in production, a replica that
# still holds a CURVE key its peers no longer accept keeps its outgoing connections) must not
# drive the others through view changes: it asks for a pre-vote, the others still hear the
# leader and say nothing, and it waits. Run in the simulator with its asymmetric cuts, then
# healed: the replica follows the leader again. The old rule (suspect, then move at once) is the
# variant that must fail the same check.
from smrd.protocol import Replica
from smrd.simulation import Params, Simulation


class MovesAtOnce(Replica):
    """The rule before pre-vote: a silent leader is replaced at once (the others join)."""

    def _suspect_leader(self, reason):
        self._start_view_change(self._next_view(self.view), reason=reason)


def run(replica_class, isolated=2, ticks=600):
    sim = Simulation(7, Params(n=3, clients=2, fault_ticks=0, liveness_ticks=3000),
                     replica_class=replica_class)
    for _ in range(60):  # a leader is up and requests flow
        sim.step()
    views_before = [r.view for r in sim.replicas]
    leader = sim.replicas[0].leader
    assert isolated != leader
    completed = sum(c.completed for c in sim.clients)
    # Everything to `isolated` is lost; what it sends still arrives.
    sim.cut = {(src, isolated) for src in range(3) if src != isolated}
    for _ in range(ticks):
        sim.step()
    others = [sim.replicas[r] for r in range(3) if r != isolated]
    progress = sum(c.completed for c in sim.clients) - completed
    moved = [r.view for r in others]
    sim.cut = set()
    for _ in range(300):
        sim.step()
    return views_before, moved, progress, sim.replicas[isolated]


def test_a_replica_that_hears_nobody_moves_nobody_and_follows_once_it_hears_again():
    before, moved, progress, isolated = run(Replica)
    assert moved == [before[0]] * 2, f"the others changed views: {before} -> {moved}"
    assert progress > 50, "the two others kept ordering requests"
    assert isolated.status == "normal" and isolated.view == before[0], isolated.describe()
    assert isolated.stats.get("pre_view_changes", 0) >= 1 and isolated.stats["view_changes"] == 0


def test_without_pre_vote_the_same_replica_drives_everyone_through_view_changes():
    before, moved, _, _ = run(MovesAtOnce)
    assert max(moved) > before[0], "the variant was meant to disturb the others"
