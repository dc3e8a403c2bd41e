"""The consensus core: a deterministic state machine (no sockets, no clocks, no threads).

Input only through ``Replica.step(sender, message)`` and ``Replica.tick(now_ms)``; output only
through ``Replica.ready()``. Drivers (the real server, the simulator) persist, then send, then
apply, in that order. See docs/PROTOCOL.md.
"""
from .messages import (
    Accepted, Ack, CatchupReply, CatchupRequest, Commit, DoViewChange, Forward, LogTruncated,
    Message, Propose, Recovery, RecoveryResponse, Replies, ReplyErrors, Requests, StartView,
    StartViewChange,
)
from .options import Options
from .quorum import CrashFaultPolicy, QuorumPolicy
from .ready import Ready
from .records import (
    AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord, DurableState, ViewRecord,
)
from .replica import NORMAL, RECOVERING, VIEW_CHANGE, Replica
from .sessions import Sessions
from .status import LogEntry, ReplicaSnapshot

__all__ = [
    "Accepted", "Ack", "CatchupReply", "CatchupRequest", "Commit", "DoViewChange", "Forward", "Message",
    "Propose", "Replies", "ReplyErrors", "Requests", "StartView", "StartViewChange", "Options",
    "CrashFaultPolicy", "QuorumPolicy", "Ready", "AcceptRecord", "CommitRecord", "DecideRecord",
    "DurableState", "ViewRecord", "NORMAL", "RECOVERING", "VIEW_CHANGE", "Replica", "Sessions",
    "Recovery", "RecoveryResponse", "LogTruncated", "CheckpointRecord", "LogEntry", "ReplicaSnapshot",
]
