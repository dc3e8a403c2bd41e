"""What a replica shows of itself to its driver: its status values, and immutable values of its
state taken at one moment (Replica.snapshot(), Replica.log_entry()).

Owns: the meaning of each field drivers read, and the status JSON built from them (`describe`),
so that the snapshot and the status a replica reports cannot disagree.
Must never: hold a reference to a replica's mutable state (a snapshot taken before a step still
says what was true then), or decide anything: it only describes.
"""
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Tuple

from .membership import Membership

NORMAL = "normal"
VIEW_CHANGE = "view-change"
RECOVERING = "recovering"   # started with an empty log: votes on nothing until a quorum informs it


class LogEntry(NamedTuple):
    """One instance of a replica's log as it holds it now."""
    view: int         # the view it was accepted in (0 for a value learned as decided)
    value: bytes      # the batch, as received (bytes or a memoryview of a frame)
    decided: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSnapshot:
    """A replica's state at one moment, as drivers read it. Counters are instances unless named
    otherwise; ages are in ticks."""
    id: int
    view: int
    leader: int                   # the current view's leader (view % n), whatever the status
    status: str                   # NORMAL, VIEW_CHANGE or RECOVERING
    role: str                     # "voter", "learner" or "none" in the applied membership
    is_leader: bool               # leads its view, in NORMAL status, as a voter
    commit: int                   # every instance <= commit is decided here
    applied: int                  # instances handed to the driver for execution
    top: int                      # highest instance in the log
    low: int                      # instances <= low are covered by a stored checkpoint
    evicted: int                  # values <= evicted left memory (the log files hold them)
    checkpoints: Tuple[int, ...]  # instances of the stored checkpoints, oldest first
    checkpoint: int               # the newest of them, 0 if none
    catchup_target: int           # highest commit point heard of from anyone
    leader_commit: int            # commit point announced by this view's leader (0: none yet)
    known_commit: int             # the highest of the three above: how far the group got
    membership: Membership        # the applied membership (the same object while it is unchanged)
    # Changes ordered in this leader's log above the applied point: (instance, membership after it).
    pending_changes: Tuple[Tuple[int, Membership], ...]
    auto_join: bool               # asks to become a voter while it is not one
    leaving: bool                 # asks to leave the membership (request_leave)
    transfer_from: Optional[Tuple[int, int]]  # (peer, instance) while a state transfer is wanted
    view_change_reason: str       # why the last view change started ("" if none did)
    has_quorum_contact: bool      # heard a quorum of voters (itself too) within an election timeout
    contact_ages: Mapping[int, int]  # replica id -> ticks since its last message (read-only)
    pending: int                  # requests waiting for order
    proposed: int                 # leader: requests in undecided instances
    stats: Mapping[str, int]      # counters (read-only)

    def describe(self) -> dict:
        """The status JSON's protocol fields (smrd.replica.driver adds its own)."""
        return {"id": self.id, "view": self.view, "leader": self.leader, "status": self.status,
                "commit": self.commit, "applied": self.applied, "top": self.top, "low": self.low,
                "evicted": self.evicted, "checkpoint": self.checkpoint, "role": self.role,
                "membership": self.membership.describe(), "pending": self.pending,
                "proposed": self.proposed, **self.stats}
