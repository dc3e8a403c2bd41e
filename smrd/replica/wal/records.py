"""The write-ahead log's format on disk: records as smrd frames, segment files, and reading them
back (replay, indexing by headers, damage detection).

Owns: the record type codes and their encoding, segment names, and the pure functions that turn
bytes back into records or say where and why they stop. Never: opens, writes, locks or fsyncs a
file (smrd.replica.wal.log does), or decides what a record means for the protocol.
"""
import re
import struct

import zstandard

from ... import core
from ...errors import ProtocolError, SmrdError
from ...protocol.records import AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord, ViewRecord

VIEW, ACCEPT, DECIDE, COMMIT, CHECKPOINT = 100, 101, 102, 103, 104  # messages use 1..99

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
