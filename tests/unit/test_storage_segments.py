# Checkpoints, segment headers, log truncation and zstd compression of closed segments, on real
# files with real fsync: the CheckpointRecord and its fold, the header every segment starts
# with, truncate_before() and the missing-prefix rule, compress_closed() and the states a crash
# can leave it in, damage to compressed segments, and a seeded property test that mixes them all
# and compares every reopen with the fold of everything appended.
import hashlib
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import zstandard

from smrd import core
from smrd.replica.wal import records
from smrd.errors import ProtocolError
from smrd.protocol.records import (AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord,
                                   DurableState, ViewRecord)
from smrd.replica.wal.log import (CORRUPT_MIDDLE, TORN_TAIL, StorageError, WriteAheadLog)
from smrd.replica.wal.records import decode_record, encode_record, segment_name


def checkpoint(instance, tag=b""):
    data = b"checkpoint %d %s" % (instance, tag)
    return CheckpointRecord(instance, hashlib.sha256(data).digest(), len(data))


def reopen(directory, **kw):
    wal = WriteAheadLog(str(directory), **kw)
    state, report = wal.open()
    return wal, state, report


def files(directory):
    """Segment files on disk (.log and .log.zst), in sequence order."""
    return sorted((p for p in Path(directory).iterdir() if records._SEGMENT.match(p.name)),
                  key=lambda p: p.name)


def names(directory):
    return [p.name for p in files(directory)]


def content(path):
    raw = Path(path).read_bytes()
    return zstandard.ZstdDecompressor().decompress(raw) if str(path).endswith(".zst") else raw


def records_in(path):
    data, out, off = content(path), [], 0
    while off < len(data):
        record, end = records._parse(data, off)
        assert record is not None, (path, off, end)
        out.append(record)
        off = end
    return out


def header_of(records_before):
    """The header a segment written after `records_before` must start with."""
    s = DurableState.fold(records_before)
    head = [] if s.checkpoint is None else [s.checkpoint]
    return head + [ViewRecord(s.view), CommitRecord(s.commit)]


def write_groups(directory, groups, **kw):
    wal = WriteAheadLog(str(directory), **kw)
    wal.open()
    for group in groups:
        wal.append(group)
        wal.sync()
    return wal


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


# A log with one group per segment (segment_bytes=1 rolls before every write), whose segments'
# highest Accept/Decide instances are 2, 3, 5, 2, none, 7.
GROUPS = [
    [ViewRecord(1), AcceptRecord(1, 1, b"a1"), AcceptRecord(2, 1, b"a2")],
    [AcceptRecord(3, 1, b"a3"), CommitRecord(2)],
    [AcceptRecord(5, 1, b"a5"), DecideRecord(4, b"d4")],
    [ViewRecord(2), AcceptRecord(2, 2, b"a2 again")],
    [CommitRecord(5), checkpoint(5)],
    [AcceptRecord(6, 2, b"a6"), AcceptRecord(7, 2, b"a7")],
]
ALL = [r for g in GROUPS for r in g]


# ---------------------------------------------------------------------- the record and its fold

def test_checkpoint_record_round_trips_and_is_validated():
    record = checkpoint(12345)
    frame = encode_record(record)
    assert core.decode_frame(frame)[0] == records.CHECKPOINT == 104
    assert decode_record(frame) == record and len(frame) == core.HEADER_SIZE + 40
    big = CheckpointRecord((1 << 64) - 1, bytes(range(32)), (1 << 64) - 1)
    assert decode_record(encode_record(big)) == big
    with pytest.raises(ValueError):
        encode_record(CheckpointRecord(1, b"short", 1))
    with pytest.raises(ValueError):
        encode_record(CheckpointRecord(1, "x" * 32, 1))
    with pytest.raises(OverflowError):
        encode_record(CheckpointRecord(1, bytes(32), -1))
    with pytest.raises(OverflowError):
        encode_record(CheckpointRecord(1, bytes(32), 1 << 64))
    for payload in (b"", bytes(39), bytes(41), bytes(32)):
        with pytest.raises(ProtocolError, match="malformed record of type 104"):
            decode_record(core.encode_frame(104, 0, 0, 7, payload))
    with pytest.raises(ProtocolError, match="malformed record of type 104"):
        decode_record(core.encode_frame(104, 0, 1, 7, bytes(40)))  # a view where none belongs
    with pytest.raises(ProtocolError, match="flags"):
        decode_record(core.encode_frame(104, 0, 0, 7, bytes(40), flags=1))
    with pytest.raises(Exception):
        record.instance = 3  # frozen, like the others
    assert not hasattr(record, "__dict__")  # slots, like the others


def test_checkpoint_fold_semantics():
    s = DurableState.fold([
        ViewRecord(2), AcceptRecord(1, 1, b"a"), DecideRecord(2, b"b"), AcceptRecord(5, 2, b"c"),
        CommitRecord(2), checkpoint(3),
    ])
    assert s.checkpoint == checkpoint(3) and s.commit == 3 and s.view == 2
    assert s.entries == {5: [2, b"c", False]}  # <= 3 dropped, above kept
    assert s.records == 6
    # later values at or below the checkpoint are ignored, above it they count
    s.add(AcceptRecord(3, 9, b"late"))
    s.add(DecideRecord(1, b"late"))
    s.add(AcceptRecord(4, 9, b"d"))
    assert s.entries == {4: [9, b"d", False], 5: [2, b"c", False]} and s.records == 9
    # a lower checkpoint changes nothing; an equal one replaces (it names the newer file)
    s.add(checkpoint(1))
    assert s.checkpoint == checkpoint(3)
    s.add(checkpoint(3, b"again"))
    assert s.checkpoint == checkpoint(3, b"again")
    # a higher one drops more and raises the commit point, but never lowers it
    s.add(CommitRecord(10))
    s.add(checkpoint(4))
    assert s.entries == {5: [2, b"c", False]} and s.commit == 10
    # equality: checkpoint counts, the number of records does not
    t = DurableState(view=2, entries={5: [2, b"c", False]}, commit=10, checkpoint=checkpoint(4))
    assert s == t and s.records != t.records
    assert s != DurableState(view=2, entries={5: [2, b"c", False]}, commit=10)


def test_a_checkpoint_round_trips_through_the_log(tmp_path):
    records = [ViewRecord(4), AcceptRecord(1, 4, b"x"), checkpoint(1), AcceptRecord(2, 4, b"y")]
    wal = write_groups(tmp_path, [records])
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(records)
    assert state.checkpoint == checkpoint(1) and state.entries == {2: [4, b"y", False]}
    wal.close()


# -------------------------------------------------------------------------------------- headers

def test_every_segment_starts_with_the_summary_of_everything_before_it(tmp_path):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    wal.close()
    segs = files(tmp_path)
    assert names(tmp_path) == [segment_name(i) for i in range(len(GROUPS))]
    before = []
    for path, group in zip(segs, GROUPS):
        got = records_in(path)
        head = header_of(before)
        assert got == head + group, path.name
        # each segment on its own folds to the log's view, commit point and checkpoint
        alone, upto = DurableState.fold(got), DurableState.fold(before + group)
        assert (alone.view, alone.commit, alone.checkpoint) == (
            upto.view, upto.commit, upto.checkpoint)
        before += group
    # the checkpoint leads the header (so a header cut short is recognisable)
    assert records_in(segs[5])[:3] == [checkpoint(5), ViewRecord(2), CommitRecord(5)]
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    assert report.clean and state == DurableState.fold(ALL)
    wal.close()


def test_a_header_goes_out_with_the_group_that_rolled_and_only_then(tmp_path, fsyncs):
    wal = WriteAheadLog(str(tmp_path), segment_bytes=100)
    wal.open()
    wal.append([AcceptRecord(1, 1, b"v" * 100)])
    wal.sync()
    assert len(files(tmp_path)) == 1
    wal.append([CommitRecord(1)])
    fsyncs.clear()
    wal.sync()  # rolls: the new segment's name, then one write (header + group), one fsync
    seg1 = files(tmp_path)[1]
    assert fsyncs == [str(tmp_path), str(seg1)]
    assert records_in(seg1) == [ViewRecord(0), CommitRecord(0), CommitRecord(1)]
    wal.close()


def test_a_header_cut_short_is_never_appended_to(tmp_path):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    wal.close()
    last = files(tmp_path)[-1]
    assert records_in(last)[0] == checkpoint(5)
    os.truncate(last, len(encode_record(checkpoint(5))))  # a crash left the header's first record
    wal, state, report = reopen(tmp_path, segment_bytes=1 << 20)
    assert report.clean  # a cut on a record boundary looks like a group that never came
    survived = ALL[:-len(GROUPS[5])]
    assert state == DurableState.fold(survived)
    wal.append([AcceptRecord(9, 3, b"z")])
    wal.sync()
    # not appended after the broken header: a new segment, with a complete one
    assert names(tmp_path) == [segment_name(i) for i in range(7)]
    assert records_in(files(tmp_path)[6]) == [checkpoint(5), ViewRecord(2), CommitRecord(5),
                                              AcceptRecord(9, 3, b"z")]
    # and truncation deletes the broken one too, leaving a self-sufficient log
    sizes = sum(p.stat().st_size for p in files(tmp_path)[:6])
    assert wal.truncate_before(5) == (6, sizes)
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(survived + [AcceptRecord(9, 3, b"z")])
    wal.close()


def test_a_log_written_before_headers_existed_is_read_and_truncated_safely(tmp_path):
    # Two segments without headers, as the previous version wrote them.
    tmp_path.mkdir(exist_ok=True)
    old = [[ViewRecord(1), AcceptRecord(1, 1, b"a")], [AcceptRecord(2, 1, b"b"), CommitRecord(2)]]
    for i, group in enumerate(old):
        (tmp_path / segment_name(i)).write_bytes(b"".join(encode_record(r) for r in group))
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(old[0] + old[1])
    wal.append([checkpoint(2)])
    wal.sync()
    assert len(files(tmp_path)) == 3  # never appended to a segment without a header
    assert wal.truncate_before(2)[0] == 2
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(old[0] + old[1] + [checkpoint(2)])
    wal.close()


# ------------------------------------------------------------------------------------ truncation

def test_truncate_before_needs_a_synced_checkpoint(tmp_path):
    wal = write_groups(tmp_path, GROUPS[:4], segment_bytes=1)
    with pytest.raises(ValueError, match="synced checkpoint"):
        wal.truncate_before(1)
    wal.append([checkpoint(3)])  # appended, not synced
    with pytest.raises(ValueError, match="synced checkpoint"):
        wal.truncate_before(1)
    wal.sync()
    wal.append([AcceptRecord(9, 9, b"synced by truncate_before")])
    with pytest.raises(ValueError, match="synced checkpoint"):
        wal.truncate_before(4)
    assert len(files(tmp_path)) == 5  # nothing happened
    freed = sum(p.stat().st_size for p in files(tmp_path)[:2])
    assert wal.truncate_before(3) == (2, freed)
    assert records_in(files(tmp_path)[-1])[-1] == AcceptRecord(9, 9, b"synced by truncate_before")
    wal.close()


def test_truncate_before_deletes_exactly_the_covered_prefix(tmp_path, fsyncs):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    sizes = [p.stat().st_size for p in files(tmp_path)]
    fsyncs.clear()
    # tops are 2, 3, 5, 2, -, 7 (active): up to 4 deletes 0 and 1, and stops at 5
    assert wal.truncate_before(4) == (2, sizes[0] + sizes[1])
    # no roll (the active segment holds 7); the directory after each deletion
    assert fsyncs == [str(tmp_path)] * 2
    assert names(tmp_path) == [segment_name(i) for i in range(2, 6)]
    assert wal.stats()["first_segment"] == 2 and wal.segments_deleted == 2
    assert wal.truncate_before(4) == (0, 0)
    # up to 5: segments 2, 3 and 4; never the active one, whose top is above
    assert wal.truncate_before(5) == (3, sum(sizes[2:5]))
    assert names(tmp_path) == [segment_name(5)]
    wal.close()
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    assert report.clean and report.segments == [segment_name(5)]
    assert state == DurableState.fold(ALL)
    assert (state.view, state.commit, state.checkpoint) == (2, 5, checkpoint(5))
    assert state.entries == {6: [2, b"a6", False], 7: [2, b"a7", False]}
    # a later checkpoint covers the rest
    wal.append([checkpoint(7)])
    wal.sync()
    assert wal.truncate_before(7) == (1, sizes[5])
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(ALL + [checkpoint(7)])
    assert state.entries == {} and state.commit == 7
    assert state.records == 4  # the segment left: its header, and the checkpoint
    wal.close()


def test_truncate_before_only_deletes_a_prefix(tmp_path):
    groups = [[AcceptRecord(9, 1, b"high"), checkpoint(1)], [AcceptRecord(1, 1, b"low")],
              [checkpoint(9)], [AcceptRecord(10, 1, b"x")]]
    wal = write_groups(tmp_path, groups, segment_bytes=1)
    # segment 1 alone is covered by checkpoint 1, but deleting it would leave a gap after 0
    assert wal.truncate_before(1) == (0, 0)
    assert wal.truncate_before(9)[0] == 3
    wal.close()


def test_truncate_before_rolls_an_active_segment_it_covers(tmp_path):
    records = [ViewRecord(3)] + [AcceptRecord(i, 3, b"v%d" % i) for i in range(1, 6)]
    records += [CommitRecord(5), checkpoint(5)]
    wal = write_groups(tmp_path, [records])
    (seg0,) = files(tmp_path)
    size0 = seg0.stat().st_size
    wal.append([AcceptRecord(6, 3, b"v6")])  # appended, not synced: goes with the new header
    assert wal.truncate_before(5) == (1, size0)
    (seg1,) = files(tmp_path)
    assert seg1.name == segment_name(1)
    assert records_in(seg1) == [checkpoint(5), ViewRecord(3), CommitRecord(5),
                                AcceptRecord(6, 3, b"v6")]
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(records + [AcceptRecord(6, 3, b"v6")])
    wal.close()


def test_truncating_everything_keeps_the_log_non_empty(tmp_path):
    records = [ViewRecord(3), AcceptRecord(1, 3, b"v"), checkpoint(1)]
    wal = write_groups(tmp_path, [records])
    assert wal.truncate_before(1)[0] == 1
    wal.close()
    wal, state, report = reopen(tmp_path)
    # the header alone: the replica must not take this for an empty disk
    assert state.records == 3 and state == DurableState.fold(records)
    # an empty active segment after a reopen: truncation writes the header into it first
    wal.close()
    wal = WriteAheadLog(str(tmp_path), segment_bytes=1)
    wal.open()
    wal.append([AcceptRecord(2, 3, b"w"), checkpoint(2)])
    wal.sync()
    wal.close()
    wal = WriteAheadLog(str(tmp_path), segment_bytes=1)
    wal.open()  # the last segment is full: a new, empty one is active
    assert os.path.getsize(files(tmp_path)[-1]) == 0
    assert wal.truncate_before(2)[0] == 2
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state.checkpoint == checkpoint(2) and state.records == 3
    wal.close()


def test_truncate_in_memory_mode_does_nothing(tmp_path):
    wal = WriteAheadLog(str(tmp_path / "m"), durability="memory")
    wal.open()
    wal.append([checkpoint(1)])
    wal.sync()
    assert wal.truncate_before(100) == (0, 0)
    assert wal.compress_closed() == (0, 0, 0)
    assert wal.stats()["segments"] == 0
    wal.close()
    assert not (tmp_path / "m").exists()


def test_missing_prefix_is_clean_but_a_gap_is_still_corrupt_middle(tmp_path):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    wal.truncate_before(4)
    wal.close()
    template = tmp_path.parent / (tmp_path.name + "-template")
    shutil.copytree(tmp_path, template)
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    assert report.clean and state == DurableState.fold(ALL)
    wal.close()
    # a crash in the middle of the deletion leaves a shorter missing prefix: just as clean
    d = tmp_path.parent / (tmp_path.name + "-halfway")
    write_groups(d, GROUPS, segment_bytes=1).close()
    (d / segment_name(0)).unlink()
    wal, state, report = reopen(d, segment_bytes=1)
    assert report.clean and state == DurableState.fold(ALL)
    wal.close()
    # a gap between present segments is not a truncation
    (tmp_path / segment_name(3)).unlink()
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    assert report.damage.kind == CORRUPT_MIDDLE and "missing before" in report.damage.reason
    assert report.segments == [segment_name(2)]
    wal.close()
    shutil.rmtree(template)


def test_a_missing_prefix_without_a_checkpoint_is_corrupt_middle(tmp_path):
    # Nothing ever truncated this log: a missing first segment is lost votes, not a truncation.
    wal = write_groups(tmp_path, GROUPS[:4], segment_bytes=1)
    wal.close()
    (tmp_path / segment_name(0)).unlink()
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    dmg = report.damage
    assert dmg.kind == CORRUPT_MIDDLE and "no checkpoint" in dmg.reason
    assert state == DurableState() and report.records == 0 and report.segments == []
    assert set(dmg.preserved) == {segment_name(i) + ".corrupt" for i in (1, 2, 3)}
    wal.close()


def test_torn_tail_is_still_detected_after_truncation_and_compression(tmp_path):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    wal.truncate_before(4)
    assert wal.compress_closed()[0] == 3
    last = [AcceptRecord(8, 2, b"the last one")]
    wal.append(last)
    wal.sync()
    wal.close()
    template = tmp_path.parent / (tmp_path.name + "-template")
    shutil.copytree(tmp_path, template)
    tail = files(template)[-1]
    n = len(encode_record(last[0]))
    start = tail.stat().st_size - n
    for cut in (1, 31, 32, n - 1):
        d = tmp_path.parent / f"{tmp_path.name}-cut{cut}"
        shutil.copytree(template, d)
        os.truncate(d / tail.name, start + cut)
        wal, state, report = reopen(d, segment_bytes=1)
        assert report.damage.kind == TORN_TAIL and report.damage.segment == tail.name
        assert report.damage.discarded == cut
        assert state == DurableState.fold(ALL)
        wal.close()
        shutil.rmtree(d)
    shutil.rmtree(template)


# ----------------------------------------------------------------------------------- compression

def test_compress_closed_then_reopen_gives_the_same_state(tmp_path, fsyncs):
    records = [AcceptRecord(i, 1, b"value %d " % i * 20) for i in range(60)] + [CommitRecord(59)]
    wal = write_groups(tmp_path, [records[i:i + 6] for i in range(0, 61, 6)], segment_bytes=2000)
    before = files(tmp_path)
    assert len(before) >= 4
    closed = before[:-1]
    sizes = sum(p.stat().st_size for p in closed)
    fsyncs.clear()
    done, b, a = wal.compress_closed()
    assert (done, b) == (len(closed), sizes) and a < b / 3
    # per segment: the .zst, the directory (its name), the directory again (the .log is gone)
    per = [[str(p) + ".zst", str(tmp_path), str(tmp_path)] for p in closed]
    assert fsyncs == [call for calls in per for call in calls]
    assert names(tmp_path) == [p.name + ".zst" for p in closed] + [before[-1].name]
    assert a == sum(p.stat().st_size for p in files(tmp_path)[:-1])
    st = wal.stats()
    assert (st["segments"], st["compressed_segments"], st["compressed_bytes"]) == (
        len(before), len(closed), a)
    assert st["bytes"] == a + before[-1].stat().st_size
    assert wal.compress_closed() == (0, 0, 0)  # nothing left; never the active segment
    # the .zst is one frame with content size and checksum
    params = zstandard.get_frame_parameters(files(tmp_path)[0].read_bytes())
    assert params.has_checksum and params.content_size > 0
    wal.close()
    wal, state, report = reopen(tmp_path, segment_bytes=2000)
    assert report.clean and state == DurableState.fold(records)
    assert report.segments == names(tmp_path)
    # appending goes on after the compressed segments
    wal.append([CommitRecord(60)])
    wal.sync()
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(records + [CommitRecord(60)])
    wal.close()


def test_compress_in_nosync_mode_never_fsyncs(tmp_path, fsyncs):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1, durability="nosync")
    assert wal.compress_closed()[0] == 5
    wal.truncate_before(5)
    wal.close()
    assert fsyncs == []
    wal, state, report = reopen(tmp_path, durability="nosync")
    assert report.clean and state == DurableState.fold(ALL)
    wal.close()


def test_a_crash_between_writing_the_zst_and_unlinking_the_log_recovers(tmp_path):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    wal.close()
    plain = {p.name: p.read_bytes() for p in files(tmp_path)}
    wal, _, _ = reopen(tmp_path, segment_bytes=1)
    wal.compress_closed()
    wal.close()
    # both forms of segments 1 and 2 (the .zst complete), a partial .zst beside segment 3's .log
    for i in (1, 2):
        (tmp_path / segment_name(i)).write_bytes(plain[segment_name(i)])
    packed = zstandard.ZstdCompressor().compress(plain[segment_name(3)])
    (tmp_path / segment_name(3)).write_bytes(plain[segment_name(3)])
    (tmp_path / segment_name(3, True)).write_bytes(packed[:len(packed) // 2])
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    assert report.clean and state == DurableState.fold(ALL)
    expect = [segment_name(0, True)] + [segment_name(i) for i in (1, 2, 3)] + [
        segment_name(4, True), segment_name(5, True)]
    expect.append(segment_name(6))  # empty: opened after 5, which was full
    assert report.segments == expect and names(tmp_path) == expect
    assert wal.compress_closed()[0] == 3  # and they are compressed again
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(ALL)
    wal.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "trailing", "records"])
def test_a_damaged_zst_is_corrupt_middle(tmp_path, damage):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    wal.compress_closed()
    wal.close()
    victim = tmp_path / segment_name(2, True)
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    elif damage == "truncate":
        del raw[-5:]
    elif damage == "garbage":
        raw = bytearray(os.urandom(len(raw)))
    elif damage == "trailing":
        raw += b"\0"
    else:  # a valid frame whose content is not whole records
        raw = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(
            content(victim)[:-3]))
    victim.write_bytes(raw)
    later = sum(p.stat().st_size for p in files(tmp_path)[2:])
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    dmg = report.damage
    assert dmg.kind == CORRUPT_MIDDLE and dmg.segment == victim.name
    assert (dmg.offset, dmg.discarded) == (0, later)
    assert report.segments == [segment_name(0, True), segment_name(1, True)]
    assert state == DurableState.fold(GROUPS[0] + GROUPS[1])
    assert dmg.preserved[0] == victim.name + ".corrupt"
    assert (tmp_path / dmg.preserved[0]).read_bytes() == bytes(raw)
    wal.close()


def test_a_damaged_zst_is_corrupt_middle_even_as_the_last_segment(tmp_path):
    wal = write_groups(tmp_path, GROUPS[:3], segment_bytes=1)
    wal.append([CommitRecord(3)])
    wal.sync()  # rolls to segment 3; then close and drop it, so segment 2 is the last
    wal.compress_closed()
    wal.close()
    (tmp_path / segment_name(3)).unlink()
    victim = tmp_path / segment_name(2, True)
    victim.write_bytes(victim.read_bytes()[:-1])
    wal, state, report = reopen(tmp_path, segment_bytes=1)
    assert report.damage.kind == CORRUPT_MIDDLE and report.damage.segment == victim.name
    wal.close()


def test_a_compression_that_does_not_read_back_keeps_the_log(tmp_path, monkeypatch):
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)

    def bad(raw):
        raise records._Damaged("simulated bit rot")

    monkeypatch.setattr("smrd.replica.wal.upkeep._decompress", bad)  # where compression reads back
    with pytest.raises(StorageError, match="does not read back.*simulated bit rot"):
        wal.compress_closed()
    monkeypatch.undo()
    assert names(tmp_path) == [segment_name(i) for i in range(6)]  # no .zst, every .log
    wal.append([CommitRecord(6)])  # the log itself goes on
    wal.sync()
    assert wal.compress_closed()[0] == 6
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(ALL + [CommitRecord(6)])
    wal.close()
    for call in (wal.compress_closed, lambda: wal.truncate_before(1)):
        with pytest.raises(StorageError, match="closed"):
            call()


def test_truncation_deletes_a_zst_left_beside_its_log(tmp_path):
    # A compression that failed and could not remove its partial .zst: truncation must not
    # leave it behind as a lone (and damaged) segment.
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    (tmp_path / segment_name(1, True)).write_bytes(b"\x28\xb5\x2f\xfd partial")
    assert wal.truncate_before(5)[0] == 5
    assert names(tmp_path) == [segment_name(5)]
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(ALL)
    wal.close()


def test_stats_of_a_fresh_log(tmp_path):
    wal = WriteAheadLog(str(tmp_path))
    wal.open()
    assert wal.stats() == {"segments": 1, "bytes": 0, "compressed_segments": 0,
                           "compressed_bytes": 0, "first_segment": 0, "active_segment": 0,
                           "segments_deleted": 0, "bytes_deleted": 0, "segments_compressed": 0}
    wal.append([ViewRecord(1)])
    wal.sync()
    assert wal.stats()["bytes"] == os.path.getsize(files(tmp_path)[0]) == wal.bytes_written
    wal.close()


def test_compress_gives_up_for_truncation_and_close(tmp_path):
    # A compression that finds the segment wanted by truncate_before (or the log closing)
    # leaves no .zst behind and keeps the .log.
    wal = write_groups(tmp_path, GROUPS, segment_bytes=1)
    seg = wal._segs[0]
    seg.busy = True
    seg.cancel = True
    assert wal._compress(seg) is None
    seg.busy = seg.cancel = False
    assert names(tmp_path) == [segment_name(i) for i in range(6)]
    # truncate_before waits for a busy segment and asks it to give up
    seg.busy = True
    result = []
    t = threading.Thread(target=lambda: result.append(wal.truncate_before(5)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and seg.cancel
    with wal._meta:
        seg.busy = False
        wal._meta.notify_all()
    t.join(5)
    assert result == [(5, result[0][1])]
    wal.close()


def test_compress_truncate_append_sync_from_several_threads(tmp_path):
    wal = WriteAheadLog(str(tmp_path), segment_bytes=3000)
    wal.open()
    stop = threading.Event()
    errors = []

    def forever(fn):
        def run():
            try:
                while not stop.is_set():
                    fn()
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        return threading.Thread(target=run)

    threads = [forever(wal.sync), forever(wal.compress_closed)]
    for t in threads:
        t.start()
    records = []
    truncated = 0
    for i in range(1, 3001):
        group = [AcceptRecord(i, 1, b"%d;" % i * 10)]
        if i % 250 == 0:
            group += [CommitRecord(i), checkpoint(i - 100)]
        wal.append(group)
        records += group
        if i % 250 == 10 and i > 250:
            wal.sync()  # the checkpoint before is synced now
            truncated += wal.truncate_before(i - 110)[0]
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert truncated > 5
    wal.compress_closed()
    st = wal.stats()
    assert st["compressed_segments"] == st["segments"] - 1
    wal.close()
    wal, state, report = reopen(tmp_path)
    assert report.clean and state == DurableState.fold(records)
    assert min(state.entries) == 2901 and state.checkpoint == checkpoint(2900)
    wal.close()


# ---------------------------------------------------------------------------------- the property

def random_records(rnd, n, state):
    out = []
    for _ in range(n):
        k = rnd.randrange(20)
        base = state["checkpoint"]
        if k < 12:
            i = max(1, base + rnd.randrange(-3, 15))
            out.append(AcceptRecord(i, rnd.randrange(5), rnd.randbytes(rnd.randrange(60))))
        elif k < 14:
            out.append(DecideRecord(max(1, base + rnd.randrange(-3, 10)),
                                    rnd.randbytes(rnd.randrange(30))))
        elif k < 16:
            out.append(ViewRecord(rnd.randrange(50)))
        elif k < 18:
            out.append(CommitRecord(max(0, base + rnd.randrange(-2, 8))))
        else:
            instance = max(0, base + rnd.randrange(-4, 10))
            state["checkpoint"] = max(base, instance)
            out.append(checkpoint(instance, rnd.randbytes(4)))
    return out


def check_directory(directory):
    seqs = [int(p.name[4:20], 16) for p in files(directory)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert not [p for p in Path(directory).iterdir() if ".corrupt" in p.name]


@pytest.mark.parametrize("seed", range(40))
def test_random_appends_syncs_truncations_compressions_and_reopens(tmp_path, seed):
    rnd = random.Random(seed)
    segment_bytes = rnd.choice([1, 200, 700, 3000])
    durability = rnd.choice(["fsync", "fsync", "nosync"])
    wal, _, _ = reopen(tmp_path, durability=durability, segment_bytes=segment_bytes)
    appended, synced = [], []
    gen = {"checkpoint": 0}
    for step in range(rnd.randrange(40, 120)):
        op = rnd.randrange(100)
        if op < 45:
            group = random_records(rnd, rnd.randrange(1, 6), gen)
            wal.append(group)
            appended += group
        elif op < 70:
            wal.sync()
            synced = list(appended)
        elif op < 82:
            cp = DurableState.fold(synced).checkpoint
            if cp is None:
                with pytest.raises(ValueError):
                    wal.truncate_before(0)
            else:
                before = wal.stats()
                upto = cp.instance if rnd.random() < 0.7 else rnd.randrange(cp.instance + 1)
                deleted, freed = wal.truncate_before(upto)
                after = wal.stats()
                assert after["first_segment"] >= before["first_segment"] + deleted
                synced = list(appended)  # truncation syncs first
        elif op < 90:
            wal.compress_closed()
            st = wal.stats()
            assert st["compressed_segments"] == st["segments"] - 1  # all but the active one
        elif op < 96:
            wal.close()
            check_directory(tmp_path)
            if rnd.random() < 0.3:  # a crash between compressing and unlinking the .log
                zst = [p for p in files(tmp_path) if p.name.endswith(".zst")]
                if zst:
                    p = rnd.choice(zst)
                    Path(str(p)[:-4]).write_bytes(content(p))
            if rnd.random() < 0.3:  # a crash while writing a .zst
                logs = [p for p in files(tmp_path) if p.name.endswith(".log")]
                p = rnd.choice(logs)
                packed = zstandard.ZstdCompressor().compress(p.read_bytes())
                Path(str(p) + ".zst").write_bytes(packed[:rnd.randrange(len(packed) + 1)])
            wal, state, report = reopen(tmp_path, durability=durability,
                                        segment_bytes=segment_bytes)
            assert report.clean, (seed, step, report.damage)
            assert state == DurableState.fold(appended), (seed, step)
            synced = list(appended)
        else:
            # a crash: whatever was appended and not synced is lost
            with wal._sync_lock, wal._buf_lock:
                wal._state = "closed"
            wal._release()
            appended = list(synced)
            wal, state, report = reopen(tmp_path, durability=durability,
                                        segment_bytes=segment_bytes)
            assert report.clean, (seed, step, report.damage)
            assert state == DurableState.fold(synced), (seed, step)
    wal.close()
    check_directory(tmp_path)
    wal, state, report = reopen(tmp_path, durability=durability, segment_bytes=segment_bytes)
    assert report.clean and state == DurableState.fold(appended), seed

    assert state.records > 0 or not appended
    st = wal.stats()
    assert st["segments"] == len(files(tmp_path))
    assert st["bytes"] == sum(p.stat().st_size for p in files(tmp_path))
    wal.close()


# ------------------------------------------------------------------------------ a real crash

CHILD = r"""
import hashlib, sys, threading, time
from smrd.replica.wal.log import WriteAheadLog
from smrd.protocol.records import AcceptRecord, CheckpointRecord

def value(i):
    return b"value-%d;" % i * (1 + i % 5)

wal = WriteAheadLog(sys.argv[1], "fsync", segment_bytes=4096)
state, report = wal.open()
cp = state.checkpoint.instance if state.checkpoint else 0
n = max([cp, *state.entries]) + 1
synced_cp = cp
print("ready", n, cp, flush=True)

def upkeep():
    while True:
        wal.compress_closed()
        if synced_cp:
            wal.truncate_before(synced_cp)
        time.sleep(0.002)

threading.Thread(target=upkeep, daemon=True).start()
while True:
    g = 1 + n % 7
    records = [AcceptRecord(i, 1, value(i)) for i in range(n, n + g)]
    n += g
    if n > 300 and n // 40 > (cp + 300) // 40:  # a checkpoint every ~40, 300 behind
        cp = n - 300
        records.append(CheckpointRecord(cp, hashlib.sha256(b"%d" % cp).digest(), cp))
    wal.append(records)
    wal.sync()
    synced_cp = cp
    print(n, cp, flush=True)
"""


def test_synced_records_survive_sigkill_during_compression_and_truncation(tmp_path):
    import signal
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[2]
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    synced, synced_cp = 0, 0
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            if not line.startswith("ready"):
                child.kill()
                pytest.fail(f"child did not start: {line!r} {child.stderr.read()}")
            _, n, cp = line.split()
            assert int(n) >= synced and int(cp) >= synced_cp, f"seed {seed}: lost synced records"
            for _ in range(rnd.randrange(200 if round_ == 0 else 1, 600)):
                line = child.stdout.readline()
                assert line, f"seed {seed}: child died: {child.stderr.read()}"
                synced, synced_cp = map(int, line.split())
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        wal, state, report = reopen(tmp_path, segment_bytes=4096)
        assert report.damage is None or report.damage.kind == TORN_TAIL, (seed, report.damage)
        assert not [p for p in tmp_path.iterdir() if ".corrupt" in p.name], seed
        floor = state.checkpoint.instance if state.checkpoint else 0
        assert floor >= synced_cp, seed
        for i in range(floor + 1, synced):
            assert state.entries.get(i) == [1, b"value-%d;" % i * (1 + i % 5), False], (seed, i)
        wal.close()
    assert any(p.name.endswith(".zst") for p in tmp_path.iterdir()), seed
    assert int(names(tmp_path)[0][4:20], 16) > 0, seed  # something was truncated
