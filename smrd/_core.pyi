# Typed surface of the hot path. Both twins (smrd/_core.pyx compiled, smrd/_core_py.py pure Python)
# implement exactly this; smrd/core.py picks one. Nothing here does I/O, reads clocks or logs.
#
# Wire frame (little-endian, HEADER_SIZE = 32 bytes, then `length` payload bytes):
#   0  magic    2s  b"SM"
#   2  version  u8  == VERSION (1)
#   3  type     u8  message type (meaning owned by smrd.protocol.messages)
#   4  sender   u16 replica/gateway id
#   6  flags    u16 reserved for the protocol (0 today)
#   8  view     u64
#   16 instance u64
#   24 length   u32 payload length; must equal len(data) - 32 and be <= max_payload
#   28 checksum u32 CRC-32 (zlib.crc32 polynomial) of bytes [0:28] followed by the payload
#
# Batch (little-endian): u32 count, u32 flags, u64 timestamp, then `count` entries of
#   u64 client_id, u64 seq, u32 length, payload[length]
from typing import Iterable, Iterator, List, Optional, Tuple, Union

Buffer = Union[bytes, bytearray, memoryview]

VERSION: int            # 1
HEADER_SIZE: int        # 32
BATCH_HEADER_SIZE: int  # 16
ENTRY_HEADER_SIZE: int  # 20
DEFAULT_MAX_PAYLOAD: int  # 64 MiB
IMPLEMENTATION: str     # "cython" or "python"

# ReplyCache.check results
NEW: int        # 0: never executed, execute it
DUPLICATE: int  # 1: executed; answer from the cache
TOO_OLD: int    # 2: at or below the client's floor; the reply was evicted: answer with an error

def crc32(data: Buffer, value: int = 0) -> int: ...

def encode_frame(mtype: int, sender: int, view: int, instance: int, payload: Buffer = b"",
                 flags: int = 0) -> bytes: ...
def decode_frame(data: Buffer, max_payload: int = ...) -> Tuple[int, int, int, int, int, memoryview]:
    """-> (mtype, sender, flags, view, instance, payload). payload is a zero-copy slice of data.
    Raises smrd.errors.ProtocolError on: short buffer, trailing bytes, bad magic, bad version,
    length > max_payload, bad checksum. Never anything else, never allocates more than len(data)."""

def peek_header(data: Buffer, offset: int = 0) -> Optional[Tuple[int, int, int, int, int, int]]:
    """-> (mtype, sender, flags, view, instance, payload length) of the frame header at
    data[offset:], or None if fewer than HEADER_SIZE bytes are there or the magic or version is
    not smrd's. Checks nothing else (not the checksum, not that the payload follows)."""

def pack_batch(entries: Iterable[Tuple[int, int, Buffer]], timestamp: int = 0, flags: int = 0) -> bytes: ...

class Batch:
    """A validated, zero-copy view of a packed batch. Construction walks the buffer once and
    raises ProtocolError on anything malformed (truncated entry, count that does not match,
    trailing bytes, absurd count). Accessors then cost O(1)."""
    timestamp: int
    flags: int
    nbytes: int
    def __init__(self, data: Buffer) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Tuple[int, int, memoryview]: ...  # IndexError outside range (negatives allowed)
    def __iter__(self) -> Iterator[Tuple[int, int, memoryview]]: ...
    def client_id(self, i: int) -> int: ...
    def seq(self, i: int) -> int: ...
    def payload(self, i: int) -> memoryview: ...

class BatchBuilder:
    """Accumulates entries up to max_count entries / max_bytes packed bytes. add() returns False
    (and adds nothing) when the entry would exceed a limit, except that an empty builder always
    accepts its first entry so one large request can still travel alone."""
    count: int
    nbytes: int  # packed size of what build() would return now
    def __init__(self, max_count: int, max_bytes: int) -> None: ...
    def add(self, client_id: int, seq: int, payload: Buffer) -> bool: ...
    def build(self, timestamp: int = 0, flags: int = 0) -> bytes: ...  # returns the batch and empties the builder

class QuorumTracker:
    """Per-instance vote counting for one view at a time. n <= 64 (votes are a bitmask)."""
    n: int
    quorum: int
    def __init__(self, n: int, quorum: int) -> None: ...  # ValueError unless 1 <= quorum <= n <= 64
    def add(self, instance: int, view: int, replica: int) -> bool:
        """True exactly once: when votes for (instance, view) first reach the quorum. A vote for an
        older view than the one tracked for that instance is ignored; a newer view restarts the
        count. Repeated votes count once. ValueError if replica is not in [0, n)."""
    def count(self, instance: int) -> int: ...
    def reached(self, instance: int) -> bool: ...
    def view_of(self, instance: int) -> int: ...  # -1 if not tracked
    def voters(self, instance: int) -> int: ...   # bitmask, 0 if not tracked
    def discard_below(self, instance: int) -> None: ...
    def __len__(self) -> int: ...  # instances tracked

class ReplyCache:
    """The exactly-once table: for each client the replies of its last k executed seqs.
    Evicting a seq raises the client's floor to it; seqs at or below the floor are TOO_OLD."""
    k: int
    def __init__(self, k: int) -> None: ...  # ValueError if k < 1
    def check(self, client_id: int, seq: int) -> int: ...  # NEW | DUPLICATE | TOO_OLD
    def get(self, client_id: int, seq: int) -> Optional[bytes]: ...  # None if absent or still pending
    def put(self, client_id: int, seq: int, reply: Optional[bytes], timestamp: int = 0) -> None:
        """Record seq as executed with this reply (None = executing, filled by a later put).
        The client's last-active time becomes max(old, timestamp)."""
    def floor(self, client_id: int) -> int: ...  # 0 for an unknown client
    def last_active(self, client_id: int) -> int: ...  # -1 for an unknown client
    def expire(self, older_than: int) -> int: ...  # forget clients last active before it; returns count
    def __len__(self) -> int: ...  # clients known
    def __contains__(self, client_id: int) -> bool: ...
    def clients(self) -> list: ...  # sorted client ids (for snapshots and tests)


class CloseRun:
    """What one CloseLink.exchange call did (close framing; read by the app adapter)."""
    stop: bool
    connections: int
    timed_out: bool
    failed: Optional[Tuple[str, object]]  # ("connect", errno or text), ("connect-timeout", None), ("closed", None)
    lost: Optional[Tuple[str, object]]    # ("timeout", None), ("error", errno), ("too-large", bytes received)
    raised: Optional[BaseException]       # what check raised (nothing was written)

    def __init__(self) -> None: ...


class CloseLink:
    """Close framing's connections to the app: one per request, strictly one at a time, the next
    opened ahead and written only after the previous reply is complete (the one part of _core
    that does I/O; it runs without the GIL)."""

    def __init__(self, addresses: Iterable[Tuple[str, int]], timeout_s: float, max_reply: int,
                 recheck_s: float = 0.05, ahead: bool = True) -> None: ...
    def exchange(self, requests: List[bytes], replies: List[bytes], run: CloseRun,
                 check: Optional[object] = None) -> None: ...
