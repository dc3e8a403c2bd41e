# The replica's write-ahead log: the bytes, files and fsyncs behind `Ready.persist`.
#
# Owns: encoding durable records as smrd frames, segment files `wal-<seq>.log` in one directory,
# the directory lock, group commit (many append() calls, one fsync per sync()), recovery:
# replaying the segments in order, cutting off a torn or corrupt tail and saying so, and the
# upkeep that keeps the directory small: deleting segments a checkpoint covers (truncate_before)
# and compressing closed segments to `wal-<seq>.log.zst` (compress_closed), and reading decided
# values back for a replica that evicted them from memory (read_decided).
# Never: decides anything about the protocol (the meaning of a record and how records combine
# belong to smrd.protocol.records), silently accepts damaged bytes, or keeps going after an
# fsync failed (after a failed fsync the kernel may already have dropped the dirty pages, so a
# retry that "succeeds" proves nothing; the only safe answer is to stop, see StorageError).
#
# On disk a record is exactly one smrd frame (smrd.core.encode_frame): the frame's CRC-32 and
# its bounds-checked decoder detect torn and flipped bytes, and there is one codec to trust.
#   type 100 ViewRecord      view in the header, no payload
#   type 101 AcceptRecord    view and instance in the header, the value as payload
#   type 102 DecideRecord    instance in the header, the value as payload
#   type 103 CommitRecord    commit point in the header's instance field, no payload
#   type 104 CheckpointRecord instance in the header, payload = sha256 digest (32) + size (<Q)
#
# Segments. Every segment starts with a header: the summary of every record written before it,
# as [CheckpointRecord(latest), if any] ViewRecord(highest view) CommitRecord(highest commit),
# written in the same write as the first group that goes into the segment (never alone, except
# when truncate_before needs a fresh segment: a log that was never written stays empty). So each
# segment, on its own, folds to the log's view, commit point and checkpoint as of its end, and a
# prefix of segments can be deleted once a checkpoint covers every value in them. The checkpoint
# comes first so that a header cut short by a crash is recognisable from the segment alone (the
# first records are a proper prefix of the pattern), and such a segment is never appended to.
# Header records are pure repetition: folding them again changes nothing (maxima and the latest
# checkpoint), so the fold of the log is the fold of everything appended.
#
# Segment numbers are gap-free from the first segment on disk. A missing prefix is what
# truncate_before leaves (accepted if the log holds a checkpoint, which truncation requires);
# a missing segment between two present ones is corrupt_middle, as it always was.
#
# Compression (compress_closed): a closed segment is compressed to wal-<seq>.log.zst (one zstd
# frame, level 3, content size and content checksum), read back and compared, fsynced, the
# directory fsynced, and only then is the .log unlinked (and the directory fsynced again). So a
# .zst is complete before its .log is gone: if both exist (a crash in between), recovery uses the
# .log and deletes the .zst; a .zst that does not decompress, or decompresses into anything but
# whole valid records, is corrupt_middle (its bytes are kept aside, like any corrupt_middle).
#
# Threads: no thread inside. append() only encodes into a memory buffer; sync() writes that
# buffer with one os.write and fsyncs once. Two locks make it safe for the driver to run sync()
# in a worker thread (asyncio.to_thread) while the loop keeps calling append(): append() holds
# the buffer lock only to extend the buffer, sync() holds it only to take the buffer, and holds
# a second lock for the write+fsync so that two concurrent sync() calls never reorder writes.
# A third lock (a condition) guards the per-segment bookkeeping: sync() takes it briefly to
# record what it wrote, compress_closed() and truncate_before() (worker threads: they read,
# write, unlink and fsync whole files) take it only to claim a segment, to publish a change and
# to wait for each other; the compression itself runs with no lock held. A segment is claimed
# by one of them at a time (busy); truncate_before asks a compression of a segment it is about
# to delete to give up and waits for it, and close() waits for both before it lets the
# directory lock go.
import fcntl
import hashlib
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

import zstandard

from ... import core
from ...errors import ProtocolError, SmrdError
from ..durable import fsync_dir
from ...protocol.records import (AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord,
                               DurableState, ViewRecord)

log = logging.getLogger(__name__)

VIEW, ACCEPT, DECIDE, COMMIT, CHECKPOINT = 100, 101, 102, 103, 104  # messages use 1..99
DURABILITY_MODES = ("fsync", "nosync", "memory")
LOCK_NAME = "LOCK"
CORRUPT_SUFFIX = ".corrupt"

# Damage kinds in RecoveryReport. A tail is what a crash during a write leaves behind and is
# expected; corrupt_middle means records that were once complete (and maybe acknowledged) are gone.
TORN_TAIL = "torn_tail"            # the last record is incomplete (or the file ends in zeros)
CORRUPT_TAIL = "corrupt_tail"      # the last record is complete but wrong (checksum, magic, type)
CORRUPT_MIDDLE = "corrupt_middle"  # damage with valid records or later segments after it

_SEGMENT = re.compile(r"^wal-([0-9a-f]{16})\.log(\.zst)?$")
# The first bytes of every frame (magic, version): a torn tail is told from garbage, and a scan
# for the next record starts, by them. The rest of the header is smrd.core's (peek_header).
_PREFIX = b"SM" + bytes([core.VERSION])
_MAX_PAYLOAD = 64 << 20
_SIZE = struct.Struct("<Q")  # a checkpoint's size, after its digest
DIGEST_BYTES = 32            # sha256
ZSTD_LEVEL = 3
_CHUNK = 1 << 20             # bytes read at a time while compressing


def segment_name(seq: int, compressed: bool = False) -> str:
    """The file name of segment `seq`: wal-<16 hex digits>.log, or .log.zst once compressed."""
    return f"wal-{seq:016x}.log" + (".zst" if compressed else "")


class StorageError(SmrdError):
    """The log cannot be used: the directory is locked by someone else, a write or an fsync
    failed, or it was used after close(). After a failed write or fsync every later call raises
    too: the driver must stop the replica (it may have promised or voted without durability)."""


@dataclass(frozen=True)
class Damage:
    """Where recovery cut the log, and why. Everything from `offset` in `segment` on, and every
    later segment, was discarded (`discarded` bytes in all)."""
    kind: str       # TORN_TAIL | CORRUPT_TAIL | CORRUPT_MIDDLE
    segment: str    # file name of the damaged segment
    offset: int     # byte offset in that segment of the first byte discarded
    discarded: int  # bytes discarded, this segment's tail plus all later segments
    reason: str     # what the decoder found there
    preserved: tuple = ()  # CORRUPT_MIDDLE only: files holding the discarded bytes, for forensics


@dataclass
class RecoveryReport:
    """What open() replayed. `damage` is None when every byte on disk was a valid record."""
    directory: str
    durability: str
    segments: list = field(default_factory=list)  # segment file names replayed, in order
    records: int = 0   # records replayed
    bytes: int = 0     # valid bytes replayed
    damage: Optional[Damage] = None

    @property
    def clean(self) -> bool:
        return self.damage is None


# ------------------------------------------------------------------------------------ encoding

def encode_record(record) -> bytes:
    """One record as one smrd frame. Raises TypeError for anything that is not a durable
    record, ValueError/OverflowError for out-of-range numbers (before anything is written)."""
    kind = type(record)
    if kind is AcceptRecord:
        return core.encode_frame(ACCEPT, 0, record.view, record.instance, record.value)
    if kind is ViewRecord:
        return core.encode_frame(VIEW, 0, record.view, 0)
    if kind is CommitRecord:
        return core.encode_frame(COMMIT, 0, 0, record.commit)
    if kind is DecideRecord:
        return core.encode_frame(DECIDE, 0, 0, record.instance, record.value)
    if kind is CheckpointRecord:
        digest, size = record.digest, record.size
        if not isinstance(digest, (bytes, bytearray)) or len(digest) != DIGEST_BYTES:
            raise ValueError(f"a checkpoint digest is {DIGEST_BYTES} bytes (sha256), "
                             f"not {digest!r}")
        if not 0 <= size < 1 << 64:
            raise OverflowError(f"checkpoint size out of range: {size}")
        return core.encode_frame(CHECKPOINT, 0, 0, record.instance,
                                 bytes(digest) + _SIZE.pack(size))
    raise TypeError(f"not a durable record: {record!r}")


def decode_record(frame):
    """The record in exactly one frame. ProtocolError on anything but a valid, known record."""
    mtype, _sender, flags, view, instance, payload = core.decode_frame(frame)
    if flags:
        raise ProtocolError(f"record type {mtype} with unknown flags 0x{flags:04x}")
    if mtype == ACCEPT:
        return AcceptRecord(instance, view, bytes(payload))
    if mtype == DECIDE and not view:
        return DecideRecord(instance, bytes(payload))
    if mtype == VIEW and not instance and not len(payload):
        return ViewRecord(view)
    if mtype == COMMIT and not view and not len(payload):
        return CommitRecord(instance)
    if mtype == CHECKPOINT and not view and len(payload) == DIGEST_BYTES + _SIZE.size:
        return CheckpointRecord(instance, bytes(payload[:DIGEST_BYTES]),
                                _SIZE.unpack_from(payload, DIGEST_BYTES)[0])
    if mtype in (VIEW, DECIDE, COMMIT, CHECKPOINT):
        raise ProtocolError(f"malformed record of type {mtype}")
    raise ProtocolError(f"unknown record type {mtype}")


def _parse(data, off: int):
    """The record starting at data[off:], as (record, end), or (None, (torn, reason))."""
    rest = len(data) - off
    if rest < core.HEADER_SIZE:
        if bytes(data[off:off + 3]) != _PREFIX[:min(rest, 3)]:
            return None, (False, "bad magic in a partial header")
        return None, (True, f"partial header ({rest} of {core.HEADER_SIZE} bytes)")
    head = core.peek_header(data, off)
    if head is None:
        return None, (False, f"bad magic/version {bytes(data[off:off + 3])!r}")
    length = head[5]
    if length > _MAX_PAYLOAD:
        return None, (False, f"absurd payload length {length}")
    end = off + core.HEADER_SIZE + length
    if end > len(data):
        return None, (True, f"partial record ({rest} of {end - off} bytes)")
    try:
        return decode_record(data[off:end]), end
    except ProtocolError as exc:
        return None, (False, str(exc))


def _replay(data):
    """Every valid record from the start of data, as (records, off, why): off is where the
    valid records end; why is (torn, reason) when off < len(data), else None."""
    records, off, why = [], 0, None
    end = len(data)
    while off < end:
        record, nxt = _parse(data, off)
        if record is None:
            why = nxt
            break
        records.append(record)
        off = nxt
    return records, off, why


def _index_records(data):
    """Index a segment from its frame headers alone (values are decoded, and checked, only when
    used): ({instance: (ordinal, start, end) of its last Accept/Decide record}, the last commit
    point recorded, that record's ordinal). Stops at the first incomplete or foreign frame: the
    active segment's unsynced tail."""
    latest, commit, commit_pos = {}, -1, -1
    off, size, head, pos = 0, len(data), core.HEADER_SIZE, 0
    peek = core.peek_header
    while off + head <= size:
        frame = peek(data, off)
        if frame is None:
            break
        kind, _, _, _, instance, length = frame
        end = off + head + length
        if end > size:
            break
        if kind == ACCEPT or kind == DECIDE:
            latest[instance] = (pos, off, end)
        elif kind == COMMIT and instance >= commit:
            commit, commit_pos = instance, pos
        off = end
        pos += 1
    return latest, commit, commit_pos


def _has_header(records) -> bool:
    """Does a segment holding `records` start with a complete header (see the top)?"""
    i = 1 if records and type(records[0]) is CheckpointRecord else 0
    return (len(records) >= i + 2 and type(records[i]) is ViewRecord
            and type(records[i + 1]) is CommitRecord)


class _Damaged(Exception):
    pass


def _decompress(raw) -> bytes:
    """The content of a compressed segment: exactly one complete zstd frame with its content
    size and checksum, nothing after it. _Damaged otherwise."""
    try:
        params = zstandard.get_frame_parameters(raw)
        if not params.has_checksum:
            raise _Damaged("zstd frame without a content checksum")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        data = dobj.decompress(raw)
    except zstandard.ZstdError as exc:
        raise _Damaged(str(exc)) from exc
    if not dobj.eof:
        raise _Damaged(f"incomplete zstd frame ({len(raw)} bytes)")
    if dobj.unused_data:
        raise _Damaged(f"{len(dobj.unused_data)} bytes after the zstd frame")
    if params.content_size != len(data):
        raise _Damaged(f"content size {params.content_size} in the frame, {len(data)} decoded")
    return data


def _valid_record_after(data, start: int) -> bool:
    """Is there any valid record starting at or after `start`? Used only after damage, to tell
    a tail (nothing valid follows: a crash mid-write) from corruption in the middle. A value that
    happens to contain a whole valid frame can make a torn tail look like corrupt_middle: the
    error is on the side of alarm, never of silently dropping records that were complete."""
    pos = data.find(_PREFIX, start)
    while pos >= 0:
        if _parse(data, pos)[0] is not None:
            return True
        pos = data.find(_PREFIX, pos + 1)
    return False


# ----------------------------------------------------------------------------------------- log

class _Summary:
    """What a segment header repeats: the highest view and commit point and the latest
    checkpoint of some records (the fold's rules), and the highest instance of any Accept or
    Decide record among them (for per-segment bookkeeping)."""
    __slots__ = ("view", "commit", "checkpoint", "top")

    def __init__(self, view: int = 0, commit: int = 0, checkpoint=None, top: int = -1):
        self.view, self.commit, self.checkpoint, self.top = view, commit, checkpoint, top

    def note(self, record) -> None:
        kind = type(record)
        if kind is AcceptRecord or kind is DecideRecord:
            if record.instance > self.top:
                self.top = record.instance
        elif kind is ViewRecord:
            if record.view > self.view:
                self.view = record.view
        elif kind is CommitRecord:
            if record.commit > self.commit:
                self.commit = record.commit
        elif kind is CheckpointRecord:
            if self.checkpoint is None or record.instance >= self.checkpoint.instance:
                self.checkpoint = record
            if record.instance > self.commit:
                self.commit = record.instance

    def merge(self, later: "_Summary") -> None:
        """Fold in the summary of records that come after ours."""
        self.view = max(self.view, later.view)
        self.commit = max(self.commit, later.commit)
        self.top = max(self.top, later.top)
        cp = later.checkpoint
        if cp is not None and (self.checkpoint is None or cp.instance >= self.checkpoint.instance):
            self.checkpoint = cp

    def header(self) -> bytes:
        records = [] if self.checkpoint is None else [self.checkpoint]
        records += [ViewRecord(self.view), CommitRecord(self.commit)]
        return b"".join(encode_record(r) for r in records)


@dataclass
class _Segment:
    """Bookkeeping for one segment file (guarded by WriteAheadLog._meta)."""
    seq: int
    compressed: bool = False  # wal-<seq>.log.zst rather than wal-<seq>.log
    size: int = 0             # bytes on disk
    top: int = -1             # highest instance of an Accept/Decide record in it; -1: none
    header: bool = False      # starts with a complete header
    busy: bool = False        # claimed by compress_closed() or truncate_before()
    cancel: bool = False      # truncate_before() wants it deleted: a compression gives up

    @property
    def name(self) -> str:
        return segment_name(self.seq, self.compressed)


class WriteAheadLog:
    """Segmented write-ahead log with group commit, truncation and compression.

    open() -> (DurableState, RecoveryReport); then append(records) any number of times (cheap:
    memory only) and sync() to make everything appended before the call durable with one write
    and one fsync. durability: "fsync" (safe default), "nosync" (write to the OS, never fsync:
    survives a process crash, not a power loss), "memory" (nothing on disk: open() returns an
    empty state, append() and sync() do nothing).

    Upkeep, for worker threads (each reads, writes, unlinks and fsyncs files): truncate_before()
    deletes the segments a synced checkpoint covers, compress_closed() compresses the closed
    ones; stats() says what is on disk."""

    def __init__(self, directory: str, durability: str = "fsync", segment_bytes: int = 64 << 20):
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, "
                             f"not {durability!r}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be >= 1, not {segment_bytes}")
        self.directory = os.fspath(directory)
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.bytes_written = 0    # bytes handed to the OS (segment headers included)
        self.records_written = 0  # records handed to the OS (segment headers included)
        self.syncs = 0            # writes (each followed by one fsync in "fsync" mode)
        self.segments_deleted = 0      # by truncate_before(), since open()
        self.bytes_deleted = 0
        self.segments_compressed = 0   # by compress_closed(), since open()
        self._fsync = durability == "fsync"
        self._memory = durability == "memory"
        self._buf = bytearray()
        self._buffered = 0        # records in _buf
        self._bsum = _Summary()   # summary of the records in _buf
        self._buf_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._wsum = _Summary()   # summary of every record written (under _sync_lock)
        self._meta = threading.Condition(threading.Lock())
        self._segs = {}           # seq -> _Segment: every segment on disk, the active one too
        self._catchup_cache = {}  # seq -> indexed content of the last closed segments read back
        self._truncate_lock = threading.Lock()
        self._compress_lock = threading.Lock()
        self._lock_fd = -1
        self._fd = -1             # the active segment, O_APPEND
        self._seq = -1            # its sequence number (changed under _sync_lock and _meta)
        self._size = 0            # its size in bytes
        self._state = "new"       # new | open | failed | closed
        self._failure = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------------------------- open

    def open(self):
        if self._state != "new":
            raise StorageError(f"write-ahead log {self.directory}: open() called twice")
        if self._memory:
            self._state = "open"
            return DurableState(), RecoveryReport(self.directory, self.durability)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create log directory {self.directory}: {exc}") from exc
        self._lock()
        try:
            state, report = self._recover()
            self._wsum = _Summary(state.view, state.commit, state.checkpoint)
            self._start_writing()
        except OSError as exc:
            self._release()
            raise StorageError(f"recovery of log directory {self.directory} failed: {exc}") from exc
        except BaseException:
            self._release()
            raise
        self._state = "open"
        return state, report

    def _lock(self) -> None:
        # flock belongs to the open file description: a second process, and a second
        # WriteAheadLog in this process, both fail here; the kernel drops it if we die.
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise StorageError(
                f"log directory {self.directory} is in use by another smrd (pid {holder} holds "
                f"{path}): two replicas must never share a log; give each its own directory"
            ) from exc
        except OSError as exc:  # e.g. ENOLCK: a file system without locks is unsafe for a log
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _scan(self) -> list:
        """The segments on disk as [(seq, file name)] in order, one file per seq: where a crash
        left both wal-<seq>.log and its .zst, the .log (complete: it is unlinked only after the
        .zst is durable) wins and the .zst (maybe partial) is deleted."""
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise StorageError(f"cannot list log directory {self.directory}: {exc}") from exc
        found = {}
        for name in names:
            if m := _SEGMENT.match(name):
                found.setdefault(int(m.group(1), 16), [None, None])[bool(m.group(2))] = name
        segments = []
        for seq in sorted(found):
            plain, packed = found[seq]
            if plain is not None and packed is not None:
                log.info("write-ahead log %s: %s and %s both exist (a compression was "
                         "interrupted); keeping the first", self.directory, plain, packed)
                try:
                    os.unlink(os.path.join(self.directory, packed))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StorageError(
                        f"cannot remove {packed} in {self.directory}: {exc}") from exc
            segments.append((seq, plain or packed))
        return segments

    def _recover(self):
        state = DurableState()
        report = RecoveryReport(self.directory, self.durability)
        segments = self._scan()
        metas = []
        for k, (seq, name) in enumerate(segments):
            path = os.path.join(self.directory, name)
            if k and seq != segments[k - 1][0] + 1:
                # A segment's name is made durable before its first byte is written, and only a
                # prefix is ever deleted, so a gap is not a crash: someone removed a file.
                # Everything from the gap on is suspect.
                self._cut(report, segments, k, 0, None, CORRUPT_MIDDLE,
                          f"segment(s) missing before {name}")
                break
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as exc:
                raise StorageError(f"cannot read log segment {path}: {exc}") from exc
            compressed = name.endswith(".zst")
            if compressed:
                # A .zst was complete (read back and compared) before its .log went away, so
                # any damage in it is damage to records that were durable: corrupt_middle.
                try:
                    data = _decompress(raw)
                except _Damaged as exc:
                    self._cut(report, segments, k, 0, None, CORRUPT_MIDDLE,
                              f"compressed segment unreadable: {exc}")
                    break
                records, off, why = _replay(data)
                if why is not None:
                    self._cut(report, segments, k, 0, None, CORRUPT_MIDDLE,
                              f"compressed segment damaged at offset {off} of its content: "
                              f"{why[1]}")
                    break
            else:
                data = raw
                records, off, why = _replay(data)
            top = -1
            for record in records:
                state.add(record)
                kind = type(record)
                if (kind is AcceptRecord or kind is DecideRecord) and record.instance > top:
                    top = record.instance
            metas.append(_Segment(seq, compressed, len(raw) if compressed else off, top,
                                  _has_header(records)))
            report.records += len(records)
            report.segments.append(name)
            report.bytes += off
            if why is not None:
                torn, reason = why
                later = any(os.path.getsize(os.path.join(self.directory, n))
                            for _, n in segments[k + 1:])
                if later or _valid_record_after(data, off + 1):
                    kind = CORRUPT_MIDDLE
                elif torn:
                    kind = TORN_TAIL
                elif not any(data[off:]):
                    kind, reason = TORN_TAIL, "zero-filled tail (blocks allocated, never written)"
                else:
                    kind = CORRUPT_TAIL
                self._cut(report, segments, k, off, data, kind, reason)
                break
            if self._fsync:
                # The previous process may have been killed between write() and fsync(): those
                # bytes sit in the page cache, we have just replayed them and the replica will
                # act on them, so they must be durable before it does.
                self._fsync_path(path)
        prior = report.damage
        if (report.segments and segments[0][0] > 0 and state.checkpoint is None
                and (prior is None or prior.kind != CORRUPT_MIDDLE)):
            # Segments before the first one are missing. truncate_before() deletes a prefix
            # only after a checkpoint is durable, and every later header repeats it: without one
            # this is not a truncation but lost files, maybe with votes in them. Refuse it all.
            # (A torn tail cannot have taken the checkpoint: it was synced before the deletion.
            # After a corrupt_middle the log is refused anyway, and the rest is kept as it is.)
            first, n = segments[0][1], len(report.segments)
            state, metas = DurableState(), []
            report.records = report.bytes = 0
            report.segments = []
            also = f" (and {prior.kind} in {prior.segment}: {prior.reason})" if prior else ""
            self._cut(report, segments[:n], 0, 0, None, CORRUPT_MIDDLE,
                      f"segment(s) missing before {first} and no checkpoint covers them{also}")
        if self._fsync:
            self._fsync_dir()  # the names too, in case the last writer ran with "nosync"
        self._segs = {m.seq: m for m in metas}
        return state, report

    def _cut(self, report, segments, k, off, data, kind, reason) -> None:
        """Discard everything from byte `off` of segment k on (all of segment k if data is
        None), with every later segment: report, log, set corrupt bytes aside, truncate."""
        name = segments[k][1]
        path = os.path.join(self.directory, name)
        later = segments[k + 1:] if data is not None else segments[k:]
        tail = data[off:] if data is not None else b""
        discarded = len(tail) + sum(os.path.getsize(os.path.join(self.directory, n))
                                    for _, n in later)
        preserved = []
        if kind == CORRUPT_MIDDLE:
            # Records that were once complete, maybe acknowledged, are being dropped: keep the
            # bytes beside the log (never replayed) so that an operator can look at them.
            if tail:
                preserved.append(self._preserve(name, tail))
            preserved += [self._preserve(n, None) for _, n in later]
        else:
            for _, n in later:  # only empty segments can follow a tail: nothing to keep
                os.unlink(os.path.join(self.directory, n))
        if data is not None:
            try:
                os.truncate(path, off)
            except OSError as exc:
                raise StorageError(f"cannot truncate damaged log segment {path}: {exc}") from exc
            # Make the cut durable before anything is appended after it: otherwise a power loss
            # could bring the old tail back in front of new records (a corrupt_middle later).
            if self._fsync:
                self._fsync_path(path)
        report.damage = Damage(kind, name, off, discarded, reason, tuple(preserved))
        level = logging.ERROR if kind == CORRUPT_MIDDLE else logging.WARNING
        log.log(level, "write-ahead log %s: %s in %s at offset %d (%s); discarded %d bytes%s",
                self.directory, kind, name, off, reason, discarded,
                f", kept in {', '.join(preserved)}" if preserved else "")

    def _preserve(self, name: str, tail) -> str:
        """Move a discarded segment (tail None) or write a discarded tail to name.corrupt[.N]."""
        target, n = name + CORRUPT_SUFFIX, 1
        while os.path.exists(os.path.join(self.directory, target)):
            target, n = f"{name}{CORRUPT_SUFFIX}.{n}", n + 1
        path = os.path.join(self.directory, target)
        try:
            if tail is None:
                os.rename(os.path.join(self.directory, name), path)
            else:
                with open(path, "wb") as f:
                    f.write(tail)
                    f.flush()
                    if self._fsync:
                        os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"cannot set aside corrupt log bytes as {path}: {exc}") from exc
        return target

    def _start_writing(self) -> None:
        if self._segs:
            last = self._segs[max(self._segs)]
            # Append to the last segment only if it is a plain file with room that is empty
            # (its first write will carry the header) or starts with a complete header; one
            # whose header a crash cut short (or written before headers existed) stays as is.
            if not last.compressed and last.size < self.segment_bytes and (
                    last.size == 0 or last.header):
                self._open_segment(last.seq, create=False)
                return
            self._open_segment(last.seq + 1, create=True)
        else:
            self._open_segment(0, create=True)

    def _open_segment(self, seq: int, create: bool) -> None:
        path = os.path.join(self.directory, segment_name(seq))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open log segment {path}: {exc}") from exc
        if create and self._fsync:
            # A new file's name lives in the directory, which fsync(file) does not cover: without
            # this a crash can lose the whole new segment even after its records were fsynced.
            try:
                self._fsync_dir()
            except StorageError:
                os.close(fd)
                raise
        if self._fd >= 0:
            os.close(self._fd)
        size = os.fstat(fd).st_size
        with self._meta:
            if create:
                self._segs[seq] = _Segment(seq)
            self._fd, self._seq, self._size = fd, seq, size

    def _fsync_path(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"fsync of {path} failed: {exc}") from exc

    def _fsync_dir(self) -> None:
        try:
            fsync_dir(self.directory)
        except OSError as exc:
            raise StorageError(f"fsync of log directory {self.directory} failed: {exc}") from exc

    def _fsync_dir_or_fail(self, what: str) -> None:
        """fsync the directory after upkeep changed names in it; a failure stops the log (the
        names on disk are then unknown: a crash could bring back any subset of them)."""
        if self._fsync:
            try:
                self._fsync_dir()
            except StorageError as exc:
                self._fail(f"fsync of the log directory after {what}", exc)

    # ------------------------------------------------------------------------ append / sync

    def append(self, records: Iterable) -> None:
        """Encode records after everything appended so far. Memory only: durable after sync()."""
        if self._memory:
            return
        # Encode everything first: a bad record raises before any byte of this call is buffered.
        frames = []
        summary = _Summary(-1, -1)
        for record in records:
            frames.append(encode_record(record))
            summary.note(record)
        with self._buf_lock:
            if self._state != "open":
                self._refuse()
            self._buf += b"".join(frames)
            self._buffered += len(frames)
            self._bsum.merge(summary)

    def sync(self) -> None:
        """Make every record appended before this call durable: one write, one fsync."""
        if self._memory:
            return
        with self._sync_lock:
            self._sync_locked(False)

    def _sync_locked(self, fresh: bool) -> None:
        """sync() under _sync_lock. fresh: also leave the active segment with a complete header
        and no record written before this call but the header (roll unless it is empty)."""
        with self._buf_lock:
            if self._state != "open":
                self._refuse()
            data, count, group = self._buf, self._buffered, self._bsum
            if not data and not fresh:
                return
            self._buf, self._buffered, self._bsum = bytearray(), 0, _Summary()
        if self._size and (fresh or self._size >= self.segment_bytes):
            # Roll between groups, so a segment always ends on a record boundary and the
            # segment being closed was fully fsynced by the sync() that wrote it.
            try:
                self._open_segment(self._seq + 1, create=True)
            except StorageError as exc:
                self._fail("creating a new segment", exc)
        header = not self._size
        if header:
            # The first write into a segment starts with the summary of everything written
            # before it, which makes the segment self-sufficient (see the top of this file).
            head = self._wsum.header()
            data = head + data
            count += 2 + (self._wsum.checkpoint is not None)
        self._write_all(data)
        if self._fsync:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail("fsync", exc)
        self._size += len(data)
        self._wsum.merge(group)
        with self._meta:
            active = self._segs[self._seq]
            active.size = self._size
            active.top = max(active.top, group.top)
            active.header = active.header or header
        self.bytes_written += len(data)
        self.records_written += count
        self.syncs += 1

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:  # a regular file takes it all at once unless the disk is full
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                # Part of a frame may be in the file now: appending after it would bury a torn
                # record in the middle of the log, so the log stops here.
                self._fail("write", exc)
            view = view[n:]

    def _fail(self, what: str, exc) -> None:
        with self._buf_lock:
            self._state = "failed"
            self._failure = (f"write-ahead log {self.directory}: {what} failed ({exc}); records "
                             "appended since the last successful sync() may be lost, and the log "
                             "refuses further use: stop this replica and restart it")
        raise StorageError(self._failure) from exc

    def _refuse(self):
        if self._state == "failed":
            raise StorageError(self._failure)
        raise StorageError(f"write-ahead log {self.directory} is {self._state}, not open")

    def _check_open(self) -> None:
        with self._buf_lock:
            if self._state != "open":
                self._refuse()

    # ------------------------------------------------------------------------------ upkeep

    def truncate_before(self, instance: int) -> tuple:
        """Delete the oldest segments that hold no Accept/Decide record above `instance`;
        -> (segments deleted, bytes freed on disk).

        Precondition: a CheckpointRecord with an instance >= `instance` was appended and
        synced (ValueError otherwise): the checkpoint file it names holds everything the
        deleted values produced, and must be durable before the record is appended.

        First it syncs what was appended (like sync()). If the active segment holds an
        Accept/Decide record, all at or below `instance` (or it has no header yet), that write
        goes to a new segment, written and fsynced now even if nothing was appended, whose
        header repeats the view, commit point and checkpoint (an active segment with a value
        above `instance` stays: it could not be deleted anyway). Then it deletes closed
        segments oldest first, while each one's highest Accept/Decide instance is <=
        `instance`, and stops earlier if the first segment left would not start with a
        complete header; so the segments left are gap-free, and the fold of what is left equals
        the fold of everything (the values deleted are all covered by the checkpoint). It
        fsyncs the directory after each deletion, so that a crash leaves a prefix deleted (the
        order of unlinks is not otherwise durable). A segment being compressed is waited for (its compression is told
        to give up). Blocks on disk I/O: call from a worker thread. "memory": does nothing."""
        if self._memory:
            return 0, 0
        with self._truncate_lock:
            with self._sync_lock:
                self._check_open()
                cp = self._wsum.checkpoint
                if cp is None or cp.instance < instance:
                    raise ValueError(
                        f"truncate_before({instance}) needs a synced checkpoint at or above "
                        f"{instance}; the latest synced one is "
                        f"{'none' if cp is None else cp.instance}")
                active = self._segs[self._seq]
                self._sync_locked(not self._size or not active.header
                                  or 0 <= active.top <= instance)
            victims = self._claim_prefix(instance)
            deleted = freed = 0
            try:
                for seg in victims:
                    # The .zst first: one that a failed compression left beside the .log must
                    # not outlive it. One directory fsync per file: a crash must leave a prefix
                    # deleted, never an older segment brought back after a newer one went.
                    for name in (segment_name(seg.seq, True), segment_name(seg.seq)):
                        try:
                            os.unlink(os.path.join(self.directory, name))
                        except FileNotFoundError:
                            continue
                        except OSError as exc:
                            raise StorageError(f"write-ahead log {self.directory}: cannot "
                                               f"delete {name}: {exc}") from exc
                        self._fsync_dir_or_fail(f"deleting {name}")
                    with self._meta:
                        del self._segs[seg.seq]
                    deleted += 1
                    freed += seg.size
            finally:
                with self._meta:
                    for seg in victims:
                        seg.busy = False
                    self._meta.notify_all()
                self.segments_deleted += deleted
                self.bytes_deleted += freed
            if deleted:
                log.info("write-ahead log %s: deleted %d segment(s) up to instance %d (%d bytes)",
                         self.directory, deleted, instance, freed)
            return deleted, freed

    def _claim_prefix(self, instance: int) -> list:
        with self._meta:
            while True:
                victims = []
                for seq in sorted(self._segs):
                    seg = self._segs[seq]
                    if seq >= self._seq or seg.top > instance:
                        break
                    victims.append(seg)
                # Whatever is left must start with a self-sufficient segment. The segment after
                # the last victim exists: victims are closed, and numbers have no gaps.
                while victims and not self._segs[victims[-1].seq + 1].header:
                    victims.pop()
                busy = [seg for seg in victims if seg.busy]
                if not busy:
                    for seg in self._segs.values():
                        seg.cancel = False
                    for seg in victims:
                        seg.busy = True
                    return victims
                for seg in busy:
                    seg.cancel = True
                self._meta.wait()

    def compress_closed(self) -> tuple:
        """Compress every closed segment still stored as wal-<seq>.log into wal-<seq>.log.zst,
        oldest first; -> (segments compressed, bytes before, bytes after). Never the active
        segment. Each: compress (zstd level 3, content size and checksum), fsync it, read it
        back and compare, fsync the directory, unlink the .log, fsync the directory. A failure
        removes the .zst and raises StorageError; the .log stays and the log goes on (a failed
        fsync stops the log, as everywhere). Runs with no lock held while it compresses: call it from a worker thread while the loop goes on
        appending and syncing. "memory": does nothing."""
        if self._memory:
            return 0, 0, 0
        self._check_open()
        done = before = after = 0
        with self._compress_lock:
            while True:
                with self._meta:
                    if self._state != "open":
                        break
                    # not one that truncate_before() is waiting to delete (cancel)
                    seg = next((s for seq, s in sorted(self._segs.items()) if seq < self._seq
                                and not (s.compressed or s.busy or s.cancel)), None)
                    if seg is None:
                        break
                    seg.busy = True
                try:
                    sizes = self._compress(seg)
                finally:
                    with self._meta:
                        seg.busy = False
                        self._meta.notify_all()
                if sizes is not None:
                    done += 1
                    before += sizes[0]
                    after += sizes[1]
                    self.segments_compressed += 1
        if done:
            log.info("write-ahead log %s: compressed %d segment(s), %d -> %d bytes",
                     self.directory, done, before, after)
        return done, before, after

    def _compress(self, seg: _Segment):
        """Compress one claimed segment; (bytes before, after), or None if it gave up because
        truncate_before() wants the segment or the log closed."""
        src = os.path.join(self.directory, segment_name(seg.seq))
        dst = os.path.join(self.directory, segment_name(seg.seq, True))
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True,
                                        write_content_size=True)
        created = False
        try:
            with open(src, "rb") as fin:
                size = os.fstat(fin.fileno()).st_size
                digest = hashlib.blake2b()
                cobj = cctx.compressobj(size=size)
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                created = True
                with open(fd, "wb") as fout:
                    left = size
                    while left:
                        if seg.cancel or self._state != "open":
                            return self._give_up(dst)
                        chunk = fin.read(min(_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{src} shrank while being compressed")
                        digest.update(chunk)
                        fout.write(cobj.compress(chunk))
                        left -= len(chunk)
                    fout.write(cobj.flush())
                    fout.flush()
                    packed = fout.tell()
                    if self._fsync:
                        try:
                            os.fsync(fout.fileno())
                        except OSError as exc:
                            self._fail(f"fsync of {dst}", exc)
            # Read it back the way recovery will: the .log goes only if this gives its bytes.
            with open(dst, "rb") as f:
                raw = f.read()
            try:
                content = _decompress(raw)
            except _Damaged as exc:
                raise OSError(f"{dst} does not read back: {exc}") from exc
            if len(content) != size or hashlib.blake2b(content).digest() != digest.digest():
                raise OSError(f"{dst} reads back different bytes than {src}")
            del content, raw
        except StorageError:
            raise
        except (OSError, zstandard.ZstdError) as exc:
            if created:
                self._give_up(dst)
            raise StorageError(f"write-ahead log {self.directory}: cannot compress {src}: "
                               f"{exc}") from exc
        self._fsync_dir_or_fail(f"writing {dst}")
        with self._meta:
            # Under _meta: close() waits for busy segments before it lets the directory lock go,
            # so the .log is never unlinked once another process may own the directory.
            if seg.cancel or self._state != "open":
                give_up = True
            else:
                give_up = False
                try:
                    os.unlink(src)
                except OSError as exc:  # both files stay: recovery keeps the .log
                    raise StorageError(f"cannot remove {src} after compressing it: {exc}") from exc
                seg.compressed, seg.size = True, packed
        if give_up:
            return self._give_up(dst)
        self._fsync_dir_or_fail(f"removing {src}")
        return size, packed

    def _give_up(self, dst: str) -> None:
        # The .zst must be gone durably before truncate_before() unlinks its .log: a .zst that
        # outlived its .log would be read as a complete segment.
        self._remove_quietly(dst)
        self._fsync_dir_or_fail(f"removing {dst}")
        return None

    def _remove_quietly(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            log.warning("write-ahead log %s: cannot remove %s: %s", self.directory, path, exc)

    def read_decided(self, start: int, upto: int, max_entries: int, max_bytes: int) -> list:
        """The decided values of instances start, start+1, ... (never beyond `upto`, which the
        caller must know decided: at most its commit point), as [(instance, value)], at most
        max_entries and about max_bytes (at least one entry), read back from the segment files:
        catch-up for a peer, or a replay, once the values left memory. An instance's value is
        the last record of it in the log: once it is decided no record of it follows (the core
        never re-accepts a decided slot), and every record of a decided instance was synced
        before the commit point passed it. Blocking file reads: call it from a worker thread.
        Stops early (fewer entries) at a gap, e.g. instances covered by a checkpoint."""
        if self._memory or start > upto:
            return []
        self._check_open()
        with self._meta:
            seqs = sorted(seq for seq, seg in self._segs.items() if seg.top >= start)
        found = {}                      # instance -> (seq, ordinal, data, start, end) of its last record
        last = min(upto, start + max_entries - 1)
        for seq in seqs:
            loaded = self._read_segment_for_catchup(seq)
            if loaded is None:
                continue  # deleted meanwhile (truncated behind a checkpoint)
            data, latest, final_commit, final_pos = loaded
            for i in range(start, last + 1):
                where = latest.get(i)
                if where is not None:
                    found[i] = (seq, where[0], data, where[1], where[2])
            # What max_bytes lets us send, as far as we know the values (at least one).
            size, i = 0, start
            while i <= last and i in found:
                n = found[i][4] - found[i][3]
                if i > start and size + n > max_bytes:
                    last = i - 1
                    break
                size += n
                i += 1
            if i <= last:
                continue  # some wanted instance is further on
            # Final once a commit point >= last follows every record taken from this segment:
            # no record of those instances can come after it.
            newest = max((f[1] for f in found.values() if f[0] == seq), default=-1)
            if final_commit >= last and final_pos > newest:
                break
        out, size = [], 0
        for i in range(start, last + 1):
            where = found.get(i)
            if where is None:
                break
            data, off, end = where[2:]
            value = decode_record(data[off:end]).value  # checksum checked here, for what we send
            if out and size + len(value) > max_bytes:
                break
            out.append((i, value))
            size += len(value)
        return out

    def _read_segment_for_catchup(self, seq: int):
        # Serving a long catch-up walks the segments in order, a chunk per call: keep the last
        # closed segment read, with an index of its records (closed segments never change).
        cache = self._catchup_cache
        if seq in cache:
            return cache[seq]
        data = self._load_segment(seq)
        if data is None:
            return None
        loaded = (data, *_index_records(data))
        if seq < self._seq:
            if len(cache) >= 2:  # a chunk may straddle two segments: keep both
                del cache[next(iter(cache))]
            cache[seq] = loaded
        return loaded

    def _load_segment(self, seq: int):
        for compressed in (False, True):  # a compression may replace the .log while we look
            path = os.path.join(self.directory, segment_name(seq, compressed))
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            if not compressed:
                return raw
            try:
                return _decompress(raw)
            except _Damaged as exc:
                raise StorageError(f"log segment {path} is damaged: {exc}") from exc
        return None

    def stats(self) -> dict:
        """What is on disk now, for metrics: segments (files), bytes (their sizes, compressed
        or not), compressed_segments and compressed_bytes, first_segment and active_segment
        (numbers; -1 when none), and the upkeep counters since open()."""
        with self._meta:
            segs = list(self._segs.values())
            active = self._seq
        packed = [s for s in segs if s.compressed]
        return {
            "segments": len(segs),
            "bytes": sum(s.size for s in segs),
            "compressed_segments": len(packed),
            "compressed_bytes": sum(s.size for s in packed),
            "first_segment": min((s.seq for s in segs), default=-1),
            "active_segment": active,
            "segments_deleted": self.segments_deleted,
            "bytes_deleted": self.bytes_deleted,
            "segments_compressed": self.segments_compressed,
        }

    # ------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Sync what was appended (if the log is healthy), then release files and the lock.
        Safe to call more than once and after a failure. Waits for a compress_closed() or
        truncate_before() in another thread to give up or finish its current file first."""
        if self._state in ("closed", "new"):
            self._state = "closed"
            self._release()
            return
        try:
            if self._state == "open" and not self._memory:
                self.sync()
        finally:
            with self._sync_lock, self._buf_lock:
                self._state = "closed"
                self._buf = bytearray()
                self._buffered = 0
                self._bsum = _Summary()
            with self._meta:
                while any(s.busy for s in self._segs.values()):
                    self._meta.wait()
            self._release()

    def _release(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)  # closing the lock file's last descriptor releases the flock
