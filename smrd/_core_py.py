"""The pure-Python twin of smrd._core: framing, batching, quorum counting and the reply cache in
plain Python (struct + zlib), and close framing's exchanges with the app (CloseLink, CloseRun).
It is the reference the compiled twin is checked against and what the deterministic simulator
runs on, so it must stay exact and reasonably fast.
Never: I/O, clocks, logging, randomness, or behaviour that the Cython twin does not share
(tests/unit/test_core_twins.py compares the two on random inputs: results, exception types,
and the exact messages of the errors smrd words itself). The one exception to "no I/O" and "no
clocks" is CloseLink, the app adapter's close-mode worker loop, kept at the end of this file and
of the compiled twin (smrd/_core_close.pxi, which says why it lives there); nothing else here
calls it (tests/unit/test_close_link.py runs both twins against the same apps).
"""
from __future__ import annotations

import errno as _errno
import operator
import select as _select
import socket as _socket
import struct
import time as _time
import zlib
from heapq import heappop, heappush
from typing import Iterable, Iterator, Optional, Tuple

from .errors import ProtocolError

__all__ = [
    "VERSION", "HEADER_SIZE", "BATCH_HEADER_SIZE", "ENTRY_HEADER_SIZE", "DEFAULT_MAX_PAYLOAD",
    "IMPLEMENTATION", "NEW", "DUPLICATE", "TOO_OLD",
    "crc32", "encode_frame", "decode_frame", "peek_header", "pack_batch",
    "Batch", "BatchBuilder", "QuorumTracker", "ReplyCache",
]

IMPLEMENTATION = "python"
VERSION = 1
HEADER_SIZE = 32
BATCH_HEADER_SIZE = 16
ENTRY_HEADER_SIZE = 20
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024

NEW = 0
DUPLICATE = 1
TOO_OLD = 2

_MAGIC = b"SM"
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

# Compiled once: struct.Struct caches the parsed format, the module-level functions re-parse.
_FRAME_HEAD = struct.Struct("<2sBBHHQQI")  # bytes [0:28], the part the checksum covers first
_FRAME = struct.Struct("<2sBBHHQQII")      # the whole 32-byte header
_U32 = struct.Struct("<I")
_BATCH_HEAD = struct.Struct("<IIQ")
_ENTRY_HEAD = struct.Struct("<QQI")
_zcrc32 = zlib.crc32


def _uint(name: str, value, bits: int) -> int:
    """The slow path behind struct.error: say which argument is wrong and how, with the exception
    types the compiled twin raises (TypeError for non-integers, OverflowError for out of range)."""
    value = operator.index(value)
    if not 0 <= value < (1 << bits):
        raise OverflowError(f"{name}={value} does not fit in an unsigned {bits}-bit field")
    return value


def _u64(name: str, value) -> None:
    # State tables must never hold a key the wire format cannot carry.
    if not 0 <= value <= _U64_MAX:
        raise OverflowError(f"{name}={value} does not fit in an unsigned 64-bit field")


def _byte_view(data) -> memoryview:
    """A flat view of data counted in bytes. Other formats are cast so that offsets and lengths
    are byte counts; non-contiguous buffers fail here (TypeError), as in the compiled twin."""
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
        mv = mv.cast("B")
    return mv


def _nbytes(payload) -> int:
    if type(payload) is bytes or type(payload) is bytearray:
        return len(payload)
    return memoryview(payload).nbytes


def crc32(data, value: int = 0) -> int:
    return _zcrc32(data, value)


# ---------------------------------------------------------------------------------------- framing

def encode_frame(mtype: int, sender: int, view: int, instance: int, payload=b"",
                 flags: int = 0) -> bytes:
    n = _nbytes(payload)
    try:
        head = _FRAME_HEAD.pack(_MAGIC, VERSION, mtype, sender, flags, view, instance, n)
    except struct.error:
        _uint("mtype", mtype, 8)
        _uint("sender", sender, 16)
        _uint("flags", flags, 16)
        _uint("view", view, 64)
        _uint("instance", instance, 64)
        _uint("payload length", n, 32)
        raise
    return b"".join((head, _U32.pack(_zcrc32(payload, _zcrc32(head))), payload))


def decode_frame(data, max_payload: int = DEFAULT_MAX_PAYLOAD):
    if max_payload < 0:
        raise ValueError(f"max_payload must be >= 0, not {max_payload}")
    mv = _byte_view(data)
    size = len(mv)
    if size < HEADER_SIZE:
        raise ProtocolError(f"short frame: {size} bytes, the header alone needs {HEADER_SIZE}")
    magic, version, mtype, sender, flags, view, instance, length, checksum = _FRAME.unpack_from(mv)
    if magic != _MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {_MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"bad version {version}, expected {VERSION}")
    if length > max_payload:
        raise ProtocolError(f"payload length {length} exceeds max_payload {max_payload}")
    have = size - HEADER_SIZE
    if have < length:
        raise ProtocolError(f"truncated frame: header says {length} payload bytes, got {have}")
    if have > length:
        raise ProtocolError(
            f"trailing bytes: header says {length} payload bytes, got {have} ({have - length} extra)")
    payload = mv[HEADER_SIZE:]
    actual = _zcrc32(payload, _zcrc32(mv[:28]))
    if actual != checksum:
        raise ProtocolError(f"bad checksum: header says 0x{checksum:08x}, computed 0x{actual:08x}")
    return mtype, sender, flags, view, instance, payload


def peek_header(data, offset: int = 0):
    if offset < 0:
        return None
    mv = _byte_view(data)
    if len(mv) - offset < HEADER_SIZE:
        return None
    magic, version, mtype, sender, flags, view, instance, length, _ = _FRAME.unpack_from(mv, offset)
    if magic != _MAGIC or version != VERSION:
        return None
    return mtype, sender, flags, view, instance, length


# --------------------------------------------------------------------------------------- batching

def _bad_entry(entries_list) -> None:
    # Re-walk after a struct.error to raise the precise exception the compiled twin raises.
    for entry in entries_list:
        client_id, seq, payload = entry
        _uint("client_id", client_id, 64)
        _uint("seq", seq, 64)
        _uint("payload length", _nbytes(payload), 32)


def pack_batch(entries: Iterable[Tuple[int, int, object]], timestamp: int = 0,
               flags: int = 0) -> bytes:
    if not isinstance(entries, (list, tuple)):
        entries = list(entries)
    pack = _ENTRY_HEAD.pack
    parts = [b""]
    append = parts.append
    try:
        for client_id, seq, payload in entries:
            if type(payload) is bytes:
                append(pack(client_id, seq, len(payload)))
            else:
                append(pack(client_id, seq, _nbytes(payload)))
            append(payload)
        # Counted from what was packed: a list mutated while packing must still yield a batch
        # whose count matches its entries.
        count = (len(parts) - 1) >> 1
        parts[0] = _BATCH_HEAD.pack(count, flags, timestamp)
    except struct.error:
        _bad_entry(entries)
        _uint("count", (len(parts) - 1) >> 1, 32)
        _uint("flags", flags, 32)
        _uint("timestamp", timestamp, 64)
        raise
    return b"".join(parts)


class Batch:
    """A validated, zero-copy view of a packed batch (see smrd/_core.pyi)."""

    __slots__ = ("_entries", "timestamp", "flags", "nbytes")

    def __init__(self, data) -> None:
        mv = _byte_view(data)
        size = len(mv)
        if size < BATCH_HEADER_SIZE:
            raise ProtocolError(
                f"short batch: {size} bytes, the header alone needs {BATCH_HEADER_SIZE}")
        count, self.flags, self.timestamp = _BATCH_HEAD.unpack_from(mv)
        self.nbytes = size
        # Every entry takes at least its header, so a larger count is a lie: refuse it before
        # allocating anything sized by it.
        if count > (size - BATCH_HEADER_SIZE) // ENTRY_HEADER_SIZE:
            raise ProtocolError(f"absurd batch count {count} for a {size}-byte batch")
        unpack = _ENTRY_HEAD.unpack_from
        entries = []
        append = entries.append
        pos = BATCH_HEADER_SIZE
        for i in range(count):
            if size - pos < ENTRY_HEADER_SIZE:
                raise ProtocolError(
                    f"truncated entry {i}: header needs {ENTRY_HEADER_SIZE} bytes, "
                    f"{size - pos} remain")
            client_id, seq, length = unpack(mv, pos)
            pos += ENTRY_HEADER_SIZE
            end = pos + length
            if end > size:
                raise ProtocolError(
                    f"truncated entry {i}: says {length} payload bytes, {size - pos} remain")
            append((client_id, seq, mv[pos:end]))
            pos = end
        if pos != size:
            raise ProtocolError(f"trailing bytes: {size - pos} after {count} entries")
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int):
        try:
            return self._entries[operator.index(i)]
        except IndexError:
            raise IndexError("batch index out of range") from None

    def __iter__(self) -> Iterator[Tuple[int, int, memoryview]]:
        return iter(self._entries)

    def client_id(self, i: int) -> int:
        return self[i][0]

    def seq(self, i: int) -> int:
        return self[i][1]

    def payload(self, i: int) -> memoryview:
        return self[i][2]

    def __repr__(self) -> str:
        return (f"<Batch {len(self._entries)} entries, {self.nbytes} bytes, "
                f"timestamp={self.timestamp}>")


class BatchBuilder:
    """Accumulates entries up to max_count entries / max_bytes packed bytes (see smrd/_core.pyi).
    Payloads are copied at add() so callers may reuse their buffers."""

    __slots__ = ("_buf", "count", "max_count", "max_bytes")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        max_count = operator.index(max_count)
        max_bytes = operator.index(max_bytes)
        if not 1 <= max_count <= _U32_MAX:
            raise ValueError(f"max_count must be in [1, {_U32_MAX}], not {max_count}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        # The batch header is patched in at build(); keeping its room here avoids a second copy.
        self._buf = bytearray(BATCH_HEADER_SIZE)

    @property
    def nbytes(self) -> int:
        return len(self._buf)

    def add(self, client_id: int, seq: int, payload) -> bool:
        n = _nbytes(payload)
        try:
            head = _ENTRY_HEAD.pack(client_id, seq, n)
        except struct.error:
            _uint("client_id", client_id, 64)
            _uint("seq", seq, 64)
            _uint("payload length", n, 32)
            raise
        buf = self._buf
        if self.count and (self.count >= self.max_count
                           or len(buf) + ENTRY_HEADER_SIZE + n > self.max_bytes):
            return False
        buf += head
        buf += payload
        self.count += 1
        return True

    def build(self, timestamp: int = 0, flags: int = 0) -> bytes:
        buf = self._buf
        try:
            _BATCH_HEAD.pack_into(buf, 0, self.count, flags, timestamp)
        except struct.error:
            _uint("flags", flags, 32)
            _uint("timestamp", timestamp, 64)
            raise
        out = bytes(buf)
        self._buf = bytearray(BATCH_HEADER_SIZE)
        self.count = 0
        return out


# ------------------------------------------------------------------------------------ quorum votes

class QuorumTracker:
    """Per-instance vote counting for one view at a time (see smrd/_core.pyi).
    Each instance maps to [view, voters bitmask, count, done]."""

    __slots__ = ("_votes", "n", "quorum")

    def __init__(self, n: int, quorum: int) -> None:
        n = operator.index(n)
        quorum = operator.index(quorum)
        if not 1 <= quorum <= n <= 64:
            raise ValueError(f"need 1 <= quorum <= n <= 64, got n={n}, quorum={quorum}")
        self.n = n
        self.quorum = quorum
        self._votes: dict = {}

    def add(self, instance: int, view: int, replica: int) -> bool:
        if not 0 <= replica < self.n:
            raise ValueError(f"replica {replica} is not in [0, {self.n})")
        if not 0 <= instance <= _U64_MAX:
            _u64("instance", instance)
        if not 0 <= view <= _U64_MAX:
            _u64("view", view)
        bit = 1 << replica
        rec = self._votes.get(instance)
        if rec is None or view > rec[0]:
            done = self.quorum <= 1
            self._votes[instance] = [view, bit, 1, done]
            return done
        if view < rec[0] or rec[1] & bit:
            return False
        rec[1] |= bit
        rec[2] += 1
        if not rec[3] and rec[2] >= self.quorum:
            rec[3] = True
            return True
        return False

    def count(self, instance: int) -> int:
        rec = self._votes.get(instance)
        return 0 if rec is None else rec[2]

    def reached(self, instance: int) -> bool:
        rec = self._votes.get(instance)
        return False if rec is None else rec[3]

    def view_of(self, instance: int) -> int:
        rec = self._votes.get(instance)
        return -1 if rec is None else rec[0]

    def voters(self, instance: int) -> int:
        rec = self._votes.get(instance)
        return 0 if rec is None else rec[1]

    def discard_below(self, instance: int) -> None:
        votes = self._votes
        for key in [key for key in votes if key < instance]:
            del votes[key]

    def __len__(self) -> int:
        return len(self._votes)


# ------------------------------------------------------------------------------------- reply cache

class _Client:
    # replies: seq -> reply (None while executing); heap: the same seqs, for O(log k) eviction of
    # the lowest even when seqs arrive out of order.
    __slots__ = ("replies", "heap", "floor", "last_active")

    def __init__(self, last_active: int) -> None:
        self.replies: dict = {}
        self.heap: list = []
        self.floor = 0
        self.last_active = last_active


class ReplyCache:
    """The exactly-once table (see smrd/_core.pyi). Seqs start at 1: a client's floor starts at 0
    and everything at or below the floor is TOO_OLD."""

    __slots__ = ("_clients", "k")

    def __init__(self, k: int) -> None:
        k = operator.index(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        self.k = k
        self._clients: dict = {}

    def check(self, client_id: int, seq: int) -> int:
        if not 0 <= seq <= _U64_MAX:
            _u64("seq", seq)
        if not 0 <= client_id <= _U64_MAX:
            _u64("client_id", client_id)
        c = self._clients.get(client_id)
        if c is None:
            return NEW if seq else TOO_OLD
        if seq in c.replies:
            return DUPLICATE
        return TOO_OLD if seq <= c.floor else NEW

    def get(self, client_id: int, seq: int) -> Optional[bytes]:
        c = self._clients.get(client_id)
        return None if c is None else c.replies.get(seq)

    def put(self, client_id: int, seq: int, reply: Optional[bytes], timestamp: int = 0) -> None:
        if not 0 <= seq <= _U64_MAX:
            _u64("seq", seq)
        if not 0 <= client_id <= _U64_MAX:
            _u64("client_id", client_id)
        if not 0 <= timestamp <= _U64_MAX:
            _u64("timestamp", timestamp)
        c = self._clients.get(client_id)
        floor = 0 if c is None else c.floor
        if seq <= floor:
            raise ValueError(
                f"seq {seq} of client {client_id} is at or below its floor {floor} (TOO_OLD)")
        if c is None:
            c = self._clients[client_id] = _Client(timestamp)
        elif timestamp > c.last_active:
            c.last_active = timestamp
        replies = c.replies
        if seq in replies:
            replies[seq] = reply
            return
        replies[seq] = reply
        heappush(c.heap, seq)
        if len(replies) > self.k:
            low = heappop(c.heap)
            del replies[low]
            c.floor = low

    def floor(self, client_id: int) -> int:
        c = self._clients.get(client_id)
        return 0 if c is None else c.floor

    def last_active(self, client_id: int) -> int:
        c = self._clients.get(client_id)
        return -1 if c is None else c.last_active

    def expire(self, older_than: int) -> int:
        if not 0 <= older_than <= _U64_MAX:
            _u64("older_than", older_than)
        clients = self._clients
        dead = [cid for cid, c in clients.items() if c.last_active < older_than]
        for cid in dead:
            del clients[cid]
        return len(dead)

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._clients

    def clients(self) -> list:
        return sorted(self._clients)

    def entries(self, client_id: int) -> list:
        """The client's kept (seq, reply) pairs in seq order (for checkpoints)."""
        c = self._clients.get(client_id)
        return [] if c is None else sorted(c.replies.items())

    def restore_client(self, client_id: int, floor: int, last_active: int, entries) -> None:
        """Replace one client's whole state (from a checkpoint)."""
        self._clients.pop(client_id, None)
        c = self._clients[client_id] = _Client(last_active)
        for seq, reply in entries:
            self.put(client_id, seq, reply)
        c.floor = floor


# ---------------------------------------------------------------- close framing's exchanges
# The twin of smrd/_core_close.pxi, step for step (its comments say why each step is there).

_MAX_ADDRS = 8
_MAX_INODES = 8
_TCP_LISTEN = 10
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_HDR = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBBI")          # inet_diag_req_v2 up to its socket id
_DIAG_PORTS = struct.Struct(">HH")           # idiag_sport, idiag_dport (network order)
_DIAG_TAIL = struct.Struct("=III")           # idiag_if, idiag_cookie[2]
_DIAG_MSG_LEN = 72                           # sizeof(struct inet_diag_msg)
_DIAG_INODE = struct.Struct("=I")            # inet_diag_msg.idiag_inode, at byte 68
_NOCOOKIE = 0xFFFFFFFF
_LINGER_RESET = struct.pack("ii", 1, 0)
_NONBLOCK_STREAM = _socket.SOCK_STREAM | getattr(_socket, "SOCK_NONBLOCK", 0) | \
    getattr(_socket, "SOCK_CLOEXEC", 0)
_SEND_FLAGS = getattr(_socket, "MSG_NOSIGNAL", 0)
_PEEK = _socket.MSG_PEEK | getattr(_socket, "MSG_DONTWAIT", 0)
_now = _time.monotonic


class CloseRun:
    """What one CloseLink.exchange() call did (its fields: smrd/_core_close.pxi)."""

    __slots__ = ("stop", "connections", "timed_out", "failed", "lost", "raised")

    def __init__(self) -> None:
        self.stop = False
        self.connections = 0
        self.timed_out = False
        self.failed = None
        self.lost = None
        self.raised = None


def _wait(sock, events: int, deadline: float) -> int:
    """poll() events on sock until deadline: the events seen, 0 when the deadline passed."""
    poller = _select.poll()
    poller.register(sock, events)
    while True:
        left = deadline - _now()
        ms = 0 if left <= 0 else int(left * 1000.0 + 0.999)
        try:
            ready = poller.poll(ms)
        except InterruptedError:
            continue
        return ready[0][1] if ready else 0


def _start_connect(family: int, sockaddr):
    """(a non-blocking socket with its connect started, None) or (None, errno)."""
    try:
        sock = _socket.socket(family, _NONBLOCK_STREAM)
    except OSError as exc:
        return None, exc.errno if exc.errno is not None else str(exc)
    sock.setblocking(False)
    err = sock.connect_ex(sockaddr)
    if err in (0, _errno.EINPROGRESS, _errno.EINTR):
        return sock, None
    sock.close()
    return None, err


def _connected(sock, deadline: float):
    """True once the connect completed, False if not by deadline, else its errno."""
    try:
        if not _wait(sock, _select.POLLOUT, deadline):
            return False
        err = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
    except OSError as exc:
        return exc.errno if exc.errno is not None else str(exc)
    return True if err == 0 else err


def _discard(sock) -> None:
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def _closed_at_once(sock) -> bool:
    try:
        return not sock.recv(1, _PEEK)
    except BlockingIOError:
        return False
    except InterruptedError:
        return _closed_at_once(sock)
    except OSError:
        return True


def _reached(link, nl, family: int, host: bytes, port: int, scope: int):
    """(inode, state) of the socket a new connection to host:port would reach now, or None."""
    link._seq = seq = (link._seq + 1) & 0xFFFFFFFF
    body = (_DIAG_REQ.pack(family, _socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + _DIAG_PORTS.pack(port, 0) + host.ljust(16, b"\0") + host.ljust(16, b"\0")
            + _DIAG_TAIL.pack(scope, _NOCOOKIE, _NOCOOKIE))
    try:
        nl.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _SOCK_DIAG_BY_FAMILY, 1, seq, 0)
                + body)
        for _ in range(4):
            data = nl.recv(8192, _socket.MSG_DONTWAIT)
            if len(data) < _NLMSG_HDR.size:
                return None
            length, kind, _, got, _ = _NLMSG_HDR.unpack_from(data)
            if length < _NLMSG_HDR.size or length > len(data):
                return None
            if got != seq:
                continue
            if kind != _SOCK_DIAG_BY_FAMILY or length < _NLMSG_HDR.size + _DIAG_MSG_LEN:
                return None
            start = _NLMSG_HDR.size
            return _DIAG_INODE.unpack_from(data, start + 68)[0], data[start + 1]
    except OSError:
        return None
    return None


def _send_request(sock, request: bytes, deadline: float):
    """(0, None) written and half-closed, (1, None) timed out, (-1, errno) failed."""
    view = memoryview(request)
    off = 0
    try:
        while off < len(request):
            try:
                off += sock.send(view[off:], _SEND_FLAGS)
                continue
            except BlockingIOError:
                pass
            except InterruptedError:
                continue
            if _now() >= deadline or not _wait(sock, _select.POLLOUT, deadline):
                return 1, None
        sock.shutdown(_socket.SHUT_WR)
    except OSError as exc:
        return -1, exc.errno if exc.errno is not None else str(exc)
    return 0, None


def _read_reply(sock, max_reply: int, deadline: float):
    """(0, reply), (1, None) timed out, (2, bytes received) too large, (-1, errno) failed."""
    buf = bytearray()
    try:
        if not _wait(sock, _select.POLLIN, deadline):
            return 1, None
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                if _now() >= deadline or not _wait(sock, _select.POLLIN, deadline):
                    return 1, None
                continue
            except InterruptedError:
                continue
            if not data:
                return 0, bytes(buf)
            buf += data
            if len(buf) > max_reply:
                return 2, len(buf)
            if _now() >= deadline:
                return 1, None
    except OSError as exc:
        return -1, exc.errno if exc.errno is not None else str(exc)


def _trusted(spec):
    """The listening-socket inodes spec vouches for, or None (ask the check again)."""
    if spec is None:
        return None
    try:
        items = list(spec)
        if len(items) > _MAX_INODES or any(type(i) is not int or i < 0 for i in items):
            return None
    except Exception:
        return None
    return frozenset(items)


class CloseLink:
    """Close framing's exchanges with one app (the contract: smrd/_core_close.pxi)."""

    def __init__(self, addresses, timeout_s: float, max_reply: int, recheck_s: float = 0.05,
                 ahead: bool = True) -> None:
        addresses = list(addresses)
        if not 0 < len(addresses) <= _MAX_ADDRS:
            raise ValueError(f"between 1 and {_MAX_ADDRS} addresses, not {len(addresses)}")
        timeout_s = float(timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        max_reply = operator.index(max_reply)
        if max_reply < 0:
            raise ValueError(f"max_reply must be non-negative, not {max_reply!r}")
        self._targets = []
        for family, sockaddr in addresses:
            host = _socket.inet_pton(family, sockaddr[0].split("%")[0])
            if family not in (_socket.AF_INET, _socket.AF_INET6):
                raise ValueError(f"address family {family!r} is neither AF_INET nor AF_INET6")
            scope = sockaddr[3] if family == _socket.AF_INET6 else 0
            self._targets.append((int(family), sockaddr, host, sockaddr[1], scope))
        self.addresses = addresses
        self.timeout_s = timeout_s
        self.max_reply = max_reply
        self.recheck_s = float(recheck_s)
        self.ahead = bool(ahead)
        self._seq = 0

    def exchange(self, requests, replies: list, run: CloseRun, check=None) -> None:
        """As the compiled twin's (smrd/_core_close.pxi)."""
        todo = tuple(requests[len(replies):])
        if not todo:
            return
        for request in todo:
            if type(request) is not bytes:
                raise TypeError(f"requests must be bytes, not {type(request).__name__}")
        timeout = self.timeout_s
        out = []
        sock = nxt = nl = used = None
        trusted, trusted_until = None, 0.0
        try:
            i = 0
            while i < len(todo) and not run.stop:
                sock, fresh = None, False
                if nxt is not None:
                    if _connected(nxt, 0.0) is True:
                        sock = nxt
                    else:
                        _discard(nxt)
                    nxt = None
                if sock is None:
                    fresh = True
                    why = None  # None: no address answered in time
                    for target in self._targets:
                        deadline = _now() + timeout
                        candidate, why = _start_connect(target[0], target[1])
                        if candidate is None:
                            continue
                        state = _connected(candidate, deadline)
                        if state is True:
                            sock, used = candidate, target
                            break
                        _discard(candidate)
                        why = None if state is False else state
                    if sock is None:
                        if why is None:
                            run.timed_out = True
                            run.failed = ("connect-timeout", None)
                        else:
                            run.failed = ("connect", why)
                        break
                run.connections += 1
                if check is not None:
                    ok = False
                    if trusted is not None and _now() < trusted_until:
                        if nl is None:
                            try:
                                nl = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW
                                                    | getattr(_socket, "SOCK_CLOEXEC", 0),
                                                    _NETLINK_SOCK_DIAG)
                            except (OSError, AttributeError):
                                nl = False
                        found = _reached(self, nl, used[0], used[2], used[3], used[4]) if nl \
                            else None
                        ok = found is not None and found[1] == _TCP_LISTEN and found[0] in trusted
                    if not ok:
                        try:
                            spec = check()
                        except BaseException as exc:
                            run.raised = exc
                            _discard(sock)
                            sock = None
                            break
                        trusted, trusted_until = _trusted(spec), _now() + self.recheck_s
                if _closed_at_once(sock):
                    _discard(sock)
                    sock = None
                    if fresh:
                        run.failed = ("closed", None)
                        break
                    continue
                if run.stop:
                    _discard(sock)
                    sock = None
                    break
                deadline = _now() + timeout
                code, detail = _send_request(sock, todo[i], deadline)
                if code == 0:
                    if self.ahead and i + 1 < len(todo) and not run.stop:
                        nxt, _ = _start_connect(used[0], used[1])
                    code, detail = _read_reply(sock, self.max_reply, deadline)
                sock.close()
                sock = None
                if code != 0:
                    if code == 1:
                        run.timed_out = True
                        run.lost = ("timeout", None)
                    elif code == 2:
                        run.lost = ("too-large", detail)
                    else:
                        run.lost = ("error", detail)
                    break
                out.append(detail)
                i += 1
        finally:
            if sock is not None:
                _discard(sock)
            if nxt is not None:
                _discard(nxt)
            if nl:
                nl.close()
            replies += out
