# Swarm simulation in CI: every seed draws its own cluster size (3/5/7), fault mix (loss,
# duplication, delay/reordering, symmetric and asymmetric partitions, crashes including between
# persist and send) and workload; invariants are checked after every step, then liveness after
# healing. A failure prints the seed and the command that replays it.
import os

import pytest

from smrd.simulation import run_seed

SEEDS = int(os.environ.get("SMRD_SIM_SEEDS", "600"))
CHUNK = 50


@pytest.mark.parametrize("first", range(0, SEEDS, CHUNK), ids=lambda s: f"seeds{s}-{s + CHUNK - 1}")
def test_swarm_seeds(first):
    failures = []
    for seed in range(first, min(first + CHUNK, SEEDS)):
        result = run_seed(seed)
        if not result.ok:
            failures.append(f"seed {seed}: {result.violation}\n  replay: {result.replay_command()}")
    assert not failures, "\n".join(failures)
