"""One replica of the consensus protocol, as a deterministic state machine.

Owns: the view and its leader, the replica's log (accepted and decided values per instance),
the leader's batching and pipelining, leader change, catch-up from peers, and which requests
still wait for order. Inputs are step(sender, message) and tick(now_ms); the only output is
ready(). It never touches sockets, files, clocks, threads or randomness: the same inputs give
the same outputs, which is what lets the simulator replay any run from its seed.

The protocol is Multi-Paxos in the shape of Viewstamped Replication / Mod-SMaRt (crash faults):
  normal case   leader --PROPOSE(v,i,value)--> all; each --ACCEPTED(v,i)--> leader;
                a quorum of ACCEPTED decides i; COMMIT(v,c) tells the others.
  view change   START_VIEW_CHANGE(v') makes everyone promise v'; each sends leader(v') a
                DO_VIEW_CHANGE with what it accepted above its commit point; from a quorum the
                new leader picks, per instance, the value accepted in the highest view (a no-op
                where there is none) and installs them with START_VIEW.
Rules that keep it safe (argued in docs/PROTOCOL.md):
  R1 never accept a proposal of a view lower than the one promised;
  R2 persist the promise and each accepted value before any message that depends on it
     (the Ready contract: persist, then send);
  R3 a slot accepted in the current view is decided when that view's leader says so; a value
     learned from anyone else is only taken with the sender's explicit "decided";
  R4 a decided slot is never overwritten.
Membership (smrd.protocol.membership) is replicated state: a change is an entry of the log,
decided like a request and applied in order. Views are led by replica `view % n` over the ids
of hosts.conf, whatever the membership, so no view ever has two leaders; view changes skip
views whose leader is not a voter. Quorums are majorities of the voters:
  M1 a leader proposes a change only with nothing else in flight, alone in its instance, and
     proposes nothing more until it is applied (one change in flight, in a drained log);
  M2 a vote for instance i counts if its sender is a voter of the membership that holds at i
     (the applied one, followed through the changes in the leader's log below i);
  M3 a view change waits for DO_VIEW_CHANGEs from a majority of the applied membership, and
     from enough voters of every membership the values it chose lead to to meet each of its
     quorums, so it sees everything any quorum may have decided above its commit point.

The replica is composed here from its parts, one module per concern, each a mixin working on the
state that Replica.__init__ sets up (every field is named and explained there):
  log                 the log, the commit point, what goes to execution, checkpoints
  requests            requests waiting for order, the leader's batching and proposing (M1)
  normal_case         PROPOSE / ACCEPTED / COMMIT, heartbeats, a follower's timeouts
  view_change         leader change (M3)
  membership_changes  whose votes count (M2), asking for and applying membership changes
  recovery            a replica that starts with an empty disk
  catchup             decided values fetched from peers; where a state transfer starts
This module holds construction, the inputs and the output, and what a driver reads (snapshot(),
value_of(), log_entry()) or asks for (request_leave(), request_join(), stop_auto_join(),
replace_sessions(), checkpoint_stored(), evict(), ...). Drivers go through those, not through
the attributes: those are the parts' working state.
"""
from collections import deque
from types import MappingProxyType

from . import messages as m
from .catchup import CatchupMixin
from .log import ReplicatedLogMixin
from .membership import Membership
from .membership_changes import MembershipChangesMixin
from .normal_case import NormalCaseMixin
from .options import Options
from .quorum import CrashFaultPolicy
from .ready import Ready
from .records import CommitRecord
from .recovery import RecoveryMixin
from .requests import RequestQueueMixin
from .sessions import Sessions
from .status import NORMAL, RECOVERING, VIEW_CHANGE, LogEntry, ReplicaSnapshot
from .view_change import ViewChangeMixin, _change_in

# The replica and the values it shows (from smrd.protocol.status); _change_in (from
# smrd.protocol.view_change) is still imported from here by tests of unsafe variants.
__all__ = ["NORMAL", "RECOVERING", "VIEW_CHANGE", "Replica", "ReplicaSnapshot", "LogEntry",
           "_change_in"]

# What a replica that cannot vote sends (it recovers from an empty disk, or catches up from
# outside the membership): hearing it says nothing about the quorums a change would leave.
# Messages that say nothing about the sender hearing us: a replica asking for a pre-vote may hear
# nobody, and must not make a leader believe it has a quorum's contact.
_NO_CONTACT = frozenset({m.Recovery, m.CatchupRequest, m.PreViewChange})

_WHILE_RECOVERING = frozenset({m.Recovery, m.RecoveryResponse, m.CatchupRequest,
                               m.CatchupReply, m.LogTruncated, m.Requests, m.Forward})


class Replica(MembershipChangesMixin, RequestQueueMixin, NormalCaseMixin, ViewChangeMixin,
              RecoveryMixin, CatchupMixin, ReplicatedLogMixin):
    def __init__(self, replica_id: int, policy=None, options: Options = None,
                 sessions: Sessions = None, durable=None, n: int = None, recovery_nonce=None,
                 voters=None, auto_join: bool = False, resume_recovery: bool = False):
        """`n` (or the policy's n) is the number of replica ids in hosts.conf; `voters` the
        bootstrap membership (default: all of them), used until the replicated state says
        otherwise. With `auto_join` a replica that is not a voter asks to become one.
        `resume_recovery`: the driver's durable mark says a recovery began and never ended (the
        mark is made before the first record of a replica that starts empty, and removed once the
        record that ends the recovery is durable): what is on disk are decided values it caught
        up, not its votes, so it recovers again."""
        self.policy = policy if policy is not None else CrashFaultPolicy(n)
        self.n = self.policy.n
        if not 0 <= replica_id < self.n:
            raise ValueError(f"replica id {replica_id} is not in 0..{self.n - 1}")
        self.id = replica_id
        self.opt = options or Options()
        self.sessions = sessions if sessions is not None else Sessions(1024, 3_600_000)
        if self.sessions.membership is None:
            boot = Membership.bootstrap(range(self.n) if voters is None else voters)
            if max(boot.voters) >= self.n:
                raise ValueError(f"bootstrap voters {sorted(boot.voters)} are not all in 0..{self.n - 1}")
            self.sessions.membership = boot
        self.auto_join = auto_join
        self.leaving = False       # asked to leave the membership (request_leave)
        self.handed_off_to_leave = False  # while leaving: the lead was handed on once already
        self.change_sent = -1 << 60
        self.change_seq = 0
        # Changes in this leader's log above the applied point: (instance, membership after it).
        self.pending_changes = []
        self._trackers = {}
        self._peers = ()
        self._membership_seen = None
        self._on_membership()

        # What survives a crash (rebuilt from records).
        self.view = 0
        self.log = {}              # instance -> Slot (smrd.protocol.log)
        self.commit = 0            # every instance <= commit is decided and in the log
        self.top = 0               # highest instance in the log
        # Instances <= low are covered by a stored checkpoint and no longer in the log.
        self.low = 0
        # Values of instances <= evicted (>= low) left memory; the driver's log files have them.
        self.evicted = 0

        # Volatile.
        self.now = 0               # ticks since start
        self.clock_ms = 0          # the driver's wall clock, only ever stamped into batches
        self.last_stamp = 0
        self.status = NORMAL
        self.applied = 0           # instances handed to the driver for execution
        self.leader_commit = 0     # commit point announced by the current view's leader
        self.marked_upto = 0       # slots up to here were checked against leader_commit
        self.catchup_target = 0    # highest commit point heard of from anyone
        self.catchup_sent = -1 << 60
        self.catchup_peer = 0
        # Tick of the last message from the current leader. A starting replica gives the leader
        # twice the election timeout to reach it: peers reconnect to a new process with back-off.
        self.last_heard = self.opt.election_ticks
        self.last_sent = 0         # leader: tick of the last message to followers
        self._answered_at = -1     # follower: tick of its last ACCEPTED or ACK to the leader
        self.vc_started = 0
        self.vc_last_sent = 0
        self.vc_attempt = 0
        # Pre-vote (view_change.py, _suspect_leader): the view whose leader we asked the voters
        # about, the voters that miss it too (ourselves included), when we last asked.
        self.prevote_view = -1
        self.prevote_ok = set()
        self.prevote_sent = -1 << 60
        self.dvcs = {}             # leader(view) in VIEW_CHANGE: sender -> DoViewChange
        self.next_instance = 1     # leader: next instance to propose
        self.sent_at = {}          # leader: instance -> tick its PROPOSE was last sent
        self.pending = {}          # (client_id, seq) -> PendingRequest: not yet proposed
        self.queue = deque()       # pending keys in arrival order (may hold stale keys)
        self.proposed = {}         # leader: (client_id, seq) -> PendingRequest in an undecided slot
        self.pending_by_origin = {}  # gateway -> its requests held here (pending or proposed)
        self._ready = Ready()
        self._commit_recorded = 0
        self.since_checkpoint = 0  # requests applied since the last checkpoint boundary
        self.checkpoints = []      # instances of the stored checkpoints, oldest first (at most 2)
        self.transfer_from = None  # (peer, instance) while a state transfer is wanted
        self.view_change_reason = ""
        self.stats = {"view_changes": 0, "requests_dropped": 0, "requests_forwarded": 0,
                      "requests_relayed": 0, "catchup_requests": 0, "stale_messages": 0}

        self.recovery_nonce = None
        self.recovery_responses = {}
        self.recovery_primary = None   # the latest view's leader's answer, once chosen
        self.contact = {}          # replica id -> tick of its last message (leader's quorum contact)
        self.lost_leader_of = -1   # the view whose leader's connection was seen to drop
        if durable is not None and durable.records:
            if resume_recovery and recovery_nonce is not None and self.n > 1:
                self.status = RECOVERING
                self.recovery_nonce = recovery_nonce
            self._restore(durable)
        elif recovery_nonce is not None and self.n > 1:
            # Nothing on disk, not even the record written when a recovery ends: a new cluster,
            # or a replica whose disk was lost. Its old votes are gone, and voting again before
            # learning the current state could let a decided value be forgotten
            # (docs/PROTOCOL.md, "Recovery"). So ask first.
            self.status = RECOVERING
            self.recovery_nonce = recovery_nonce

        self._handlers = {
            m.Requests: self._on_requests, m.Forward: self._on_forward,
            m.Propose: self._on_propose, m.Accepted: self._on_accepted, m.Commit: self._on_commit,
            m.Ack: self._on_ack,
            m.StartViewChange: self._on_start_view_change, m.DoViewChange: self._on_do_view_change,
            m.PreViewChange: self._on_pre_view_change, m.PreViewChangeOk: self._on_pre_view_change_ok,
            m.StartView: self._on_start_view, m.CatchupRequest: self._on_catchup_request,
            m.CatchupReply: self._on_catchup_reply,
            m.Recovery: self._on_recovery, m.RecoveryResponse: self._on_recovery_response,
            m.LogTruncated: self._on_log_truncated,
        }

    # ------------------------------------------------------------------ inputs and output

    def leader_of(self, view: int) -> int:
        return view % self.n

    @property
    def leader(self) -> int:
        return self.view % self.n

    @property
    def is_leader(self) -> bool:
        return (self.status == NORMAL and self.view % self.n == self.id
                and self.id in self.sessions.membership.voters)

    def step(self, sender, msg) -> None:
        """Feed one message. For Requests the sender is an opaque origin the driver uses to
        route immediate replies; for every other message it is a replica id."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise TypeError(f"replica cannot handle {type(msg).__name__}")
        if not isinstance(msg, m.Requests) and not (isinstance(sender, int) and 0 <= sender < self.n):
            self.stats["stale_messages"] += 1
            return
        if type(sender) is int and type(msg) not in _NO_CONTACT:
            self.contact[sender] = self.now
        if self.status == RECOVERING and type(msg) not in _WHILE_RECOVERING:
            return  # no promises, no votes, no view changes until recovered
        handler(sender, msg)
        self._after_input()

    def tick(self, now_ms: int = None) -> None:
        self.now += 1
        if now_ms is not None and now_ms > self.clock_ms:
            self.clock_ms = now_ms
        if self.status == RECOVERING:
            self._recovery_tick()
        elif self.status == NORMAL:
            if self.is_leader:
                self._leader_tick()
            else:
                self._follower_tick()
        else:
            self._view_change_tick()
        if self.leaving or self.auto_join:
            self._membership_tick()
        if self.commit < self.catchup_target and self.now - self.catchup_sent >= self.opt.retransmit_ticks:
            self.catchup_peer += 1  # the last peer did not answer in time: ask another
            self._request_catchup()
        self._after_input()

    def ready(self) -> Ready:
        """Everything produced since the last call; see smrd.protocol.ready for the contract."""
        if self.commit > self._commit_recorded:
            self._ready.persist.append(CommitRecord(self.commit))
            self._commit_recorded = self.commit
        out, self._ready = self._ready, Ready()
        return out

    def has_ready(self) -> bool:
        return bool(self._ready) or self.commit > self._commit_recorded

    def peer_lost(self, replica: int) -> None:
        """The driver saw the connection to `replica` drop (its process died or closed it). If it
        leads our view, suspect it after two heartbeats instead of the whole election timeout:
        a live leader that merely reconnected is heard from by then and nothing happens."""
        if self.status == NORMAL and replica == self.leader and replica != self.id:
            soon = self.now - self.opt.election_ticks + 2 * self.opt.heartbeat_ticks
            if soon < self.last_heard:
                self.last_heard = soon
                self.lost_leader_of = self.view
                self.stats["leader_connection_lost"] = self.stats.get("leader_connection_lost", 0) + 1

    def transfer_leadership(self) -> bool:
        """A leader about to stop hands the order to the next view's leader at once, so clients
        wait one round trip instead of an election timeout. False if this replica is not leading."""
        if not self.is_leader or len(self.sessions.membership.voters) == 1:
            return False
        self._start_view_change(self._next_view(self.view), reason="leadership hand-off")
        return True

    # ------------------------------------------------------------------ what drivers read and ask

    def snapshot(self) -> ReplicaSnapshot:
        """This replica's state now, as an immutable value (smrd.protocol.status)."""
        now = self.now
        checkpoints = tuple(self.checkpoints)
        return ReplicaSnapshot(
            id=self.id, view=self.view, leader=self.leader, status=self.status, role=self.role,
            is_leader=self.is_leader, commit=self.commit, applied=self.applied, top=self.top,
            low=self.low, evicted=self.evicted, checkpoints=checkpoints,
            checkpoint=checkpoints[-1] if checkpoints else 0,
            catchup_target=self.catchup_target, leader_commit=self.leader_commit,
            known_commit=max(self.commit, self.catchup_target, self.leader_commit),
            membership=self.sessions.membership, pending_changes=tuple(self.pending_changes),
            auto_join=self.auto_join, leaving=self.leaving, transfer_from=self.transfer_from,
            view_change_reason=self.view_change_reason,
            has_quorum_contact=self.has_quorum_contact(),
            contact_ages=MappingProxyType({r: now - t for r, t in self.contact.items()}),
            pending=len(self.pending), proposed=len(self.proposed),
            stats=MappingProxyType(dict(self.stats)))

    def describe(self) -> dict:
        """The protocol's part of the status JSON."""
        return self.snapshot().describe()

    def progress(self) -> tuple:
        """(view, status, commit, catchup_target, leader_commit, membership, changes refused so
        far): what a driver checks after every burst of messages, as a plain tuple (a tenth of a
        microsecond; snapshot() costs a few). The membership is the applied one, the same object
        while it is unchanged."""
        return (self.view, self.status, self.commit, self.catchup_target, self.leader_commit,
                self.sessions.membership, self.stats.get("membership_refused", 0))

    def value_of(self, instance: int):
        """The decided value of `instance` if this replica holds it in memory, else None: not
        decided here (yet), evicted (the driver's log files hold it, see evict()), or covered by
        a checkpoint (at or below `low`)."""
        slot = self.log.get(instance)
        return slot.value if slot is not None and slot.decided else None

    def log_entry(self, instance: int):
        """What the log holds for `instance` now, decided or not, as a LogEntry; None if nothing."""
        slot = self.log.get(instance)
        return None if slot is None else LogEntry(slot.view, slot.value, slot.decided)

    def replace_sessions(self, sessions: Sessions) -> None:
        """The driver rebuilds its app: from now on requests are planned against `sessions` (an
        exactly-once table restored from a checkpoint at or below the applied point, or a new
        one; the driver plans the decided instances after it again). The table takes this
        replica's membership: membership is replicated state the core applied up to `applied`,
        where the rebuild ends, so neither a new table's nor the checkpoint's would be right."""
        sessions.membership = self.sessions.membership
        self.sessions = sessions

    # ------------------------------------------------------------------ output

    def _send(self, dest, msg) -> None:
        self._ready.messages.append((dest, msg))

    def _broadcast(self, msg) -> None:
        out = self._ready.messages
        for r in self._peers:
            out.append((r, msg))
        self.last_sent = self.now
