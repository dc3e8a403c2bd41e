"""The core's only output, and the rules for handling it (shared by the daemon and the simulator,
so that the two cannot drift apart).

A driver handles a burst of Readies (all the core has now) in this order:
  1. write every record of their `persist`, in order (`group_commit` lists them);
  2. send the messages `group_commit` lets leave early (a leader's PROPOSEs, see below);
  3. if `group_commit` says so, fsync: ONE fsync covers the whole burst;
  4. for each Ready, in order: send its `messages`; send its `replies` (answers the core gave
     without executing anything: a cached reply, a refusal; they depend on no `apply` of the
     burst); hand `apply` to execution, in order; then `checkpoints`, `transfer`, `serve_log`.
Sending a message before the records it depends on are durable would let a peer count a vote
that a crash then forgets. Two exceptions, argued in docs/PROTOCOL.md ("What is persisted when"):
  - a Ready holding only a commit point (CommitRecord) needs no fsync: the commit point is
    learned again from the leader or the log;
  - a leader's PROPOSEs may leave before the fsync of its own accept (as in Raft, §10.2.1): a
    PROPOSE promises nothing, and the leader's own vote decides nothing until another voter's
    ACCEPTED answers it, which a driver must not hand to the core before this fsync returned
    (the daemon's loop fsyncs a burst before it reads the next message; an fsync done elsewhere
    must keep that). Never when the burst holds a view promise (ViewRecord) or any record other
    than votes before that Ready: those must be durable before any message. And never a PROPOSE
    whose commit point covers an instance accepted in this burst: a single voter's own vote is
    a quorum, so it decides at once, in memory, and a later PROPOSE of the same burst would
    carry that decision to learners, which execute it while a crash can still erase its only
    vote; it waits for the fsync like the rest. (Where an instance takes two voters or more
    to decide, the other voter's ACCEPTED is read in a later burst, so no PROPOSE of the burst
    that accepted it announces it: this holds nothing back there.)
"""
from dataclasses import dataclass, field

from .messages import Propose
from .records import AcceptRecord, CommitRecord

# Records that are votes on values (or the commit hint), not promises about views.
VOTE_RECORDS = (AcceptRecord, CommitRecord)


@dataclass
class Ready:
    persist: list = field(default_factory=list)   # records (smrd.protocol.records), in order
    messages: list = field(default_factory=list)  # (destination replica id, message)
    apply: list = field(default_factory=list)     # (instance, value, plan), consecutive from applied+1;
                                                  # plan: (client_id, seq, status, payload) per request
    replies: list = field(default_factory=list)   # (origin, client_id, seq, status, payload)
    # (instance, SessionsImage): after executing `instance` (an entry of this or an earlier
    # `apply`), store a checkpoint: the app's snapshot plus the image, its replies filled in as
    # the requests up to `instance` execute. Then call Replica.checkpoint_stored(instance).
    checkpoints: list = field(default_factory=list)
    # (peer, instance) or None: the log this replica needs was truncated at `peer` up to its
    # checkpoint `instance`; fetch a checkpoint >= instance, then Replica.install_checkpoint().
    transfer: tuple = None
    # (peer, start): a catch-up request for values this replica evicted from memory (they are
    # in its log files): the driver reads them back and sends the CatchupReply itself.
    serve_log: list = field(default_factory=list)

    def __bool__(self):
        return bool(self.persist or self.messages or self.apply or self.replies or
                    self.checkpoints or self.transfer or self.serve_log)


@dataclass
class GroupCommit:
    """Steps 1-3 above for one burst: write `records`, send `early`, fsync if `sync`."""
    records: list
    sync: bool
    early: list  # (destination, message) that may leave before the fsync


def group_commit(readies) -> GroupCommit:
    """The persist/send rule for a burst of Readies. Moves the messages that may leave before
    the fsync out of their Ready's `messages` into `early`; the rest leave after it."""
    records, early = [], []
    sync = promised = False
    accepted = None  # the lowest instance accepted in this burst so far: not durable before the fsync
    for rd in readies:
        if not rd.persist:
            continue
        records.extend(rd.persist)
        if all(type(r) is CommitRecord for r in rd.persist):
            continue
        sync = True
        for r in rd.persist:
            if type(r) is AcceptRecord and (accepted is None or r.instance < accepted):
                accepted = r.instance
        if not all(type(r) in VOTE_RECORDS for r in rd.persist):
            promised = True
        elif rd.messages and not promised:
            # A PROPOSE's commit point tells learners what they may execute. One that covers an
            # instance accepted in this burst announces a decision whose vote a crash before the
            # fsync can still erase (a single voter decides by its own vote, at once): it waits.
            later = []
            for out in rd.messages:
                msg = out[1]
                if type(msg) is Propose and (accepted is None or msg.commit < accepted):
                    early.append(out)
                else:
                    later.append(out)
            rd.messages = later
    return GroupCommit(records, sync, early)
