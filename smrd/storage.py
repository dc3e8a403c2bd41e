# The replica's write-ahead log: the bytes, files and fsyncs behind `Ready.persist`.
#
# Owns: encoding durable records as smrd frames, segment files `wal-<seq>.log` in one directory,
# the directory lock, group commit (many append() calls, one fsync per sync()), and recovery:
# replaying the segments in order, cutting off a torn or corrupt tail and saying so.
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
#
# Threads: no thread inside. append() only encodes into a memory buffer; sync() writes that
# buffer with one os.write and fsyncs once. Two locks make it safe for the driver to run sync()
# in a worker thread (asyncio.to_thread) while the loop keeps calling append(): append() holds
# the buffer lock only to extend the buffer, sync() holds it only to take the buffer, and holds
# a second lock for the write+fsync so that two concurrent sync() calls never reorder writes.
import fcntl
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

from . import core
from .errors import ProtocolError, SmrdError
from .protocol.records import AcceptRecord, CommitRecord, DecideRecord, DurableState, ViewRecord

log = logging.getLogger(__name__)

VIEW, ACCEPT, DECIDE, COMMIT = 100, 101, 102, 103  # record types; messages use 1..99
DURABILITY_MODES = ("fsync", "nosync", "memory")
LOCK_NAME = "LOCK"
CORRUPT_SUFFIX = ".corrupt"

# Damage kinds in RecoveryReport. A tail is what a crash during a write leaves behind and is
# expected; corrupt_middle means records that were once complete (and maybe acknowledged) are gone.
TORN_TAIL = "torn_tail"            # the last record is incomplete (or the file ends in zeros)
CORRUPT_TAIL = "corrupt_tail"      # the last record is complete but wrong (checksum, magic, type)
CORRUPT_MIDDLE = "corrupt_middle"  # damage with valid records or later segments after it

_SEGMENT = re.compile(r"^wal-([0-9a-f]{16})\.log$")
_HEAD = struct.Struct("<2sBBHHQQII")  # the frame header, as documented in smrd/_core.pyi
_MAGIC = b"SM"
_MAX_PAYLOAD = 64 << 20


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
    if mtype in (VIEW, DECIDE, COMMIT):
        raise ProtocolError(f"malformed record of type {mtype}")
    raise ProtocolError(f"unknown record type {mtype}")


def _parse(data, off: int):
    """The record starting at data[off:], as (record, end), or (None, (torn, reason))."""
    rest = len(data) - off
    if rest < core.HEADER_SIZE:
        if bytes(data[off:off + 3]) != b"SM\x01"[:min(rest, 3)]:
            return None, (False, "bad magic in a partial header")
        return None, (True, f"partial header ({rest} of {core.HEADER_SIZE} bytes)")
    magic, version, _t, _s, _f, _v, _i, length, _c = _HEAD.unpack_from(data, off)
    if magic != _MAGIC or version != core.VERSION:
        return None, (False, f"bad magic/version {magic!r}/{version}")
    if length > _MAX_PAYLOAD:
        return None, (False, f"absurd payload length {length}")
    end = off + core.HEADER_SIZE + length
    if end > len(data):
        return None, (True, f"partial record ({rest} of {end - off} bytes)")
    try:
        return decode_record(data[off:end]), end
    except ProtocolError as exc:
        return None, (False, str(exc))


def _valid_record_after(data, start: int) -> bool:
    """Is there any valid record starting at or after `start`? Used only after damage, to tell
    a tail (nothing valid follows: a crash mid-write) from corruption in the middle. A value that
    happens to contain a whole valid frame can make a torn tail look like corrupt_middle: the
    error is on the side of alarm, never of silently dropping records that were complete."""
    pos = data.find(b"SM\x01", start)
    while pos >= 0:
        if _parse(data, pos)[0] is not None:
            return True
        pos = data.find(b"SM\x01", pos + 1)
    return False


# ----------------------------------------------------------------------------------------- log

class WriteAheadLog:
    """Segmented write-ahead log with group commit.

    open() -> (DurableState, RecoveryReport); then append(records) any number of times (cheap:
    memory only) and sync() to make everything appended before the call durable with one write
    and one fsync. durability: "fsync" (safe default), "nosync" (write to the OS, never fsync:
    survives a process crash, not a power loss), "memory" (nothing on disk: open() returns an
    empty state, append() and sync() do nothing)."""

    def __init__(self, directory: str, durability: str = "fsync", segment_bytes: int = 64 << 20):
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, "
                             f"not {durability!r}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be >= 1, not {segment_bytes}")
        self.directory = os.fspath(directory)
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.bytes_written = 0    # bytes handed to the OS
        self.records_written = 0  # records handed to the OS
        self.syncs = 0            # sync() calls that flushed a non-empty group
        self._fsync = durability == "fsync"
        self._memory = durability == "memory"
        self._buf = bytearray()
        self._buffered = 0        # records in _buf
        self._buf_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._lock_fd = -1
        self._fd = -1             # the active segment, O_APPEND
        self._seq = -1            # its sequence number
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

    def _segments(self) -> list:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise StorageError(f"cannot list log directory {self.directory}: {exc}") from exc
        found = sorted((int(m.group(1), 16), n) for n in names if (m := _SEGMENT.match(n)))
        return found

    def _recover(self):
        state = DurableState()
        report = RecoveryReport(self.directory, self.durability)
        segments = self._segments()
        for k, (seq, name) in enumerate(segments):
            path = os.path.join(self.directory, name)
            if k and seq != segments[k - 1][0] + 1:
                # A segment's name is made durable before its first byte is written, so a gap
                # is not a crash: someone removed a file. Everything from the gap on is suspect.
                self._cut(report, segments, k, 0, None, CORRUPT_MIDDLE,
                          f"segment(s) missing before {name}")
                break
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise StorageError(f"cannot read log segment {path}: {exc}") from exc
            off = 0
            while off < len(data):
                record, end = _parse(data, off)
                if record is None:
                    break
                state.add(record)
                report.records += 1
                off = end
            report.segments.append(name)
            report.bytes += off
            if off < len(data):
                torn, reason = end
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
        if self._fsync:
            self._fsync_dir()  # the names too, in case the last writer ran with "nosync"
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
        segments = self._segments()
        if segments:
            seq, name = segments[-1]
            size = os.path.getsize(os.path.join(self.directory, name))
            if size < self.segment_bytes:
                self._open_segment(seq, create=False)
                return
            self._open_segment(seq + 1, create=True)
        else:
            self._open_segment(0, create=True)

    def _open_segment(self, seq: int, create: bool) -> None:
        path = os.path.join(self.directory, f"wal-{seq:016x}.log")
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
        self._fd, self._seq, self._size = fd, seq, os.fstat(fd).st_size

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
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"fsync of log directory {self.directory} failed: {exc}") from exc

    # ------------------------------------------------------------------------ append / sync

    def append(self, records: Iterable) -> None:
        """Encode records after everything appended so far. Memory only: durable after sync()."""
        if self._memory:
            return
        # Encode everything first: a bad record raises before any byte of this call is buffered.
        frames = [encode_record(r) for r in records]
        with self._buf_lock:
            if self._state != "open":
                self._refuse()
            self._buf += b"".join(frames)
            self._buffered += len(frames)

    def sync(self) -> None:
        """Make every record appended before this call durable: one write, one fsync."""
        if self._memory:
            return
        with self._sync_lock:
            with self._buf_lock:
                if self._state != "open":
                    self._refuse()
                if not self._buf:
                    return
                data, count = self._buf, self._buffered
                self._buf, self._buffered = bytearray(), 0
            if self._size >= self.segment_bytes:
                # Roll between groups, so a segment always ends on a record boundary and the
                # segment being closed was fully fsynced by the sync() that wrote it.
                try:
                    self._open_segment(self._seq + 1, create=True)
                except StorageError as exc:
                    self._fail("creating a new segment", exc)
            self._write_all(data)
            if self._fsync:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self._fail("fsync", exc)
            self._size += len(data)
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

    # ------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Sync what was appended (if the log is healthy), then release files and the lock.
        Safe to call more than once and after a failure."""
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
            self._release()

    def _release(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)  # closing the lock file's last descriptor releases the flock
