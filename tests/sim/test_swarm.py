# Swarm simulation in CI: every seed draws its own cluster size (3/5/7), fault mix (loss,
# duplication, delay/reordering, symmetric and asymmetric partitions, crashes including between
# persist and send, lost disks), workload and, for about two seeds in three, membership changes
# (replicas joining late, members leaving and coming back, operators' own concurrent and stale
# changes) and, for about three seeds in ten, Readies handled in bursts as the daemon's loop
# makes them (Params.bursts); invariants are checked after every step, then liveness after
# healing. A failure prints the seed and the command that replays it.
import os
from dataclasses import replace

import pytest

from smrd.simulation import Params, run_seed

SEEDS = int(os.environ.get("SMRD_SIM_SEEDS", "600"))
CHUNK = 50
# The same scenarios again with clients that send most requests to one random replica alone,
# marked directed, as a gateway with a leader hint does (stale 2 times in 3 here): a follower
# passes them on to its leader, and only a retransmission reaches every replica.
DIRECTED_SEEDS = SEEDS // 4
DIRECTED = 0.8


@pytest.mark.parametrize("first", range(0, SEEDS, CHUNK), ids=lambda s: f"seeds{s}-{s + CHUNK - 1}")
def test_swarm_seeds(first):
    failures = []
    changed = 0
    seeds = range(first, min(first + CHUNK, SEEDS))
    for seed in seeds:
        result = run_seed(seed)
        if not result.ok:
            failures.append(f"seed {seed}: {result.violation}\n  replay: {result.replay_command()}")
        elif result.summary.get("membership", {}).get("changes", 0) > 0:
            changed += 1
    assert not failures, "\n".join(failures)
    # The membership part must not quietly test nothing: in about 60% of the seeds changes are
    # decided and applied (ask for a third, far from chance).
    if len(seeds) >= 20:
        assert changed >= len(seeds) // 3, f"only {changed} of {len(seeds)} seeds changed their membership"


@pytest.mark.parametrize("first", range(0, DIRECTED_SEEDS, CHUNK), ids=lambda s: f"seeds{s}-{s + CHUNK - 1}")
def test_swarm_seeds_with_directed_requests(first):
    failures = []
    for seed in range(first, min(first + CHUNK, DIRECTED_SEEDS)):
        result = run_seed(seed, params=replace(Params.swarm(seed), directed=DIRECTED))
        if not result.ok:
            failures.append(f"seed {seed}: {result.violation}\n  replay: {result.replay_command()}")
    assert not failures, "\n".join(failures)
