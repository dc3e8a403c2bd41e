# Membership changes with real processes under load: hosts.conf lists 5 candidates, the cluster
# bootstraps with voters [0, 1, 2], grows to 5 voters (replicas that start with auto_join), has
# its leader removed and joined again with `smrd admin`, shrinks back to 3 with `smrd admin leave`,
# refuses what it must refuse, and has a replica whose disk was wiped come back on its own
# (docs/membership.md, "Replacing a replica whose disk was lost"). Several clients run all along;
# their histories must be linearizable, no client may see an error (only retries inside the
# gateway), every acknowledged write must be readable, and the members' apps must end equal.
import shutil
import subprocess
import sys
import time

import pytest

from smrd.apps.kvclient import KVClient, parse_get
from smrd.ops.local import LocalCluster
from smrd.ops.status import agreed_membership

from .conftest import free_base_port
from .test_faults import KEYS, Load

# Snapshot hooks with frequent checkpoints: joining replicas and the wiped one get a checkpoint
# (state transfer), not the whole log.
SETTINGS = {"voters": [0, 1, 2], "snapshot_request": "SNAPSHOT", "restore_request": "RESTORE {state}",
            "checkpoint_every": 200}
AUTO_JOIN = ["--auto-join", "true"]


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(replicas=5, gateways=2, framing="line", base_port=free_base_port(replicas=5),
                     data_dir=tmp_path / "cluster", settings=SETTINGS,
                     replica_args={3: AUTO_JOIN, 4: AUTO_JOIN})
    yield c
    c.stop()


def admin(cluster, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "smrd", "admin", *map(str, args), "-c", str(cluster.hosts_path)],
                          capture_output=True, text=True, timeout=timeout)


def running(cluster):
    return [i for i in range(cluster.n) if cluster.servers[i].alive]


def statuses(cluster):
    rows = []
    for i in running(cluster):
        st = cluster.status(i, 0.5)
        rows.append({"id": i, "reachable": st is not None, **(st or {})})
    return rows


def wait_membership(cluster, voters, learners=(), timeout=40):
    """Poll (there is no event across processes) until every running member reports this
    membership, is in normal status, and has executed what the leader committed."""
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        rows = statuses(cluster)
        cfg = agreed_membership(rows)
        if cfg and cfg["voters"] == sorted(voters) and cfg["learners"] == sorted(learners):
            members = [r for r in rows if r["id"] in cfg["voters"] + cfg["learners"]]
            top = max(r["commit"] for r in members if r["reachable"])
            if all(r["reachable"] and r["membership"] == cfg and r["status"] == "normal"
                   and r["executed"] >= top - 64 for r in members):
                return cfg
        time.sleep(0.1)
    pytest.fail(f"membership did not become voters={sorted(voters)} learners={sorted(learners)} "
                f"within {timeout} s: {[(r['id'], r.get('role'), r.get('membership')) for r in rows]}")


def wait_ready(cluster, i, timeout=60):
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = cluster.status(i, 0.5)
        if st and st["ready"]:
            return st
        time.sleep(0.1)
    pytest.fail(f"replica {i} not ready within {timeout} s: {st}")


def wait_until(what, check, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout} s")


def stop_replica(cluster, i):
    # A planned stop of the pod: SIGTERM to smrd (it hands leadership off if it leads), then the app.
    assert cluster.servers[i].stop() == 0
    cluster.apps[i].stop()


@pytest.mark.timeout(300)
def test_grow_to_five_shrink_to_three_and_replace_a_wiped_replica_under_load(cluster):
    started = time.monotonic()
    for i in (0, 1, 2):
        cluster.start_replica(i)
    for g in range(2):
        cluster.start_gateway(g)
    cluster.leader()
    assert wait_membership(cluster, [0, 1, 2])["index"] == 0
    # Candidates 3 and 4 are not running: the gateways send to the members only.
    for g in range(2):
        cluster.gateways[g].wait_for("event=gateway_targets replicas=[0, 1, 2]", 10)
    load = Load(cluster, clients=4).start()
    try:
        load.wait_progress(100)

        # 3 -> 5: each new replica asks to join, catches up as a learner, is promoted.
        cluster.start_replica(3)
        wait_membership(cluster, [0, 1, 2, 3])
        assert wait_ready(cluster, 3)["role"] == "voter"
        load.wait_progress(100)
        cluster.start_replica(4)
        cfg = wait_membership(cluster, [0, 1, 2, 3, 4])
        assert cfg["index"] == 4 and cfg["quorum"] == 3           # learner, promote, learner, promote
        load.wait_progress(100)

        # Removing the leader: it orders its own removal; as it applies, the group moves to the next view.
        leader = cluster.leader()
        out = admin(cluster, "leave", leader)
        assert out.returncode == 0, out.stderr
        assert f"OK remove {leader}" in out.stdout
        rest = [i for i in range(5) if i != leader]
        wait_membership(cluster, rest)
        assert cluster.leader() != leader
        # It learns of its own removal late: the leader stops sending to it once the change is
        # applied, so it finds out by asking the others (docs/membership.md).
        wait_until(f"replica {leader} learns it was removed",
                   lambda: (cluster.status(leader, 0.5) or {}).get("role") == "none")
        load.wait_progress(50)
        # ... and joined again by the operator (it has no auto_join): learner, caught up, voter.
        out = admin(cluster, "join", leader)
        assert out.returncode == 0, out.stderr
        assert f"OK add-learner {leader}" in out.stdout and f"OK promote {leader}" in out.stdout
        wait_membership(cluster, range(5))
        load.wait_progress(50)

        # 5 -> 3: the candidates that joined leave, then stop (a scale-down's preStop, by hand).
        for i in (4, 3):
            out = admin(cluster, "leave", i)
            assert out.returncode == 0, out.stderr
            assert f"OK remove {i}" in out.stdout
            if i == 4:
                # Removed while running, a replica with auto_join does not ask to join again.
                st = wait_until("replica 4 learns it was removed",
                                lambda: (lambda s: s if s and s["role"] == "none" else None)(cluster.status(4, 0.5)))
                assert st["auto_join"] is False
            stop_replica(cluster, i)
            wait_membership(cluster, range(i))
            load.wait_progress(50)
        assert wait_membership(cluster, [0, 1, 2])["index"] == 9
        # An app restart right after the changes: the log after the newest checkpoint is replayed
        # into the new app, membership changes included; they are skipped (never the app's
        # business) and the replica keeps the membership it applied.
        follower = next(i for i in (0, 1, 2) if i != cluster.leader())
        cluster.apps[follower].kill()
        cluster.start_app(follower)
        cluster.servers[follower].wait_for("app restart detected", 30)
        assert wait_ready(cluster, follower)["membership"]["index"] == 9
        load.wait_progress(50)
        # Leaving again is idempotent: a non-member just says so.
        out = admin(cluster, "leave", 4)
        assert out.returncode == 0 and "is not a member" in out.stdout, out

        # Refusals. A replica that is not a candidate in hosts.conf: a usage error, no traceback.
        out = admin(cluster, "join", 7)
        assert out.returncode == 2
        assert "replica 7 is not in" in out.stderr and len(out.stderr.strip().splitlines()) == 1
        # Stop one follower; removing the other one would leave 2 voters of which only the
        # leader answers: refused, with the reason on one line, and nothing changes.
        leader = cluster.leader()
        victim, other = [i for i in (2, 1, 0) if i != leader][:2]
        stop_replica(cluster, victim)
        wait_until(f"leader {leader} notices that replica {victim} is gone",
                   lambda: (cluster.status(leader, 0.5) or {}).get("peer_contact_s", {}).get(str(victim), 0) > 1.0)
        out = admin(cluster, "leave", other, "--timeout", "10")
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "would lose quorum" in lines[0] and "Traceback" not in out.stderr, out.stderr
        load.wait_progress(30)                                    # the two left still serve

        # The stopped replica's disk is lost: delete its data and start it with an empty one. It
        # is still a voter of the replicated membership, so it recovers by the protocol (asks
        # the others before voting), fetches a checkpoint, and catches up. No membership change.
        shutil.rmtree(cluster.dir / f"replica-{victim}")
        cluster.start_replica(victim)
        server = cluster.servers[victim]
        server.wait_for("event=recovering", 10)
        server.wait_for("event=recovered", 30)
        st = wait_ready(cluster, victim)
        assert st["role"] == "voter" and st["membership"]["index"] == 9
        load.wait_progress(100)
    finally:
        load.finish()

    assert load.errors == 0, f"clients saw errors: {load.reasons[:5]}"
    # Every key read back through a gateway joins the history: acknowledged PUTs must be there.
    with KVClient("127.0.0.1", cluster.gateway_port(1), "line", timeout=15) as client:
        for key in KEYS:
            op = load.history.invoke("final", "get", key)
            load.history.complete(op, parse_get(client.request(f"GET {key}")))
    result = load.history.check()
    assert result.ok, str(result)
    assert load.done > 500

    cfg = wait_membership(cluster, [0, 1, 2])
    deadline = time.monotonic() + 30
    while True:
        st = [cluster.status(i) for i in (0, 1, 2)]
        if len({(s["commit"], s["executed"]) for s in st}) == 1 and st[0]["executed"] == st[0]["commit"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    scans = []
    for i in (0, 1, 2):
        with KVClient("127.0.0.1", cluster.app_port(i), "line", timeout=10) as app:
            scans.append(app.request("SCAN"))
    assert scans[0] == scans[1] == scans[2], "the members' apps diverged"
    members = admin(cluster, "members", "--json")
    assert members.returncode == 0 and f'"index": {cfg["index"]}' in members.stdout
    print(f"membership scenario: {load.done} operations in {time.monotonic() - started:.1f} s")
