# Checkpoints, log truncation and state transfer with real processes, real files and the demo
# hashmap's snapshot hooks (SNAPSHOT / RESTORE {state}): a replica that lost its disk, or fell
# behind further than its peers kept their logs, gets a checkpoint from them, verified by hash;
# restarts restore from the local checkpoint; an app restart is rebuilt from it. Without hooks the
# log is kept (closed segments compressed) and replayed. Nothing acknowledged may be lost and the
# apps end equal, checked with the linearizability checker and a full scan.
import shutil
from pathlib import Path

from .test_durability import assert_nothing_lost, put_keys, scans
from .test_faults import Load, wait_caught_up

HOOKS = {"snapshot_request": "SNAPSHOT", "restore_request": "RESTORE {state}",
         "checkpoint_every": 150, "log_segment_bytes": 16384}


def checkpoints(cluster, i):
    return sorted(Path(cluster.dir / f"replica-{i}").glob("checkpoint-*.zst"))


def segments(cluster, i):
    return sorted(Path(cluster.dir / f"replica-{i}").glob("wal-*"))


def test_a_wiped_replica_gets_a_checkpoint_from_its_peers_and_serves(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync",
                           settings=HOOKS).start()
    load = Load(cluster, clients=3).start()
    try:
        load.wait_progress(500)                       # a few checkpoints; the logs were truncated
        victim = next(i for i in range(3) if i != cluster.leader())
        cluster.servers[victim].wait_for("event=log_truncated", 20)
        first_segment = segments(cluster, victim)[0].name
        assert not first_segment.startswith("wal-0000000000000000"), first_segment
        assert 1 <= len(checkpoints(cluster, victim)) <= 2
        cluster.kill_replica(victim)
        shutil.rmtree(cluster.dir / f"replica-{victim}")
        load.wait_progress(100)
        cluster.start_replica(victim)
        server = cluster.servers[victim]
        server.wait_for("event=state_transfer_done", 30)
        server.wait_for("event=app_restored", 10)
        server.wait_for("event=recovered", 20)
        wait_caught_up(cluster, victim)
        # The cluster now needs the replica that was wiped: stop another one and keep going.
        other = next(i for i in range(3) if i != victim and i != cluster.leader())
        cluster.kill_replica(other)
        load.wait_progress(100)
        cluster.start_replica(other)
        wait_caught_up(cluster, other)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load)


def test_a_replica_left_behind_the_truncated_logs_fetches_state(make_cluster):
    # ZeroMQ queues what peers send to a replica that is down (up to the high-water mark) and
    # delivers it on reconnect, which alone can bring a restarted replica up to date: a small
    # hwm makes sure it misses more than that.
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync",
                           settings={**HOOKS, "hwm": 20}).start()
    load = Load(cluster, clients=3).start()
    try:
        load.wait_progress(60)
        victim = next(i for i in range(3) if i != cluster.leader())
        cluster.kill_replica(victim)
        load.wait_progress(600)                       # the others checkpoint past what it holds
        cluster.start_replica(victim)
        server = cluster.servers[victim]
        server.wait_for("event=state_transfer_done", 30)
        wait_caught_up(cluster, victim)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load)


def test_every_replica_restarts_from_its_checkpoint_and_an_app_restart_is_rebuilt_from_it(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync",
                           settings=HOOKS).start()
    load = Load(cluster, clients=3).start()
    try:
        load.wait_progress(400)
        victim = next(i for i in range(3) if i != cluster.leader())
        cluster.servers[victim].wait_for("event=checkpoint ", 20)
        cluster.apps[victim].kill()                   # the app alone: smrd rebuilds it
        cluster.start_app(victim)
        line = cluster.servers[victim].wait_for("event=app_restart_detected", 20)
        assert "checkpoint=0 " not in line, line      # from the checkpoint, not from instance 1
        load.wait_progress(100)
    finally:
        for i in range(3):                            # then a power cut
            cluster.kill_replica(i)
        load.finish()
    for i in range(3):
        cluster.start_replica(i)
    for i in range(3):
        cluster.servers[i].wait_for("event=checkpoint_loaded", 10)
    assert_nothing_lost(cluster, load)


def test_without_hooks_a_wiped_replica_replays_the_compressed_log_in_close_mode(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="close", durability="fsync",
                           settings={"log_segment_bytes": 8192}).start()
    load = Load(cluster, clients=3, framing="close").start()
    try:
        load.wait_progress(250)
        victim = next(i for i in range(3) if i != cluster.leader())
        cluster.servers[victim].wait_for("event=log_compressed", 20)
        assert any(p.name.endswith(".log.zst") for p in segments(cluster, victim))
        cluster.kill_replica(victim)
        cluster.start_replica(victim)                 # replays its own compressed log
        wait_caught_up(cluster, victim)
        cluster.kill_replica(victim)
        shutil.rmtree(cluster.dir / f"replica-{victim}")
        cluster.start_replica(victim)                 # no disk: the whole log from the peers
        cluster.servers[victim].wait_for("event=recovered", 20)
        wait_caught_up(cluster, victim)
        assert not checkpoints(cluster, victim)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load, framing="close")


def test_smrd_restarting_alone_never_replays_into_an_app_that_kept_its_state(make_cluster):
    # Only the smrd container restarts: its app still holds everything. Replaying the log into it
    # would apply every request twice; without hooks smrd ends the app (its supervisor starts it
    # empty) and replays into the new one.
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync",
                           supervise=True).start()
    put_keys(cluster, 30, "a")
    victim = next(i for i in range(3) if i != cluster.leader())
    wait_caught_up(cluster, victim)
    app_pid = cluster.apps[victim].proc.pid
    cluster.servers[victim].kill()                   # the supervisor starts it again
    cluster.servers[victim].wait_for("action=end_process", 20)
    cluster.servers[victim].wait_for("event=app_rebuilt", 20)
    assert cluster.apps[victim].proc.pid != app_pid, "the app that kept its state was not ended"
    put_keys(cluster, 10, "b")
    wait_caught_up(cluster, victim)
    s = scans(cluster)
    assert s[0] == s[1] == s[2] and b"b9 v9" in s[victim]
    assert cluster.status(victim)["halted"] is None


def test_with_hooks_an_app_that_kept_its_state_is_reset_from_the_checkpoint(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync",
                           settings={**HOOKS, "checkpoint_every": 20}).start()
    put_keys(cluster, 50, "a")
    victim = next(i for i in range(3) if i != cluster.leader())
    cluster.servers[victim].wait_for("event=checkpoint ", 10)
    cluster.servers[victim].kill()
    put_keys(cluster, 10, "b")
    cluster.start_server(victim)
    cluster.servers[victim].wait_for("event=app_reset", 10)
    assert "action=restore" in cluster.servers[victim].wait_for("event=app_reset", 1)
    cluster.servers[victim].wait_for("event=app_restored", 10)
    wait_caught_up(cluster, victim)
    s = scans(cluster)
    assert s[0] == s[1] == s[2] and b"b9 v9" in s[victim]
