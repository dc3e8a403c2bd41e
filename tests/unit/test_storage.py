# The write-ahead log on real files with real fsync: round trips, segment rolling, recovery from
# torn and corrupt bytes at every offset, the durability modes, the directory lock, and a real
# process killed with SIGKILL while it syncs. (Checkpoints, segment headers, truncation and
# compression: test_storage_segments.py.)
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from smrd import core
from smrd.replica.wal import records
from smrd.protocol.records import (AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord,
                                   DurableState, ViewRecord)
from smrd.replica.wal.log import (CORRUPT_MIDDLE, CORRUPT_TAIL, TORN_TAIL, StorageError, WriteAheadLog)
from smrd.replica.wal.records import decode_record, encode_record

REPO = Path(__file__).resolve().parents[2]
# Every segment starts with a header; a fresh log's first one is ViewRecord(0), CommitRecord(0).
FRESH_HEADER = [ViewRecord(0), CommitRecord(0)]
HEADER_BYTES = sum(len(encode_record(r)) for r in FRESH_HEADER)


def sample(n, seed=1, checkpoints=False):
    """n records of every kind, in an order where the fold depends on the order."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        k = i % (6 if checkpoints else 5)
        if k == 0:
            out.append(ViewRecord(rnd.randrange(1 << 40)))
        elif k in (1, 2):
            value = rnd.randbytes(rnd.randrange(90))
            out.append(AcceptRecord(rnd.randrange(8), rnd.randrange(50), value))
        elif k == 3:
            out.append(DecideRecord(rnd.randrange(8, 12), rnd.randbytes(rnd.randrange(40))))
        elif k == 4:
            out.append(CommitRecord(rnd.randrange(1 << 30)))
        else:
            out.append(CheckpointRecord(rnd.randrange(12), rnd.randbytes(32),
                                        rnd.randrange(1 << 40)))
    return out


def write(directory, records, groups=1, **kw):
    wal = WriteAheadLog(str(directory), **kw)
    wal.open()
    step = max(1, len(records) // groups)
    for i in range(0, len(records), step):
        wal.append(records[i:i + step])
        wal.sync()
    wal.close()
    return wal


def reopen(directory, **kw):
    wal = WriteAheadLog(str(directory), **kw)
    state, report = wal.open()
    return wal, state, report


def segments(directory):
    return sorted(p for p in Path(directory).iterdir() if p.name.endswith(".log"))


def frames(data):
    """The frames in a run of valid records."""
    out, off = [], 0
    while off < len(data):
        end = off + core.HEADER_SIZE + int.from_bytes(data[off + 24:off + 28], "little")
        out.append(data[off:end])
        off = end
    return out


# ------------------------------------------------------------------------------- round trips

def test_every_record_kind_round_trips_through_one_frame():
    for record in sample(30, checkpoints=True):
        frame = encode_record(record)
        assert decode_record(frame) == record
        kinds = (records.VIEW, records.ACCEPT, records.DECIDE, records.COMMIT, records.CHECKPOINT)
        assert core.decode_frame(frame)[0] in kinds
    with pytest.raises(TypeError):
        encode_record(("not", "a", "record"))


def test_append_sync_close_reopen_gives_the_same_fold(tmp_path):
    records = sample(60)
    wal = write(tmp_path / "wal", records, groups=6)
    # the first write into the first segment carries its header (two records)
    assert wal.records_written == 62 and wal.syncs == 6
    assert wal.bytes_written == HEADER_BYTES + sum(len(encode_record(r)) for r in records)
    wal, state, report = reopen(tmp_path / "wal")
    assert report.clean and report.records == 62 and state.records == 62
    assert report.bytes == HEADER_BYTES + sum(len(encode_record(r)) for r in records)
    assert state == DurableState.fold(records)
    wal.close()


def test_several_segments_are_replayed_in_order(tmp_path):
    # The same instance accepted again and again: only replay in order gives the last value.
    records = [AcceptRecord(1, v, b"value %d" % v) for v in range(200)] + sample(40)
    write(tmp_path / "wal", records, groups=60, segment_bytes=300)
    files = segments(tmp_path / "wal")
    assert len(files) > 10
    assert [f.name for f in files] == [f"wal-{i:016x}.log" for i in range(len(files))]
    wal, state, report = reopen(tmp_path / "wal", segment_bytes=300)
    assert report.clean and report.segments == [f.name for f in files]
    assert state == DurableState.fold(records)
    # appending after a reopen continues the sequence
    wal.append([CommitRecord(7)] * 20)
    wal.sync()
    wal.close()
    wal, state, report = reopen(tmp_path / "wal", segment_bytes=300)
    assert report.clean and state == DurableState.fold(records + [CommitRecord(7)])
    wal.close()


def test_a_bad_record_buffers_nothing(tmp_path):
    wal = WriteAheadLog(str(tmp_path))
    wal.open()
    with pytest.raises(TypeError):
        wal.append([ViewRecord(1), "junk"])
    with pytest.raises((ValueError, OverflowError)):
        wal.append([ViewRecord(-1)])
    wal.append([ViewRecord(2)])
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.records == 1 + len(FRESH_HEADER) and state.view == 2
    wal.close()


def test_a_log_that_was_never_written_stays_empty(tmp_path):
    # DurableState.records == 0 tells the replica "empty disk": headers never change that.
    for _ in range(3):
        wal, state, report = reopen(tmp_path)
        assert state.records == 0 and report.records == 0 and report.clean
        wal.sync()
        wal.close()
    assert [f.stat().st_size for f in segments(tmp_path)] == [0]


# ---------------------------------------------------------------------------------- recovery

def test_torn_tail_at_every_offset_of_the_last_record(tmp_path, caplog):
    records = sample(5)
    template = tmp_path / "template"
    write(template, records)
    (seg,) = segments(template)
    total = seg.stat().st_size
    last = len(encode_record(records[-1]))
    start = total - last
    caplog.set_level(logging.WARNING, logger="smrd.replica.wal.log")
    for cut in range(1, last):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(template, d)
        os.truncate(d / seg.name, start + cut)
        wal, state, report = reopen(d)
        assert state == DurableState.fold(records[:-1]), cut
        dmg = report.damage
        assert (dmg.kind, dmg.segment, dmg.offset) == (TORN_TAIL, seg.name, start), dmg
        assert dmg.discarded == cut, dmg
        assert "partial" in dmg.reason
        assert (d / seg.name).stat().st_size == start  # the file itself was cut
        wal.append([CommitRecord(99)])
        wal.sync()
        wal.close()
        wal, state, report = reopen(d)
        assert report.clean, report.damage
        assert state == DurableState.fold(records[:-1] + [CommitRecord(99)])
        wal.close()
        shutil.rmtree(d)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and TORN_TAIL in r.getMessage()]
    assert len(warnings) == last - 1


def test_flipped_byte_in_the_last_record_is_a_corrupt_tail(tmp_path, caplog):
    records = sample(6)
    write(tmp_path, records)
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    last = len(encode_record(records[-1]))
    start = len(data) - last
    data[start + last // 2] ^= 0x40
    seg.write_bytes(data)
    wal, state, report = reopen(tmp_path)
    assert report.damage.kind == CORRUPT_TAIL
    assert "checksum" in report.damage.reason
    assert (report.damage.offset, report.damage.discarded) == (start, last)
    assert state == DurableState.fold(records[:-1])
    assert any(CORRUPT_TAIL in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    wal.close()


def test_flipped_byte_before_valid_records_is_corrupt_middle(tmp_path, caplog):
    records = sample(10)
    write(tmp_path, records)
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    start = HEADER_BYTES + sum(len(encode_record(r)) for r in records[:3])
    data[start + 20] ^= 0x01  # inside record 3's header (its instance field)
    seg.write_bytes(data)
    wal, state, report = reopen(tmp_path)
    dmg = report.damage
    assert dmg.kind == CORRUPT_MIDDLE and "checksum" in dmg.reason
    assert (dmg.offset, dmg.discarded) == (start, len(data) - start)
    assert state == DurableState.fold(records[:3])
    assert seg.stat().st_size == start
    (kept,) = dmg.preserved  # the dropped bytes are kept beside the log, never replayed
    assert (tmp_path / kept).read_bytes() == bytes(data[start:])
    assert any(r.levelno == logging.ERROR and CORRUPT_MIDDLE in r.getMessage()
               for r in caplog.records)
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(records[:3])
    wal.close()


def test_corruption_in_a_non_last_segment_is_corrupt_middle(tmp_path):
    records = [AcceptRecord(i, 1, b"x" * 50) for i in range(40)]
    write(tmp_path, records, groups=40, segment_bytes=250)
    files = segments(tmp_path)
    assert len(files) >= 4
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0xFF  # the last record of segment 1: a "tail" of that file, but not of the log
    files[1].write_bytes(data)
    later = sum(f.stat().st_size for f in files[2:])
    wal, state, report = reopen(tmp_path, segment_bytes=250)
    dmg = report.damage
    assert dmg.kind == CORRUPT_MIDDLE and dmg.segment == files[1].name
    assert dmg.discarded == len(encode_record(records[0])) + later
    assert report.segments == [files[0].name, files[1].name]
    assert [f.name for f in segments(tmp_path)] == [files[0].name, files[1].name]
    assert {p.name for p in tmp_path.iterdir() if ".corrupt" in p.name} == set(dmg.preserved)
    assert len(dmg.preserved) == 1 + len(files) - 2
    kept = [decode_record(f) for f in frames(files[0].read_bytes() + files[1].read_bytes())]
    accepts = [r.instance for r in kept if isinstance(r, AcceptRecord)]
    assert sorted(state.entries) == accepts == list(range(len(accepts)))
    assert len(accepts) >= 2
    wal.append([CommitRecord(3)])
    wal.sync()
    wal.close()
    wal, state, report = reopen(tmp_path, segment_bytes=250)
    assert report.clean and state.commit == 3
    wal.close()


def test_a_missing_segment_is_corrupt_middle(tmp_path):
    records = [AcceptRecord(i, 1, b"y" * 50) for i in range(30)]
    write(tmp_path, records, groups=30, segment_bytes=250)
    files = segments(tmp_path)
    files[2].unlink()
    wal, state, report = reopen(tmp_path, segment_bytes=250)
    assert report.damage.kind == CORRUPT_MIDDLE and "missing" in report.damage.reason
    assert report.segments == [files[0].name, files[1].name]
    wal.close()


def test_garbage_segment_is_reported_not_a_crash(tmp_path):
    rnd = random.Random(7)
    for trial in range(20):
        d = tmp_path / str(trial)
        d.mkdir()
        (d / "wal-0000000000000000.log").write_bytes(rnd.randbytes(rnd.randrange(1, 5000)))
        wal, state, report = reopen(d)
        assert report.damage is not None and report.damage.offset == 0
        assert state == DurableState()
        wal.close()
    # garbage after valid records: the valid prefix survives
    d = tmp_path / "mixed"
    records = sample(8)
    write(d, records)
    (seg,) = segments(d)
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"SM\x01" + rnd.randbytes(300))
    wal, state, report = reopen(d)
    assert report.damage.offset == good and report.damage.discarded == 303
    assert state == DurableState.fold(records)
    wal.close()


def test_unknown_record_type_is_treated_as_corruption(tmp_path):
    write(tmp_path, [ViewRecord(3)])
    (seg,) = segments(tmp_path)
    with open(seg, "ab") as f:
        f.write(core.encode_frame(105, 0, 1, 2, b"from the future"))
    wal, state, report = reopen(tmp_path)
    assert report.damage.kind == CORRUPT_TAIL and "unknown record type 105" in report.damage.reason
    assert state.view == 3
    wal.close()


def test_zero_filled_tail_is_a_torn_tail(tmp_path):
    # What a crash can leave on some file systems: the size grew, the data never arrived.
    write(tmp_path, [ViewRecord(3)])
    (seg,) = segments(tmp_path)
    with open(seg, "ab") as f:
        f.write(bytes(4096))
    wal, state, report = reopen(tmp_path)
    assert report.damage.kind == TORN_TAIL and report.damage.discarded == 4096
    wal.close()


# --------------------------------------------------------------------------- durability modes

@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call, as the path of the file descriptor it was given."""
    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_memory_mode_writes_no_files(tmp_path, fsyncs):
    d = tmp_path / "wal"
    wal = WriteAheadLog(str(d), durability="memory")
    state, report = wal.open()
    assert state == DurableState() and report.clean
    wal.append(sample(20))
    wal.sync()
    wal.close()
    assert not d.exists() and fsyncs == []


def test_nosync_writes_files_but_never_fsyncs(tmp_path, fsyncs):
    records = sample(50)
    write(tmp_path, records, groups=10, durability="nosync", segment_bytes=400)
    assert len(segments(tmp_path)) > 1
    wal, state, report = reopen(tmp_path, durability="nosync")
    assert state == DurableState.fold(records)
    wal.close()
    assert fsyncs == []


def test_fsync_mode_group_commit_is_one_fsync_of_the_segment(tmp_path, fsyncs):
    wal = WriteAheadLog(str(tmp_path))
    wal.open()
    fsyncs.clear()  # open() fsyncs the new segment's directory; count from here
    for i in range(50):
        wal.append([AcceptRecord(i, 1, b"v" * 64)])
    assert fsyncs == []  # append never fsyncs
    wal.sync()
    (seg,) = segments(tmp_path)
    assert fsyncs == [str(seg)]
    assert (wal.syncs, wal.records_written) == (1, 50 + len(FRESH_HEADER))
    wal.sync()  # nothing new: nothing to do
    assert len(fsyncs) == 1
    wal.close()


def test_fsync_mode_fsyncs_the_directory_when_a_segment_is_created(tmp_path, fsyncs):
    wal = WriteAheadLog(str(tmp_path), segment_bytes=100)
    wal.open()
    assert str(tmp_path) in fsyncs
    fsyncs.clear()
    wal.append([AcceptRecord(0, 1, b"v" * 100)])
    wal.sync()
    wal.append([AcceptRecord(1, 1, b"v" * 100)])
    wal.sync()  # rolls: directory first, then the new segment
    assert fsyncs[1:] == [str(tmp_path), str(segments(tmp_path)[1])]
    wal.close()


def test_a_failed_fsync_stops_the_log(tmp_path, monkeypatch):
    wal = WriteAheadLog(str(tmp_path))
    wal.open()
    wal.append([ViewRecord(1)])

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StorageError, match="fsync failed"):
        wal.sync()
    monkeypatch.undo()
    with pytest.raises(StorageError, match="fsync failed"):
        wal.append([ViewRecord(2)])  # never again, even once fsync works
    with pytest.raises(StorageError):
        wal.sync()
    wal.close()  # releases without raising
    wal.close()


def test_closed_log_refuses_use(tmp_path):
    wal = WriteAheadLog(str(tmp_path))
    wal.open()
    wal.close()
    with pytest.raises(StorageError, match="closed"):
        wal.append([ViewRecord(1)])
    with pytest.raises(ValueError):
        WriteAheadLog(str(tmp_path), durability="sometimes")


def test_append_and_sync_from_two_threads(tmp_path):
    wal = WriteAheadLog(str(tmp_path), segment_bytes=20_000)
    wal.open()
    done = threading.Event()
    errors = []

    def syncer():
        try:
            while not done.is_set():
                wal.sync()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=syncer)
    t.start()
    records = [AcceptRecord(i, 1, b"%d" % i) for i in range(5000)]
    for i in range(0, 5000, 3):
        wal.append(records[i:i + 3])
    done.set()
    t.join()
    wal.close()
    assert not errors
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(records)
    wal.close()


# ---------------------------------------------------------------------------------------- lock

def test_a_second_log_on_the_same_directory_is_refused(tmp_path):
    first = WriteAheadLog(str(tmp_path))
    first.open()
    second = WriteAheadLog(str(tmp_path))
    with pytest.raises(StorageError, match=f"in use.*pid {os.getpid()}"):
        second.open()
    first.close()
    third = WriteAheadLog(str(tmp_path))
    third.open()
    third.close()


# -------------------------------------------------------------------------------------- crash

CHILD = r"""
import sys
from smrd.replica.wal.log import WriteAheadLog
from smrd.protocol.records import AcceptRecord

def value(i):
    return b"value-%d;" % i * (1 + i % 5)

wal = WriteAheadLog(sys.argv[1], "fsync", segment_bytes=8192)
state, report = wal.open()
n = max(state.entries) + 1 if state.entries else 0
print("ready", n, flush=True)
while True:
    g = 1 + n % 7
    wal.append([AcceptRecord(i, 1, value(i)) for i in range(n, n + g)])
    wal.sync()
    n += g
    print(n, flush=True)
"""


def test_records_reported_synced_survive_sigkill(tmp_path):
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    synced = 0
    for round_ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            if not line.startswith("ready"):
                child.kill()
                pytest.fail(f"child did not start: {line!r} {child.stderr.read()}")
            assert int(line.split()[1]) >= synced, f"seed {seed}: lost synced records"
            for _ in range(rnd.randrange(1, 300)):
                line = child.stdout.readline()
                assert line, f"seed {seed}: child died: {child.stderr.read()}"
                synced = int(line)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        wal, state, report = reopen(tmp_path, segment_bytes=8192)
        assert report.damage is None or report.damage.kind == TORN_TAIL, (seed, report.damage)
        for i in range(synced):
            assert state.entries.get(i) == [1, b"value-%d;" % i * (1 + i % 5), False], (seed, i)
        wal.close()
