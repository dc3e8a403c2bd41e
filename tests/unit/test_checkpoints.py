# Checkpoints below the daemon: the session table image (deterministic, complete), checkpoint
# files (verified on read, on import, while streaming), the state-transfer messages, and the
# protocol core's side (when checkpoints are due, what the log keeps, LogTruncated -> transfer ->
# install). The real-process tests are in tests/e2e/test_checkpoints.py; the seeded swarm runs
# checkpoints and transfers under faults (tests/sim).
import hashlib
import os

import pytest
import zstandard

from smrd import core
from smrd.replica.checkpoints import CheckpointError, CheckpointStore, decode_content, encode_content
from smrd.errors import ProtocolError
from smrd.protocol import messages as m
from smrd.protocol.options import Options
from smrd.protocol.replica import Replica
from smrd.protocol.sessions import DUPLICATE, EXECUTE, Sessions, plan_batch, run_plan


def _batch(requests, ts=1):
    return core.pack_batch(requests, timestamp=ts)


# ------------------------------------------------------------------------- session table image

def test_a_captured_table_restores_to_the_same_decisions():
    s = Sessions(3, 10_000)
    plan = plan_batch(s, _batch([(1, 1, b"a"), (2, 1, b"b"), (1, 2, b"c")], ts=7))
    image = s.capture()
    assert set(image.missing) == {(1, 1), (2, 1), (1, 2)}   # planned, not yet executed
    with pytest.raises(ValueError):
        image.encode()                                      # an incomplete image is refused
    for cid, seq, status, reply in run_plan(s, plan, lambda p: p.upper()):
        image.fill(cid, seq, reply)
    blob = image.encode()
    r = Sessions.restore(3, 10_000, blob)
    assert r.clock_ms == 7
    assert r.classify(1, 2) == DUPLICATE and r.reply(1, 2) == b"C"
    assert r.classify(1, 3) == EXECUTE
    assert r.capture().encode() == blob                     # deterministic bytes


def test_images_of_equal_tables_are_byte_identical_whatever_the_insertion_order():
    a, b = Sessions(4, 10_000), Sessions(4, 10_000)
    for cid in (5, 1, 9):
        run_plan(a, plan_batch(a, _batch([(cid, 1, b"x")])), lambda p: b"ok")
    for cid in (9, 5, 1):
        run_plan(b, plan_batch(b, _batch([(cid, 1, b"x")])), lambda p: b"ok")
    assert a.capture().encode() == b.capture().encode()


@pytest.mark.parametrize("cut", [0, 5, 19, 23])
def test_a_damaged_table_image_is_refused(cut):
    s = Sessions(2, 10_000)
    run_plan(s, plan_batch(s, _batch([(1, 1, b"x")])), lambda p: b"reply")
    blob = s.capture().encode()
    with pytest.raises(ValueError):
        Sessions.restore(2, 10_000, blob[:cut])
    with pytest.raises(ValueError):
        Sessions.restore(2, 10_000, blob + b"\0")


# ------------------------------------------------------------------------- checkpoint files

def test_store_write_read_and_info(tmp_path):
    store = CheckpointStore(tmp_path)
    size, digest = store.write(10, b"sessions", b"state" * 1000)
    assert digest == hashlib.sha256(encode_content(10, b"sessions", b"state" * 1000)).digest()
    assert store.read(10, digest) == (b"sessions", b"state" * 1000)
    assert store.info() == [(10, size, digest)]
    assert size < 5000                                     # compressed
    assert CheckpointStore(tmp_path).info() == [(10, size, digest)]   # found again after a restart


def test_a_damaged_or_mismatching_checkpoint_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    _, digest = store.write(10, b"s", b"state")
    with pytest.raises(CheckpointError, match="does not match"):
        store.read(10, b"\0" * 32)
    path = store.path(10)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError):
        store.read(10, digest)
    assert CheckpointStore(tmp_path).info() == []          # never offered to a peer
    os.unlink(path)
    with pytest.raises(CheckpointError, match="missing"):
        store.read(10, digest)


def test_import_verifies_a_transferred_file_by_hash(tmp_path):
    src = CheckpointStore(tmp_path / "a")
    size, digest = src.write(42, b"sessions", os.urandom(300_000))
    dst = CheckpointStore(tmp_path / "b")
    with open(dst.part_path(42), "wb") as f:              # arrives in chunks, any order
        for offset in reversed(range(0, size, 65536)):
            total, chunk = src.read_chunk(42, offset, 65536)
            assert total == size
            f.seek(offset)
            f.write(chunk)
    assert dst.import_part(42, digest) == size
    assert dst.read(42, digest)[0] == b"sessions"
    # A file whose content is not what the peers vouched for is removed, not stored.
    other = CheckpointStore(tmp_path / "c")
    with open(other.part_path(42), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(encode_content(42, b"x", b"y")))
    with pytest.raises(CheckpointError, match="peers reported"):
        other.import_part(42, digest)
    assert not os.path.exists(other.part_path(42)) and other.instances() == []


def test_leftover_part_files_are_removed_and_old_checkpoints_deleted(tmp_path):
    store = CheckpointStore(tmp_path)
    for i in (5, 10, 15):
        store.write(i, b"s", b"state")
    open(store.part_path(20), "wb").write(b"half a transfer")
    store = CheckpointStore(tmp_path)
    assert not os.path.exists(store.part_path(20))
    assert store.delete_below(10) == 1 and store.instances() == [10, 15]
    assert store.read_chunk(5, 0, 10) == (0, b"")


def test_content_header_is_checked():
    content = encode_content(3, b"ab", b"cd")
    assert decode_content(content, 3) == (b"ab", b"cd")
    with pytest.raises(CheckpointError, match="instance"):
        decode_content(content, 4)
    with pytest.raises(CheckpointError):
        decode_content(content[:-1], 3)


# ------------------------------------------------------------------------- messages

@pytest.mark.parametrize("msg", [
    m.LogTruncated(3, 100), m.StateQuery(7), m.StateInfo(7, ((5, 100, b"x" * 32), (9, 3, b"y" * 32))),
    m.StateInfo(1, ()), m.StateChunkRequest(5, 1 << 40, 4096), m.StateChunk(5, 10, 20, b"abc"),
    m.StateChunk(5, 0, 0, b""),
])
def test_state_messages_round_trip(msg):
    assert m.decode(m.encode(2, msg)) == (2, msg)


def test_malformed_state_messages_are_refused():
    with pytest.raises(ProtocolError):
        m.decode(core.encode_frame(m.STATE_INFO, 1, 0, 1, b"x" * 47))
    with pytest.raises(ProtocolError):
        m.decode(core.encode_frame(m.STATE_CHUNK, 1, 18, 1, (20).to_bytes(8, "little") + b"abc"))
    with pytest.raises(ProtocolError):
        m.decode(core.encode_frame(m.STATE_CHUNK_REQUEST, 1, 0, 1, b"xx"))


# ------------------------------------------------------------------------- the protocol core

def _leader_with_decided(n_requests, every):
    """The leader of a 3-replica cluster with checkpoint_every=every, fed n requests one at a
    time, each accepted by replica 1 (so decided)."""
    rep = Replica(0, n=3, options=Options(checkpoint_every=every, batch_max_requests=4))
    marks = []
    for seq in range(1, n_requests + 1):
        rep.step("gw", m.Requests(_batch([(1, seq, b"PUT k v")])))
        rep.step(1, m.Accepted(0, seq, 1))
        rd = rep.ready()
        images = dict(rd.checkpoints)
        for instance, _, plan in rd.apply:       # executed as the driver would
            for c, q, _, reply in run_plan(rep.sessions, plan, lambda p: b"OK"):
                for image in images.values():
                    image.fill(c, q, reply)
        marks.extend(images.items())
    return rep, marks


def test_checkpoints_are_due_every_n_requests_and_truncate_the_log_one_behind():
    rep, marks = _leader_with_decided(20, every=5)
    assert [i for i, _ in marks] == [5, 10, 15, 20]        # one request per instance here
    assert rep.checkpoint_stored(5) == 0 and rep.low == 0   # nothing before the first to drop
    assert rep.checkpoint_stored(10) == 5 and 5 not in rep.log and 6 in rep.log
    assert rep.checkpoint_stored(15) == 10 and min(rep.log) == 11
    assert rep.describe()["checkpoint"] == 15
    assert rep.checkpoint_stored(12) == 10                   # out of order: ignored


def test_a_catchup_below_the_log_answers_log_truncated_and_starts_a_transfer():
    leader, marks = _leader_with_decided(20, every=5)
    leader.checkpoint_stored(10)
    leader.checkpoint_stored(15)                             # log now starts at 11
    leader.step(1, m.CatchupRequest(0, 3))
    out = leader.ready().messages
    assert out == [(1, m.LogTruncated(leader.view, 10))]

    follower = Replica(1, n=3)
    follower.step(0, m.LogTruncated(0, 10))
    rd = follower.ready()
    assert rd.transfer == (0, 10)
    follower.step(0, m.CatchupReply(0, 20, ()))
    follower.tick()
    assert not any(type(x) is m.CatchupRequest for _, x in follower.ready().messages)  # waits
    image = dict(marks)[15]
    sessions = Sessions.restore(1024, 3_600_000, image.encode())
    assert follower.install_checkpoint(15, sessions)
    assert (follower.commit, follower.applied, follower.low) == (15, 15, 15)
    assert follower.sessions is sessions and follower.transfer_from is None
    asks = [x for _, x in follower.ready().messages if type(x) is m.CatchupRequest]
    assert asks and asks[0].start == 16                     # the log after the checkpoint
    assert not follower.install_checkpoint(12, sessions)    # older than what it holds: no-op


def test_install_drops_pending_requests_the_checkpoint_already_executed():
    leader, marks = _leader_with_decided(10, every=5)
    follower = Replica(1, n=3)
    follower.step("gw", m.Requests(_batch([(1, 3, b"PUT k v"), (1, 11, b"PUT k w")])))
    assert len(follower.pending) == 2
    follower.step(0, m.LogTruncated(0, 10))
    sessions = Sessions.restore(1024, 3_600_000, dict(marks)[10].encode())
    follower.install_checkpoint(10, sessions)
    assert list(follower.pending) == [(1, 11)]


# ------------------------------------------------------------------------- bounded memory

def test_evicted_values_are_served_by_the_driver_from_its_log_files():
    leader, _ = _leader_with_decided(20, every=0)
    assert leader.evict(12) == 12 and 12 not in leader.log and 13 in leader.log
    assert leader.evict(500) == 20                  # never beyond the applied point
    leader.evict(15)                                # never backwards
    assert leader.evicted == 20
    leader.step(1, m.CatchupRequest(0, 5))
    rd = leader.ready()
    assert rd.serve_log == [(1, 5)] and not rd.messages


def test_the_log_files_give_back_the_last_value_of_each_decided_instance(tmp_path):
    from smrd.protocol.records import AcceptRecord, CommitRecord
    from smrd.replica.wal.log import WriteAheadLog

    def value(i, v=0):
        return core.pack_batch([(1, i, b"v%d-%d" % (i, v) * 30)])

    wal = WriteAheadLog(str(tmp_path), "fsync", segment_bytes=4096)
    wal.open()
    for i in range(1, 120):
        wal.append([AcceptRecord(i, 0, value(i))])
        if i % 7 == 0:
            wal.append([AcceptRecord(i - 1, 1, value(i - 1, 1))])  # re-accepted in a later view
        wal.append([CommitRecord(i - 1)])
        wal.sync()
    wal.compress_closed()                               # read back from .zst segments too
    got = wal.read_decided(1, 118, 40, 1 << 20)
    assert [i for i, _ in got] == list(range(1, 41))
    assert dict(got)[6] == value(6, 1) and dict(got)[7] == value(7)
    assert [i for i, _ in wal.read_decided(100, 110, 100, 1 << 20)] == list(range(100, 111))
    assert len(wal.read_decided(1, 118, 100, 100)) == 1  # at least one entry, then the byte bound
    assert 2 <= len(wal.read_decided(1, 118, 100, 500)) <= 500 // len(value(1))  # about max_bytes
    wal.close()
