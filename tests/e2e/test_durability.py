# Durability with real processes and real files: replicas SIGKILLed under load (leader included,
# at random moments, so some die in the middle of log writes), all replicas killed at once, a
# torn log tail, and a log corrupt in the middle. Nothing acknowledged may be lost, histories stay
# linearizable, and the replicas' apps end equal.
import os
import random
from pathlib import Path

from smrd import core
from smrd.apps.kvclient import KVClient, parse_get
from smrd.protocol.records import CommitRecord, DecideRecord
from smrd.replica.wal.log import WriteAheadLog

from .test_faults import KEYS, Load, wait_caught_up, wait_converged


def scans(cluster, framing="line"):
    out = []
    for i in range(cluster.n):
        with KVClient("127.0.0.1", cluster.app_port(i), framing, timeout=10) as app:
            out.append(app.request("SCAN"))
    return out


def read_back(cluster, load, framing="line"):
    with KVClient("127.0.0.1", cluster.gateway_port(0), framing, timeout=15) as client:
        for key in KEYS:
            op = load.history.invoke("final", "get", key)
            load.history.complete(op, parse_get(client.request(f"GET {key}")))


def put_keys(cluster, n, prefix):
    """PUT <prefix><i> v<i> for i < n through gateway 0, each acknowledged."""
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        for i in range(n):
            assert c.request(f"PUT {prefix}{i} v{i}") == b"OK"


def assert_nothing_lost(cluster, load, framing="line"):
    """Every acknowledged write is read back, the history is linearizable, the apps are equal."""
    read_back(cluster, load, framing)
    result = load.history.check()
    assert result.ok, str(result)
    wait_converged(cluster)
    s = scans(cluster, framing)
    assert s[0] == s[1] == s[2]


def test_repeated_kills_under_load_lose_nothing(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync").start()
    load = Load(cluster, clients=4).start()
    rnd = random.Random(5)
    try:
        load.wait_progress(40)
        for round_ in range(6):
            victim = cluster.leader() if round_ % 2 == 0 else rnd.randrange(3)
            cluster.kill_replica(victim)
            load.wait_progress(30)
            cluster.start_replica(victim)
            wait_caught_up(cluster, victim)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load)


def test_all_replicas_killed_at_once_keep_every_acknowledged_write(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync").start()
    load = Load(cluster, clients=4).start()
    try:
        load.wait_progress(150)
    finally:
        for i in range(3):                      # a power cut, while clients are still writing
            cluster.kill_replica(i)
        load.finish()
    for i in range(3):
        cluster.start_replica(i)
    assert_nothing_lost(cluster, load)


def _last_segment(cluster, i):
    return sorted(Path(cluster.dir / f"replica-{i}").glob("wal-*.log"))[-1]


def test_a_torn_log_tail_is_reported_and_recovered_from_peers(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync").start()
    put_keys(cluster, 50, "k")
    victim = next(i for i in range(3) if i != cluster.leader())
    cluster.kill_replica(victim)
    seg = _last_segment(cluster, victim)
    size = seg.stat().st_size
    os.truncate(seg, size - 7)                  # the last record lost its end
    cluster.start_replica(victim)
    cluster.servers[victim].wait_for("write-ahead log damaged: torn_tail", 5)
    wait_caught_up(cluster, victim)
    wait_converged(cluster)
    s = scans(cluster)
    assert s[0] == s[1] == s[2] and b"k49 v49" in s[victim]


def test_a_log_corrupt_in_the_middle_is_refused(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync").start()
    put_keys(cluster, 50, "k")
    victim = next(i for i in range(3) if i != cluster.leader())
    cluster.kill_replica(victim)
    seg = _last_segment(cluster, victim)
    data = bytearray(seg.read_bytes())
    data[len(data) // 3] ^= 0xFF                # bit rot in a record that was acknowledged
    seg.write_bytes(bytes(data))
    for attempt in range(2):                    # and again: the refusal must not be one-off
        cluster.apps[victim].start().wait_for("listening")
        cluster.servers[victim].start()
        assert cluster.servers[victim].proc.wait(20) == 1
        line = cluster.servers[victim].wait_for("refusing to serve", 1)
        assert "corrupt in the middle" in line
        cluster.apps[victim].kill()
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        assert parse_get(c.request("GET k49")) == "v49"   # the other two still serve


def test_a_replica_with_a_wiped_disk_recovers_catches_up_and_serves(make_cluster):
    import shutil
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync").start()
    load = Load(cluster, clients=3).start()
    try:
        load.wait_progress(80)
        victim = cluster.leader()                     # the worst case: it held the most
        cluster.kill_replica(victim)
        shutil.rmtree(cluster.dir / f"replica-{victim}")
        load.wait_progress(40)
        cluster.start_replica(victim)
        cluster.servers[victim].wait_for("event=recovered", 20)
        wait_caught_up(cluster, victim)
        # Now the cluster needs the wiped replica: stop another one and keep going.
        other = next(i for i in range(3) if i != victim and i != cluster.leader())
        cluster.kill_replica(other)
        load.wait_progress(40)
        cluster.start_replica(other)
        wait_caught_up(cluster, other)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load)


def test_memory_stays_bounded_old_values_are_served_from_the_log_files(make_cluster):
    # A tiny in-memory budget: every replica evicts almost every executed value. A wiped replica
    # then catches up from what its peers read back from their (compressed) log files, and an
    # app restart is rebuilt from the files too.
    import shutil
    settings = {"log_memory_bytes": 8192, "log_segment_bytes": 16384}
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync",
                           settings=settings).start()
    load = Load(cluster, clients=3).start()
    try:
        load.wait_progress(400)
        victim = next(i for i in range(3) if i != cluster.leader())
        others = [i for i in range(3) if i != victim]
        assert all(cluster.status(i)["evicted"] > 0 for i in others)
        cluster.kill_replica(victim)
        shutil.rmtree(cluster.dir / f"replica-{victim}")
        load.wait_progress(50)
        cluster.start_replica(victim)
        cluster.servers[victim].wait_for("event=recovered", 20)
        wait_caught_up(cluster, victim)
        app_of = others[0] if others[0] != cluster.leader() else others[1]
        cluster.apps[app_of].kill()                  # its state is rebuilt from the log files
        cluster.start_app(app_of)
        cluster.servers[app_of].wait_for("event=app_restart_detected", 20)
        load.wait_progress(50)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load)


def test_a_recovery_cut_short_by_a_crash_is_resumed_after_the_restart(make_cluster):
    # A replica that lost its disk writes the decided values it catches up while it recovers;
    # if it crashes before recovery ends, those records must not pass for its votes on restart.
    import shutil
    cluster = make_cluster(replicas=3, gateways=1, framing="line", durability="fsync").start()
    load = Load(cluster, clients=3).start()
    try:
        load.wait_progress(80)
        victim = next(i for i in range(3) if i != cluster.leader())
        others = [i for i in range(3) if i != victim]
        cluster.kill_replica(victim)
        shutil.rmtree(cluster.dir / f"replica-{victim}")
        load.wait_progress(40)
        mark = cluster.dir / f"replica-{victim}" / "recovering"
        # Alone (the others stopped), it can only ask: it stays in recovery, marked on disk.
        for i in others:
            cluster.kill_replica(i)
        cluster.start_replica(victim)
        cluster.servers[victim].wait_for("event=recovering", 20)
        assert mark.exists()
        cluster.kill_replica(victim)                 # the crash in the middle of the recovery
        # ... after it had caught up (and written) a decided value, as a recovering replica does:
        wal = WriteAheadLog(str(cluster.dir / f"replica-{victim}"))
        wal.open()
        wal.append([DecideRecord(1, core.pack_batch((), timestamp=0)), CommitRecord(1)])
        wal.sync()
        wal.close()
        cluster.start_replica(victim)
        cluster.servers[victim].wait_for("event=recovering", 20)   # resumed, not a normal start
        for i in others:
            cluster.start_replica(i)
        cluster.servers[victim].wait_for("event=recovered", 30)
        wait_caught_up(cluster, victim)
        assert not mark.exists()
        load.wait_progress(40)
    finally:
        load.finish()
    assert_nothing_lost(cluster, load)
