# Seeds that once failed, pinned with what they caught. A new failing seed from a soak run
# (python -m smrd.simulation --seeds N) is added here with its cause once fixed.
import pytest

from smrd.simulation import Simulation, run_seed

PINNED = {
    493: "a restarted replica restored its commit point but never re-applied its log",
    179: "a duplicate planned before its original ran lost its reply when k newer seqs evicted it",
    526: "recovering replicas waited forever on a peer that had views but no values",
    1015: "recovering replicas waited forever on a peer that had views but no values",
}


@pytest.mark.parametrize("seed", sorted(PINNED), ids=lambda s: f"seed{s}")
def test_pinned_seed(seed):
    result = run_seed(seed)
    assert result.ok, f"{PINNED[seed]} — regressed: {result.violation}"


def test_a_seed_replays_identically():
    traces = []
    for _ in range(2):
        lines = []
        sim = Simulation(1, trace=lines.append)
        result = sim.run()
        traces.append((lines, result.summary, sorted(sim.decided.items())))
    assert traces[0] == traces[1]
    assert traces[0][1]["completed"] > 0
