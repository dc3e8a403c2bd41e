"""The protocol's messages and their wire encoding. Every message travels as one smrd frame
(smrd.core.encode_frame: versioned header + checksum); lists of entries reuse the batch layout
(smrd.core.pack_batch) with (instance, view, value) in place of (client_id, seq, payload).
This module owns message types and codecs; it never decides what to send.
"""
import hashlib
import struct
from dataclasses import dataclass
from typing import Tuple

from .. import core
from ..errors import ProtocolError

# Message type codes (the frame header's `type`). Never reuse a retired number.
REQUESTS = 1           # gateway -> replica: a batch of client requests
REPLIES = 2            # replica -> gateway: a batch of (client_id, seq, reply)
REPLY_ERRORS = 3       # replica -> gateway: a batch of (client_id, seq, error code + text)
DIVERGED = 4           # gateway -> replica: your replies to these disagree with a majority's
PROPOSE = 10           # leader -> replica: value for an instance, and the leader's commit point
ACCEPTED = 11          # replica -> leader: accepted instances [instance, instance + count)
COMMIT = 12            # leader -> replica: everything up to `commit` is decided (also heartbeat)
ACK = 13               # replica -> leader: answer to a heartbeat (the leader's quorum contact)
START_VIEW_CHANGE = 20 # any -> all: move to `view`
DO_VIEW_CHANGE = 21    # any -> leader(view): my promise for `view` and what I accepted
START_VIEW = 22        # leader(view) -> all: the view's log above its commit point
RECOVERY = 23          # empty replica -> all: what do you know? (it votes on nothing until told)
RECOVERY_RESPONSE = 24 # any -> recovering replica: my view, commit point, and (leader) my log
PRE_VIEW_CHANGE = 25   # voter -> voters: I miss the leader of `view`; do you? (moves nobody)
PRE_VIEW_CHANGE_OK = 26  # voter -> asker: I miss it too
CATCHUP_REQUEST = 30   # lagging -> peer: send me decided values from `start`
CATCHUP_REPLY = 31     # peer -> lagging: decided values, and the peer's commit point
LOG_TRUNCATED = 32     # peer -> lagging: I hold no values before `checkpoint`: fetch my state
FORWARD = 40           # follower -> leader: requests that waited too long for order
STATUS_REQUEST = 50    # operator/test -> replica (gateway port): describe yourself
STATUS_REPLY = 51      # replica -> asker: JSON status
# State transfer (driver to driver; the protocol core never sees these, see smrd/replica/state_transfer.py)
STATE_QUERY = 60       # lagging -> all: which checkpoints do you hold?
STATE_INFO = 61        # peer -> lagging: (instance, size, sha256) of each stored checkpoint
STATE_CHUNK_REQUEST = 62  # lagging -> peer: bytes [offset, offset + length) of checkpoint `instance`
STATE_CHUNK = 63       # peer -> lagging: those bytes, and the file's total size

# Sentinel "accepted view" marking an entry its sender knows to be decided.
DECIDED_VIEW = (1 << 64) - 1


class Message:
    __slots__ = ()
    TYPE = 0


@dataclass(frozen=True, slots=True)
class Requests(Message):
    batch: bytes
    # Sent to this replica alone because the gateway takes it for the leader (the frame's view
    # field is 1): a follower passes such requests on to its leader at once.
    directed: bool = False
    TYPE = REQUESTS


@dataclass(frozen=True, slots=True)
class Forward(Message):
    batch: bytes
    TYPE = FORWARD


@dataclass(frozen=True, slots=True)
class Replies(Message):
    batch: bytes
    TYPE = REPLIES


@dataclass(frozen=True, slots=True)
class ReplyErrors(Message):
    batch: bytes
    TYPE = REPLY_ERRORS


@dataclass(frozen=True, slots=True)
class Diverged(Message):
    # (client_id, seq, reply_digest of the majority's reply + one byte: how many replicas gave it)
    batch: bytes
    TYPE = DIVERGED


def reply_digest(reply) -> bytes:
    """What Diverged carries of a reply: 16 bytes of blake2b (replies may be megabytes)."""
    return hashlib.blake2b(reply, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Propose(Message):
    view: int
    instance: int
    value: bytes
    commit: int
    TYPE = PROPOSE


@dataclass(frozen=True, slots=True)
class Accepted(Message):
    view: int
    instance: int
    count: int = 1
    TYPE = ACCEPTED


@dataclass(frozen=True, slots=True)
class Commit(Message):
    view: int
    commit: int
    TYPE = COMMIT


@dataclass(frozen=True, slots=True)
class Ack(Message):
    view: int
    commit: int
    TYPE = ACK


@dataclass(frozen=True, slots=True)
class StartViewChange(Message):
    view: int
    TYPE = START_VIEW_CHANGE


@dataclass(frozen=True, slots=True)
class PreViewChange(Message):
    view: int
    TYPE = PRE_VIEW_CHANGE


@dataclass(frozen=True, slots=True)
class PreViewChangeOk(Message):
    view: int
    TYPE = PRE_VIEW_CHANGE_OK


@dataclass(frozen=True, slots=True)
class DoViewChange(Message):
    view: int
    commit: int
    entries: Tuple[Tuple[int, int, bytes], ...]  # (instance, accepted view or DECIDED_VIEW, value)
    TYPE = DO_VIEW_CHANGE


@dataclass(frozen=True, slots=True)
class StartView(Message):
    view: int
    commit: int
    entries: Tuple[Tuple[int, bytes], ...]       # (instance, value), consecutive from commit + 1
    TYPE = START_VIEW


@dataclass(frozen=True, slots=True)
class Recovery(Message):
    nonce: int
    TYPE = RECOVERY


@dataclass(frozen=True, slots=True)
class RecoveryResponse(Message):
    view: int
    nonce: int
    commit: int
    primary: bool          # the sender leads `view` and is in normal status
    empty: bool            # the sender has never held anything (view 0, empty log)
    entries: Tuple[Tuple[int, bytes], ...]  # primary only: (instance, value) above commit
    membership: bytes = b""  # the sender's applied membership (Membership.encode())
    TYPE = RECOVERY_RESPONSE


@dataclass(frozen=True, slots=True)
class CatchupRequest(Message):
    view: int
    start: int
    TYPE = CATCHUP_REQUEST


@dataclass(frozen=True, slots=True)
class CatchupReply(Message):
    view: int
    commit: int
    entries: Tuple[Tuple[int, bytes], ...]       # (instance, decided value), consecutive
    TYPE = CATCHUP_REPLY


@dataclass(frozen=True, slots=True)
class LogTruncated(Message):
    view: int
    checkpoint: int       # the sender's log starts after this instance (its latest checkpoint)
    TYPE = LOG_TRUNCATED


@dataclass(frozen=True, slots=True)
class StateQuery(Message):
    nonce: int
    TYPE = STATE_QUERY


@dataclass(frozen=True, slots=True)
class StateInfo(Message):
    nonce: int
    checkpoints: Tuple[Tuple[int, int, bytes], ...]  # (instance, file size, sha256 of content)
    TYPE = STATE_INFO


@dataclass(frozen=True, slots=True)
class StateChunkRequest(Message):
    instance: int
    offset: int
    length: int
    TYPE = STATE_CHUNK_REQUEST


@dataclass(frozen=True, slots=True)
class StateChunk(Message):
    instance: int
    offset: int
    total: int            # the checkpoint file's size; 0 with no data: "I no longer have it"
    data: bytes
    TYPE = STATE_CHUNK


STATE_MESSAGES = (StateQuery, StateInfo, StateChunkRequest, StateChunk)

_U64 = (1 << 64) - 1
_CKPT_INFO = struct.Struct("<QQ32s")


def _pack_entries(entries, with_view: bool) -> bytes:
    if with_view:
        return core.pack_batch(entries)
    return core.pack_batch([(i, 0, v) for i, v in entries])


def _unpack_entries(payload, with_view: bool):
    batch = core.Batch(payload)
    if with_view:
        return tuple((i, v, bytes(p)) for i, v, p in batch)
    return tuple((i, bytes(p)) for i, _, p in batch)


def encode(sender: int, msg: Message) -> bytes:
    """One frame for `msg` sent by `sender`."""
    t = msg.TYPE
    if t == REQUESTS:
        return core.encode_frame(t, sender, 1 if msg.directed else 0, 0, msg.batch)
    if t in (FORWARD, REPLIES, REPLY_ERRORS, DIVERGED):
        return core.encode_frame(t, sender, 0, 0, msg.batch)
    if t == PROPOSE:
        return core.encode_frame(t, sender, msg.view, msg.instance,
                                 msg.commit.to_bytes(8, "little") + msg.value)
    if t == ACCEPTED:
        return core.encode_frame(t, sender, msg.view, msg.instance, msg.count.to_bytes(4, "little"))
    if t == COMMIT or t == ACK:
        return core.encode_frame(t, sender, msg.view, msg.commit)
    if t == START_VIEW_CHANGE or t == PRE_VIEW_CHANGE or t == PRE_VIEW_CHANGE_OK:
        return core.encode_frame(t, sender, msg.view, 0)
    if t == DO_VIEW_CHANGE:
        return core.encode_frame(t, sender, msg.view, msg.commit, _pack_entries(msg.entries, True))
    if t == START_VIEW:
        return core.encode_frame(t, sender, msg.view, msg.commit, _pack_entries(msg.entries, False))
    if t == CATCHUP_REQUEST:
        return core.encode_frame(t, sender, msg.view, msg.start)
    if t == RECOVERY:
        return core.encode_frame(t, sender, 0, msg.nonce)
    if t == RECOVERY_RESPONSE:
        flags = (1 if msg.primary else 0) | (2 if msg.empty else 0)
        return core.encode_frame(t, sender, msg.view, msg.nonce,
                                 msg.commit.to_bytes(8, "little") + len(msg.membership).to_bytes(4, "little")
                                 + msg.membership + _pack_entries(msg.entries, False),
                                 flags)
    if t == CATCHUP_REPLY:
        return core.encode_frame(t, sender, msg.view, msg.commit, _pack_entries(msg.entries, False))
    if t == LOG_TRUNCATED:
        return core.encode_frame(t, sender, msg.view, msg.checkpoint)
    if t == STATE_QUERY:
        return core.encode_frame(t, sender, 0, msg.nonce)
    if t == STATE_INFO:
        return core.encode_frame(t, sender, 0, msg.nonce,
                                 b"".join(_CKPT_INFO.pack(*c) for c in msg.checkpoints))
    if t == STATE_CHUNK_REQUEST:
        return core.encode_frame(t, sender, msg.offset, msg.instance, msg.length.to_bytes(4, "little"))
    if t == STATE_CHUNK:
        return core.encode_frame(t, sender, msg.offset, msg.instance,
                                 msg.total.to_bytes(8, "little") + msg.data)
    raise TypeError(f"cannot encode {msg!r}")


def decode(frame, max_payload: int = core.DEFAULT_MAX_PAYLOAD) -> Tuple[int, Message]:
    """(sender, message) from one frame; ProtocolError on anything malformed or unknown."""
    t, sender, _flags, view, instance, payload = core.decode_frame(frame, max_payload)
    if t in (REQUESTS, FORWARD, REPLIES, REPLY_ERRORS, DIVERGED):
        core.Batch(payload)  # validate now: a bad batch is the sender's fault, not the reader's
        if t == REQUESTS:
            return sender, Requests(bytes(payload), view == 1)
        cls = {FORWARD: Forward, REPLIES: Replies, REPLY_ERRORS: ReplyErrors, DIVERGED: Diverged}[t]
        return sender, cls(bytes(payload))
    if t == PROPOSE:
        if len(payload) < 8:
            raise ProtocolError(f"PROPOSE payload too short ({len(payload)} bytes, need >= 8)")
        commit = int.from_bytes(payload[:8], "little")
        value = bytes(payload[8:])
        core.Batch(value)
        return sender, Propose(view, instance, value, commit)
    if t == ACCEPTED:
        if len(payload) != 4:
            raise ProtocolError(f"ACCEPTED payload must be 4 bytes, got {len(payload)}")
        count = int.from_bytes(payload, "little")
        if count < 1:
            raise ProtocolError("ACCEPTED with count 0")
        return sender, Accepted(view, instance, count)
    if t == COMMIT:
        _no_payload(t, payload)
        return sender, Commit(view, instance)
    if t == ACK:
        _no_payload(t, payload)
        return sender, Ack(view, instance)
    if t == START_VIEW_CHANGE:
        _no_payload(t, payload)
        return sender, StartViewChange(view)
    if t == PRE_VIEW_CHANGE:
        _no_payload(t, payload)
        return sender, PreViewChange(view)
    if t == PRE_VIEW_CHANGE_OK:
        _no_payload(t, payload)
        return sender, PreViewChangeOk(view)
    if t == DO_VIEW_CHANGE:
        return sender, DoViewChange(view, instance, _checked_values(_unpack_entries(payload, True), 2))
    if t == START_VIEW:
        return sender, StartView(view, instance, _checked_values(_unpack_entries(payload, False), 1))
    if t == CATCHUP_REQUEST:
        _no_payload(t, payload)
        return sender, CatchupRequest(view, instance)
    if t == RECOVERY:
        _no_payload(t, payload)
        return sender, Recovery(instance)
    if t == RECOVERY_RESPONSE:
        if len(payload) < 12 or _flags > 3:
            raise ProtocolError("malformed RECOVERY_RESPONSE")
        mlen = int.from_bytes(payload[8:12], "little")
        if 12 + mlen > len(payload):
            raise ProtocolError("malformed RECOVERY_RESPONSE: membership beyond the payload")
        membership = bytes(payload[12:12 + mlen])
        entries = _checked_values(_unpack_entries(payload[12 + mlen:], False), 1)
        return sender, RecoveryResponse(view, instance, int.from_bytes(payload[:8], "little"),
                                        bool(_flags & 1), bool(_flags & 2), entries, membership)
    if t == CATCHUP_REPLY:
        return sender, CatchupReply(view, instance, _checked_values(_unpack_entries(payload, False), 1))
    if t == LOG_TRUNCATED:
        _no_payload(t, payload)
        return sender, LogTruncated(view, instance)
    if t == STATE_QUERY:
        _no_payload(t, payload)
        return sender, StateQuery(instance)
    if t == STATE_INFO:
        if len(payload) % _CKPT_INFO.size:
            raise ProtocolError(f"STATE_INFO payload of {len(payload)} bytes is not a whole "
                                f"number of {_CKPT_INFO.size}-byte entries")
        return sender, StateInfo(instance, tuple(_CKPT_INFO.iter_unpack(bytes(payload))))
    if t == STATE_CHUNK_REQUEST:
        if len(payload) != 4:
            raise ProtocolError(f"STATE_CHUNK_REQUEST payload must be 4 bytes, got {len(payload)}")
        return sender, StateChunkRequest(instance, view, int.from_bytes(payload, "little"))
    if t == STATE_CHUNK:
        if len(payload) < 8:
            raise ProtocolError("STATE_CHUNK payload too short")
        total = int.from_bytes(payload[:8], "little")
        data = bytes(payload[8:])
        if view + len(data) > total:
            raise ProtocolError(f"STATE_CHUNK [{view}, {view + len(data)}) beyond the file's {total} bytes")
        return sender, StateChunk(instance, view, total, data)
    raise ProtocolError(f"unknown message type {t}")


def _no_payload(t, payload):
    if len(payload):
        raise ProtocolError(f"message type {t} carries no payload, got {len(payload)} bytes")


def _checked_values(entries, value_index):
    for e in entries:
        core.Batch(e[value_index])  # every value is a request batch
    return entries
