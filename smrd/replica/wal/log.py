"""The replica's write-ahead log: the bytes, files and fsyncs behind `Ready.persist`.

Owns: encoding durable records as smrd frames, segment files `wal-<seq>.log` in one directory,
the directory lock, group commit (many append() calls, one fsync per sync()), recovery:
replaying the segments in order, cutting off a torn or corrupt tail and saying so, and the
upkeep that keeps the directory small: deleting segments a checkpoint covers (truncate_before)
and compressing closed segments to `wal-<seq>.log.zst` (compress_closed), and reading decided
values back for a replica that evicted them from memory (read_decided).
Never: decides anything about the protocol (the meaning of a record and how records combine
belong to smrd.protocol.records), silently accepts damaged bytes, or keeps going after an
fsync failed (after a failed fsync the kernel may already have dropped the dirty pages, so a
retry that "succeeds" proves nothing; the only safe answer is to stop, see StorageError).

On disk a record is exactly one smrd frame (smrd.core.encode_frame): the frame's CRC-32 and
its bounds-checked decoder detect torn and flipped bytes, and there is one codec to trust.
  type 100 ViewRecord      view in the header, no payload
  type 101 AcceptRecord    view and instance in the header, the value as payload
  type 102 DecideRecord    instance in the header, the value as payload
  type 103 CommitRecord    commit point in the header's instance field, no payload
  type 104 CheckpointRecord instance in the header, payload = sha256 digest (32) + size (<Q)

Segments. Every segment starts with a header: the summary of every record written before it,
as [CheckpointRecord(latest), if any] ViewRecord(highest view) CommitRecord(highest commit),
written in the same write as the first group that goes into the segment (never alone, except
when truncate_before needs a fresh segment: a log that was never written stays empty). So each
segment, on its own, folds to the log's view, commit point and checkpoint as of its end, and a
prefix of segments can be deleted once a checkpoint covers every value in them. The checkpoint
comes first so that a header cut short by a crash is recognisable from the segment alone (the
first records are a proper prefix of the pattern), and such a segment is never appended to.
Header records are pure repetition: folding them again changes nothing (maxima and the latest
checkpoint), so the fold of the log is the fold of everything appended.

Segment numbers are gap-free from the first segment on disk. A missing prefix is what
truncate_before leaves (accepted if the log holds a checkpoint, which truncation requires);
a missing segment between two present ones is corrupt_middle, as it always was.

Compression (compress_closed): a closed segment is compressed to wal-<seq>.log.zst (one zstd
frame, level 3, content size and content checksum), read back and compared, fsynced, the
directory fsynced, and only then is the .log unlinked (and the directory fsynced again). So a
.zst is complete before its .log is gone: if both exist (a crash in between), recovery uses the
.log and deletes the .zst; a .zst that does not decompress, or decompresses into anything but
whole valid records, is corrupt_middle (its bytes are kept aside, like any corrupt_middle).

Threads: no thread inside. append() only encodes into a memory buffer; sync() writes that
buffer with one os.write and fsyncs once. Two locks make it safe for the driver to run sync()
in a worker thread (asyncio.to_thread) while the loop keeps calling append(): append() holds
the buffer lock only to extend the buffer, sync() holds it only to take the buffer, and holds
a second lock for the write+fsync so that two concurrent sync() calls never reorder writes.
A third lock (a condition) guards the per-segment bookkeeping: sync() takes it briefly to
record what it wrote, compress_closed() and truncate_before() (worker threads: they read,
write, unlink and fsync whole files) take it only to claim a segment, to publish a change and
to wait for each other; the compression itself runs with no lock held. A segment is claimed
by one of them at a time (busy); truncate_before asks a compression of a segment it is about
to delete to give up and waits for it, and close() waits for both before it lets the
directory lock go.
"""
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ...protocol.records import (AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord,
                                 DurableState, ViewRecord)
from ..durable import fsync_dir
from .records import (_SEGMENT, StorageError, _Damaged, _decompress, _has_header, _replay,
                      _valid_record_after, encode_record, segment_name)
from .upkeep import Upkeep

log = logging.getLogger(__name__)

DURABILITY_MODES = ("fsync", "nosync", "memory")
LOCK_NAME = "LOCK"
CORRUPT_SUFFIX = ".corrupt"

# Damage kinds in RecoveryReport. A tail is what a crash during a write leaves behind and is
# expected; corrupt_middle means records that were once complete (and maybe acknowledged) are gone.
TORN_TAIL = "torn_tail"            # the last record is incomplete (or the file ends in zeros)
CORRUPT_TAIL = "corrupt_tail"      # the last record is complete but wrong (checksum, magic, type)
CORRUPT_MIDDLE = "corrupt_middle"  # damage with valid records or later segments after it


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


class WriteAheadLog(Upkeep):
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
        self.on_fsync = None      # called with each fsync's seconds (for a metric), under the sync lock
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
            started = time.perf_counter()
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail("fsync", exc)
            if self.on_fsync is not None:
                self.on_fsync(time.perf_counter() - started)
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
