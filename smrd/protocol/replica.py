# One replica of the consensus protocol, as a deterministic state machine.
#
# Owns: the view and its leader, the replica's log (accepted and decided values per instance),
# the leader's batching and pipelining, leader change, catch-up from peers, and which requests
# still wait for order. Inputs are step(sender, message) and tick(now_ms); the only output is
# ready(). It never touches sockets, files, clocks, threads or randomness: the same inputs give
# the same outputs, which is what lets the simulator replay any run from its seed.
#
# The protocol is Multi-Paxos in the shape of Viewstamped Replication / Mod-SMaRt (crash faults):
#   normal case   leader --PROPOSE(v,i,value)--> all; each --ACCEPTED(v,i)--> leader;
#                 a quorum of ACCEPTED decides i; COMMIT(v,c) tells the others.
#   view change   START_VIEW_CHANGE(v') makes everyone promise v'; each sends leader(v') a
#                 DO_VIEW_CHANGE with what it accepted above its commit point; from a quorum the
#                 new leader picks, per instance, the value accepted in the highest view (a no-op
#                 where there is none) and installs them with START_VIEW.
# Rules that keep it safe (argued in docs/PROTOCOL.md):
#   R1 never accept a proposal of a view lower than the one promised;
#   R2 persist the promise and each accepted value before any message that depends on it
#      (the Ready contract: persist, then send);
#   R3 a slot accepted in the current view is decided when that view's leader says so; a value
#      learned from anyone else is only taken with the sender's explicit "decided";
#   R4 a decided slot is never overwritten.
# Membership (smrd.protocol.membership) is replicated state: a change is an entry of the log,
# decided like a request and applied in order. Views are led by replica `view % n` over the ids
# of hosts.conf, whatever the membership, so no view ever has two leaders; view changes skip
# views whose leader is not a voter. Quorums are majorities of the voters:
#   M1 a leader proposes a change only with nothing else in flight, alone in its instance, and
#      proposes nothing more until it is applied (one change in flight, in a drained log);
#   M2 a vote for instance i counts if its sender is a voter of the membership that holds at i
#      (the applied one, followed through the changes in the leader's log below i);
#   M3 a view change waits for DO_VIEW_CHANGEs from a majority of the applied membership, and
#      from enough voters of every membership the values it chose lead to to meet each of its
#      quorums, so it sees everything any quorum may have decided above its commit point.
from collections import deque

from .. import core
from ..core import Batch, BatchBuilder, QuorumTracker
from . import messages as m
from .options import Options
from .quorum import CrashFaultPolicy
from .ready import Ready
from .membership import ADD_LEARNER, PROMOTE, REMOVE, SYSTEM_CLIENT, Change, Membership
from .records import AcceptRecord, CommitRecord, DecideRecord, ViewRecord
from .sessions import DUPLICATE, EXECUTE, SYSTEM, TOO_OLD, Sessions, plan_batch

NORMAL = "normal"
VIEW_CHANGE = "view-change"
RECOVERING = "recovering"   # started with an empty log: votes on nothing until a quorum informs it


# What a replica that cannot vote sends (it recovers from an empty disk, or catches up from
# outside the membership): hearing it says nothing about the quorums a change would leave.
_NO_CONTACT = frozenset({m.Recovery, m.CatchupRequest})

_WHILE_RECOVERING = frozenset({m.Recovery, m.RecoveryResponse, m.CatchupRequest,
                               m.CatchupReply, m.LogTruncated, m.Requests, m.Forward})


def _change_in(value):
    """The membership change a decided value carries (alone in its batch), or None."""
    if len(value) > 512:
        return None  # changes are tiny; request batches are not worth parsing here
    batch = Batch(value)
    if len(batch) != 1:
        return None
    for client_id, _, payload in batch:
        if client_id == SYSTEM_CLIENT:
            return Change.decode(payload)
    return None


class _Slot:
    __slots__ = ("view", "value", "decided")

    def __init__(self, view, value, decided=False):
        self.view = view
        self.value = value
        self.decided = decided


class _Pending:
    """A client request waiting for order (or, at the leader, for its instance to decide)."""
    __slots__ = ("payload", "arrived", "forwarded", "origin")

    def __init__(self, payload, arrived, origin):
        self.payload = payload
        self.arrived = arrived
        self.forwarded = False
        self.origin = origin


class Replica:
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
        self.log = {}              # instance -> _Slot
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
        self.dvcs = {}             # leader(view) in VIEW_CHANGE: sender -> DoViewChange
        self.next_instance = 1     # leader: next instance to propose
        self.sent_at = {}          # leader: instance -> tick its PROPOSE was last sent
        self.pending = {}          # (client_id, seq) -> _Pending: not yet proposed
        self.queue = deque()       # pending keys in arrival order (may hold stale keys)
        self.proposed = {}         # leader: (client_id, seq) -> _Pending, in an undecided instance
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
            m.StartView: self._on_start_view, m.CatchupRequest: self._on_catchup_request,
            m.CatchupReply: self._on_catchup_reply,
            m.Recovery: self._on_recovery, m.RecoveryResponse: self._on_recovery_response,
            m.LogTruncated: self._on_log_truncated,
        }

    # ------------------------------------------------------------------ membership

    @property
    def membership(self) -> Membership:
        return self.sessions.membership

    @property
    def role(self) -> str:
        return self.sessions.membership.role(self.id)

    def _on_membership(self) -> None:
        """The applied membership changed (or was set): who we talk to, and vote counting."""
        cfg = self.sessions.membership
        if cfg is self._membership_seen:
            return
        self._membership_seen = cfg
        # Members get the stream; replicas outside it are only answered (they ask to catch up).
        self._peers = tuple(sorted(r for r in cfg.members if r != self.id))
        self.pending_changes = [(i, c) for i, c in self.pending_changes if c.index > cfg.index]
        self._trackers = {k: t for k, t in self._trackers.items() if k >= cfg.index}

    def _config_of(self, instance: int) -> Membership:
        cfg = self.sessions.membership
        for i, c in self.pending_changes:
            if instance > i:
                cfg = c
        return cfg

    def _quorum(self, cfg: Membership) -> int:
        return self.policy.quorum_for(len(cfg.voters))

    def _tracker_of(self, cfg: Membership) -> QuorumTracker:
        t = self._trackers.get(cfg.index)
        if t is None:
            t = self._trackers[cfg.index] = QuorumTracker(self.n, self._quorum(cfg))
        return t

    def _discard_votes_below(self, instance: int) -> None:
        for t in self._trackers.values():
            t.discard_below(instance)

    def _next_view(self, view: int) -> int:
        """The first view after `view` whose leader is a voter (as far as we know)."""
        voters = self.sessions.membership.voters
        v = view + 1
        while v % self.n not in voters:
            v += 1
        return v

    def request_leave(self) -> None:
        """Leave the membership (scale-down): ask until a decided change removed this replica.
        If it leads, it hands leadership on first (the next leader orders the removal)."""
        self.leaving = True
        self.auto_join = False
        self.change_sent = -1 << 60

    def _membership_tick(self) -> None:
        # A replica asks for its own changes; the answer is the decided log, which it applies.
        cfg = self.sessions.membership
        role = cfg.role(self.id)
        if self.leaving:
            want = REMOVE if role != "none" else None
        elif self.auto_join:
            want = ADD_LEARNER if role == "none" else PROMOTE if role == "learner" else None
        else:
            want = None
        if want is None or self.status != NORMAL or self.transfer_from is not None:
            return
        if self.now - self.change_sent < self.opt.election_ticks:
            return
        if want != REMOVE and (self.commit < self.catchup_target or self.commit < self.leader_commit
                               or (role == "learner" and not self._hears_a_voter(cfg))):
            return  # catch up first: a learner is promoted once it holds what the leader holds
        if want == REMOVE and self.is_leader:
            self.change_sent = self.now
            self.transfer_leadership()  # hand off first; the next leader orders our removal
            return
        self.change_sent = self.now
        self.change_seq += 1
        seq = (self.now << 16 | self.change_seq) & ((1 << 63) - 1)
        batch = core.pack_batch([(SYSTEM_CLIENT, seq, Change(want, self.id, cfg.index).encode())])
        if self.is_leader:
            self._on_requests(None, m.Forward(batch))
        else:
            for r in self._peers:
                if r in cfg.voters:
                    self._send(r, m.Forward(batch))  # the leader orders it; the rest hold it

    def _hears_a_voter(self, cfg: Membership) -> bool:
        # Not "hears the leader": a learner may hold a higher view than the group (it campaigned
        # as a voter before it was removed) and then drops the leader's messages as stale; its
        # catch-up answers still tell it how far the group got, and once it votes its view
        # change brings the group along.
        return any(r in cfg.voters and self.now - t < self.opt.election_ticks for r, t in self.contact.items())

    def _precheck_change(self, payload):
        """Leader, before proposing a change: why it must be refused now, or "" if it may go.
        Refused changes are answered at once and never ordered."""
        change = Change.decode(payload)
        if change is None:
            return "malformed membership change"
        cfg = self.sessions.membership
        new, why = cfg.check(change, self.n)
        if new is None:
            return why
        live = {self.id} | {r for r, t in self.contact.items() if self.now - t < self.opt.election_ticks}
        up = [r for r in new.voters if r in live]
        if len(up) < self._quorum(new):
            down = sorted(new.voters - set(up))
            return (f"would lose quorum: after it {len(new.voters)} voters need {self._quorum(new)}, "
                    f"and only {len(up)} answer (not answering: {down})")
        return ""

    def _apply_change(self, payload) -> bytes:
        """Execute a decided membership change (every replica does, at the same instance)."""
        change = Change.decode(payload)
        if change is None:
            return b"REFUSED malformed membership change"
        old = self.sessions.membership
        new, why = old.check(change, self.n)
        if new is None:
            return f"REFUSED {why}".encode()
        self.sessions.membership = new
        self._on_membership()
        self.stats["membership_changes"] = self.stats.get("membership_changes", 0) + 1
        return f"OK {change.op} {change.replica}: membership {new.index} voters {sorted(new.voters)} learners {sorted(new.learners)}".encode()

    def _roles_changed(self, before: Membership) -> None:
        """The applied membership moved on from `before` (decided changes were applied, or a
        checkpoint was installed): act on where it ended up. Never on a membership in between:
        a replica that applies many instances at once (catch-up, a restart's replay) holds all
        of them decided, and a view change started on an intermediate membership could count
        a quorum of voters that were already replaced."""
        cfg = self.sessions.membership
        if self.id not in cfg.voters:
            if self.status == VIEW_CHANGE:
                self._follow_view(self.view)  # no longer a voter: stop campaigning, follow
            elif self.status == NORMAL and self.leader == self.id:
                self._step_down()  # removed while leading: its proposals wait for order again
            return
        if self.status != NORMAL:
            return
        if self.id not in before.voters and self.leader == self.id:
            # It became a voter in a view it would lead but never installed (it followed that
            # view from outside, or campaigned for it before it was removed): leading it now
            # would propose without having gathered what a quorum accepted. Move on instead.
            self._start_view_change(self._next_view(self.view), reason="became a voter in a view it did not install")
        elif self.leader not in cfg.voters:
            # Its leader left: every replica applies this at the same instance and moves on.
            self._start_view_change(self._next_view(self.view), reason="the leader left the membership")

    # ------------------------------------------------------------------ public surface

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
            if self.recovery_primary is None and (
                    self.now % self.opt.retransmit_ticks == 1 or self.opt.retransmit_ticks == 1):
                # To every id of hosts.conf: the membership it starts with is the bootstrap one
                # (its disk is empty), and the replicas that answer for the current one may all
                # be outside it.
                msg = m.Recovery(self.recovery_nonce)
                for r in range(self.n):
                    if r != self.id:
                        self._send(r, msg)
                self.last_sent = self.now
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

    def describe(self) -> dict:
        return {"id": self.id, "view": self.view, "leader": self.leader, "status": self.status,
                "commit": self.commit, "applied": self.applied, "top": self.top, "low": self.low,
                "evicted": self.evicted,
                "checkpoint": self.checkpoints[-1] if self.checkpoints else 0,
                "role": self.role, "membership": self.sessions.membership.describe(),
                "pending": len(self.pending), "proposed": len(self.proposed), **self.stats}

    # ------------------------------------------------------------------ restore

    def _restore(self, durable) -> None:
        self.view = durable.view
        checkpoint = getattr(durable, "checkpoint", None)
        if checkpoint is not None:
            # The driver restores the app and the session table from this checkpoint's file
            # before the first Ready; execution resumes after it.
            self.low = self.applied = self.top = checkpoint.instance
            self.checkpoints = [checkpoint.instance]
        for instance, (view, value, decided) in durable.entries.items():
            if instance <= self.low:
                continue
            self.log[instance] = _Slot(view, value, decided or instance <= durable.commit)
            if instance > self.top:
                self.top = instance
        i = self.low
        while (i + 1) in self.log and self.log[i + 1].decided:
            i += 1
        self.commit = self._commit_recorded = self.marked_upto = i
        self.catchup_target = max(i, durable.commit)
        # Re-apply the decided log now, before anything else: the membership it leads to says
        # who votes. Deciding on a view change with the bootstrap (or checkpoint) membership
        # could complete one with a quorum of voters that were replaced long ago.
        self._advance_commit()
        if self.status == RECOVERING:
            return  # an unfinished recovery goes on: nothing of its own to lead or promise
        if self.status == NORMAL and self.leader == self.id and (self.view > 0 or self.top > 0):
            # Whatever this replica proposed as leader before the crash is forgotten; leading the
            # same view again could propose a second value for an instance. Move on instead.
            self._start_view_change(self._next_view(self.view), reason="restarted as the leader of its last view")

    # ------------------------------------------------------------------ client requests

    def _on_requests(self, origin, msg) -> None:
        sessions = self.sessions
        pending = self.pending
        now = self.now
        # A gateway sent these to us alone, taking us for the leader: pass them on to the leader
        # now rather than after request_ticks (they are held here too, for the request timer).
        relay = (type(msg) is m.Requests and msg.directed and self.status == NORMAL
                 and self.leader != self.id and self.leader in self._peers)
        held = 0
        limit = self.opt.max_pending
        per_origin = self.opt.max_pending_per_origin
        by_origin = self.pending_by_origin
        replies = self._ready.replies
        for client_id, seq, payload in Batch(msg.batch):
            key = (client_id, seq)
            if key in pending or key in self.proposed:
                continue
            if client_id == SYSTEM_CLIENT and not self.is_leader:
                # Membership changes go straight to the leader and are not held here: the leader
                # may refuse one for good, and a held copy would make us suspect it for that.
                # (Only from a gateway: a forwarded one is not passed on, so none can circle.)
                if (origin is not None and self.status == NORMAL and self.leader != self.id
                        and self.leader in self._peers):
                    self._send(self.leader, m.Forward(core.pack_batch([(client_id, seq, payload)])))
                continue
            status = sessions.classify(client_id, seq)
            if status == DUPLICATE:
                reply = sessions.reply(client_id, seq)
                if reply is not None and origin is not None:
                    replies.append((origin, client_id, seq, DUPLICATE, reply))
                continue  # a None reply means it is executing: the answer follows execution
            if status == TOO_OLD:
                if origin is not None:
                    replies.append((origin, client_id, seq, TOO_OLD, b""))
                continue
            # UNKNOWN_SESSION is only final at execution, where every replica agrees on it.
            if len(pending) >= limit or (origin is not None and by_origin.get(origin, 0) >= per_origin):
                # Memory stays bounded whatever the gateways send; nothing was acknowledged, and
                # the gateway retransmits.
                self.stats["requests_dropped"] += 1
                continue
            req = pending[key] = _Pending(payload, now, origin)
            self.queue.append(key)
            if origin is not None:
                by_origin[origin] = by_origin.get(origin, 0) + 1
            if relay:
                req.forwarded = True
                held += 1
        if held:
            # The whole batch, as it came: the leader drops what it holds already or has ordered.
            self.stats["requests_relayed"] += held
            self._send(self.leader, m.Forward(msg.batch))
        if self.is_leader:
            self._propose()

    def _on_forward(self, sender, msg) -> None:
        self._on_requests(None, msg)  # no gateway to answer: the follower answers its own

    def _propose(self) -> None:
        """Leader: fill free slots of the window with batches of pending requests."""
        opt = self.opt
        while self.pending and self.next_instance <= self.commit + opt.window:
            if self.pending_changes:
                return  # M1: a membership change is in flight; nothing follows it until applied
            builder = BatchBuilder(opt.batch_max_requests, opt.batch_max_bytes)
            queue, pending, proposed = self.queue, self.pending, self.proposed
            while queue:
                key = queue[0]
                req = pending.get(key)
                if req is None:
                    queue.popleft()
                    continue
                if key[0] == SYSTEM_CLIENT:
                    if builder.count:
                        break  # a change goes alone in its instance
                    if not self._propose_change(key, req):
                        return  # waiting for the instances in flight to be decided (M1)
                    break
                if not builder.add(key[0], key[1], req.payload):
                    break
                queue.popleft()
                del pending[key]
                proposed[key] = req
            if builder.count == 0:
                if self.pending_changes or not (queue and queue[0] in pending):
                    break
                continue  # a refused change left the queue; go on with what follows it
            self._propose_value(builder.build(timestamp=self._stamp()))

    def _propose_change(self, key, req) -> bool:
        """Leader, with a change at the head of the queue: propose it, refuse it, or hand
        leadership off (the change removes this leader). False: wait for the log to drain."""
        if self.next_instance != self.commit + 1 or self.applied != self.commit:
            return False
        why = self._precheck_change(req.payload)
        change = Change.decode(req.payload)
        # A change that removes this leader is ordered here like any other: once it applies,
        # every replica moves to the next view at the same instance (_roles_changed). Handing
        # leadership off first instead would livelock when every voter holds a change removing
        # itself (concurrent operators): each new leader would hand off again.
        self.queue.popleft()
        del self.pending[key]
        if why:
            self._release_origin(req)
            self.stats["membership_refused"] = self.stats.get("membership_refused", 0) + 1
            if req.origin is not None:
                self._ready.replies.append((req.origin, key[0], key[1], SYSTEM, f"REFUSED {why}".encode()))
            return True
        new, _ = self.sessions.membership.check(change, self.n)
        value = core.pack_batch([(key[0], key[1], req.payload)], timestamp=self._stamp())
        self.proposed[key] = req
        self.pending_changes.append((self.next_instance, new))
        self._propose_value(value)
        return True

    def _release_origin(self, req) -> None:
        if req.origin is not None:
            left = self.pending_by_origin.get(req.origin, 1) - 1
            if left > 0:
                self.pending_by_origin[req.origin] = left
            else:
                self.pending_by_origin.pop(req.origin, None)

    def _stamp(self) -> int:
        # Batch timestamps drive session expiry on every replica; they must never go backwards.
        if self.clock_ms > self.last_stamp:
            self.last_stamp = self.clock_ms
        return self.last_stamp

    def _propose_value(self, value: bytes) -> None:
        i = self.next_instance
        self.next_instance = i + 1
        self._accept(i, self.view, value)
        self.sent_at[i] = self.now
        msg = m.Propose(self.view, i, value, self.commit)
        self._broadcast(msg)
        self._vote(i, self.id)

    # ------------------------------------------------------------------ normal case

    def _on_propose(self, sender, msg) -> None:
        if not self._from_current_leader(sender, msg.view):
            return
        i = msg.instance
        slot = self.log.get(i)
        if slot is None or not slot.decided:
            self._accept(i, msg.view, msg.value)
        self._send(sender, m.Accepted(self.view, i, 1))
        self._answered_at = self.now
        self._learn_leader_commit(msg.commit)

    def _on_accepted(self, sender, msg) -> None:
        if msg.view != self.view or not self.is_leader:
            return
        for i in range(max(msg.instance, self.commit + 1), msg.instance + msg.count):
            if i < self.next_instance:
                self._vote(i, sender)

    def _on_commit(self, sender, msg) -> None:
        if self._from_current_leader(sender, msg.view):
            self._learn_leader_commit(msg.commit)
            # An Ack only shows the leader that we are alive (step() counts any message as
            # contact). Under load our ACCEPTEDs already do; an Ack for every COMMIT would double
            # the messages of every instance. One per tick at most, none after an ACCEPTED.
            if self._answered_at != self.now:
                self._answered_at = self.now
                self._send(sender, m.Ack(self.view, self.commit))

    def _on_ack(self, sender, msg) -> None:
        pass  # step() recorded the contact; that is all an Ack is for

    def has_quorum_contact(self) -> bool:
        """Leader: a quorum (itself included) was heard from within the election timeout. A
        leader cut off into a minority stays 'normal' but must not call itself ready."""
        cfg = self.sessions.membership
        recent = sum(1 for r, t in self.contact.items()
                     if r in cfg.voters and self.now - t < self.opt.election_ticks)
        return recent + (self.id in cfg.voters) >= self._quorum(cfg)

    def _from_current_leader(self, sender, view) -> bool:
        """Admits a normal-case message; handles the ones from other views."""
        if view < self.view:
            self.stats["stale_messages"] += 1
            if sender not in self.sessions.membership.members:
                # A replica outside the membership gets no stream, so nothing else tells it that
                # the group moved on (one removed while cut off may lead its old view for good):
                # say how far we got, and its catch-up brings it the decided changes.
                self._send(sender, m.CatchupReply(self.view, self.commit, ()))
            return False
        if sender != self.leader_of(view) or sender == self.id:
            return False
        if view > self.view:
            if self.id not in self.sessions.membership.voters:
                self._follow_view(view)
                return True
            # A view change completed without us: promise the view, then ask its leader for
            # the START_VIEW that tells us its log.
            self._start_view_change(view, announce=False,
                                    reason=f"missed the change to view {view} (heard its leader)")
            return False
        if self.status != NORMAL:
            if self.now - self.vc_last_sent >= self.opt.retransmit_ticks:
                self.vc_last_sent = self.now
                self._send(sender, self._make_do_view_change())
            return False
        self.last_heard = self.now
        return True

    def _accept(self, i, view, value) -> None:
        slot = self.log.get(i)
        if slot is not None and slot.decided:
            return  # R4
        self.log[i] = _Slot(view, value)
        if i > self.top:
            self.top = i
        self._ready.persist.append(AcceptRecord(i, view, value))
        if i <= self.leader_commit and view == self.view and self.status == NORMAL and not self.is_leader:
            self.log[i].decided = True

    def _vote(self, i, replica) -> None:
        cfg = self._config_of(i) if self.pending_changes else self.sessions.membership
        if replica in cfg.voters and self._tracker_of(cfg).add(i, self.view, replica):  # M2
            self.log[i].decided = True

    def _learn_leader_commit(self, commit) -> None:
        if commit <= self.leader_commit:
            return
        self.leader_commit = commit
        if commit > self.catchup_target:
            self.catchup_target = commit
        view, log = self.view, self.log
        for i in range(max(self.commit, self.marked_upto) + 1, commit + 1):
            slot = log.get(i)
            if slot is not None and slot.view == view:
                slot.decided = True  # R3
        self.marked_upto = max(self.marked_upto, commit)

    # ------------------------------------------------------------------ ticks

    def _leader_tick(self) -> None:
        opt, now = self.opt, self.now
        for i in range(self.commit + 1, self.next_instance):
            slot = self.log[i]
            if slot.decided or now - self.sent_at.get(i, 0) < opt.retransmit_ticks:
                continue
            self.sent_at[i] = now
            voters = self._tracker_of(self._config_of(i)).voters(i)
            msg = m.Propose(self.view, i, slot.value, self.commit)
            for r in self._peers:
                if not voters >> r & 1:
                    self._send(r, msg)
        if now - self.last_sent >= opt.heartbeat_ticks:
            self._broadcast(m.Commit(self.view, self.commit))

    def _follower_tick(self) -> None:
        opt, now = self.opt, self.now
        if self.id not in self.sessions.membership.voters:
            # Outside the voters nobody is suspected; ask now and then how far the group got, as
            # a replica outside the membership gets no stream to learn it from. Each time another
            # id of hosts.conf: its own membership may be long stale, its view's leader gone.
            if now - self.catchup_sent >= opt.election_ticks and self.commit >= self.catchup_target \
                    and self.transfer_from is None:
                self.catchup_sent = now
                self.catchup_peer += 1
                peer = (self.id + 1 + self.catchup_peer % (self.n - 1)) % self.n
                self.stats["catchup_requests"] += 1
                self._send(peer, m.CatchupRequest(self.view, self.commit + 1))
            return
        if now - self.last_heard >= opt.election_ticks:
            dropped = " after its connection dropped" if self.lost_leader_of == self.view else ""
            self._start_view_change(self._next_view(self.view), reason=f"leader silent for {now - self.last_heard} ticks{dropped}")
            return
        queue, pending = self.queue, self.pending
        while queue and (queue[0] not in pending or (
                queue[0][0] == SYSTEM_CLIENT and now - pending[queue[0]].arrived >= 2 * opt.request_ticks)):
            # A membership change the leader has not ordered by now was refused (a leader answers
            # refusals only to whoever sent it the change) or lost; its requester asks again.
            # Held on, it would make this replica suspect every leader in turn, for good.
            req = pending.pop(queue.popleft(), None)
            if req is not None:
                self._release_origin(req)
        if not queue or now - pending[queue[0]].arrived < opt.request_ticks:
            return
        caught_up = self.commit >= self.catchup_target
        if caught_up and now - pending[queue[0]].arrived >= 2 * opt.request_ticks:
            # The leader hears us (or we would have timed out above) but does not order a
            # request it was sent twice: move to a leader that will.
            self._start_view_change(self._next_view(self.view), reason="a request waited too long for order")
            return
        builder = BatchBuilder(opt.batch_max_requests, opt.batch_max_bytes)
        for key in queue:
            req = pending.get(key)
            if req is None or req.forwarded:
                continue
            if now - req.arrived < opt.request_ticks or not builder.add(key[0], key[1], req.payload):
                break
            req.forwarded = True
        if builder.count:
            self.stats["requests_forwarded"] += builder.count
            self._send(self.leader, m.Forward(builder.build()))

    def _view_change_tick(self) -> None:
        opt, now = self.opt, self.now
        backoff = min(1 << min(self.vc_attempt, 16), opt.max_view_change_backoff)
        if now - self.vc_started >= opt.election_ticks * backoff:
            self.vc_attempt += 1
            # Maybe the others went on without us (they removed us, or decided past a view we
            # cannot complete): what they decided says so. Ask another peer each time: the one
            # asked last may know no more than we do.
            if now - self.catchup_sent >= opt.retransmit_ticks:
                self.catchup_peer += 1
                self._request_catchup()
            self._start_view_change(self._next_view(self.view), reason=f"view change to {self.view} did not complete")
        elif now - self.vc_last_sent >= opt.retransmit_ticks:
            self.vc_last_sent = now
            self._broadcast(m.StartViewChange(self.view))
            if self.leader != self.id:
                self._send(self.leader, self._make_do_view_change())
            else:
                self._try_finish_view_change()

    # ------------------------------------------------------------------ view change

    def _on_start_view_change(self, sender, msg) -> None:
        if msg.view > self.view and sender in self.sessions.membership.voters:
            self._start_view_change(msg.view, reason=f"replica {sender} moved to view {msg.view}")

    def _start_view_change(self, view, announce=True, reason="") -> None:
        if self.id not in self.sessions.membership.voters:
            self._follow_view(view)  # a non-voter never campaigns: it follows the view's leader
            return
        if self.is_leader:
            self._step_down()
        self.view_change_reason = reason
        self.stats["view_changes"] += 1
        self.view = view
        self.status = VIEW_CHANGE
        self._ready.persist.append(ViewRecord(view))
        self.vc_started = self.vc_last_sent = self.now
        self.dvcs = {}
        self.leader_commit = 0
        self.marked_upto = self.commit
        if announce:
            self._broadcast(m.StartViewChange(view))
        dvc = self._make_do_view_change()
        if self.leader_of(view) == self.id:
            self.dvcs[self.id] = dvc
            self._try_finish_view_change()
        else:
            self._send(self.leader_of(view), dvc)

    def _step_down(self) -> None:
        """A leader leaving its view: requests in undecided instances wait for order again."""
        for key, req in self.proposed.items():
            req.arrived = self.now
            self.pending[key] = req
            self.queue.append(key)
        self.proposed = {}
        self.sent_at = {}
        self.pending_changes = []

    def _follow_view(self, view) -> None:
        """A learner (or a replica outside the membership) moves to `view` without taking part:
        its votes count for nothing, so it neither promises nor gathers."""
        if self.proposed:
            self._step_down()
        if view > self.view:
            self.view = view
            self._ready.persist.append(ViewRecord(view))
        self.status = NORMAL
        self.dvcs = {}
        self.leader_commit = 0
        self.marked_upto = self.commit
        self.last_heard = self.now

    def _make_do_view_change(self) -> m.DoViewChange:
        entries = []
        log = self.log
        for i in range(self.commit + 1, self.top + 1):
            slot = log.get(i)
            if slot is not None:
                entries.append((i, m.DECIDED_VIEW if slot.decided else slot.view, slot.value))
        return m.DoViewChange(self.view, self.commit, tuple(entries))

    def _on_do_view_change(self, sender, msg) -> None:
        if msg.view < self.view or sender not in self.sessions.membership.voters:
            return  # only voters take part in view changes
        if msg.view > self.view:
            self._start_view_change(msg.view, reason=f"replica {sender} moved to view {msg.view}")
        if self.leader_of(msg.view) != self.id:
            return
        if self.status == NORMAL:
            self._send(sender, self._make_start_view())  # a straggler missed START_VIEW
            return
        self.dvcs[sender] = msg
        self._try_finish_view_change()

    def _try_finish_view_change(self) -> None:
        dvcs = self.dvcs
        cfg = self.sessions.membership
        if self.id not in cfg.voters or not cfg.quorum_in(dvcs, self._quorum(cfg)):
            return
        best = max(dvcs.values(), key=lambda d: d.commit)
        if best.commit > self.commit:
            # Values up to best.commit are decided; we must hold them before choosing above.
            if best.commit > self.catchup_target:
                self.catchup_target = best.commit
            for r, d in dvcs.items():
                if d is best and r != self.id and r in self._peers:
                    self.catchup_peer = self._peers.index(r)
            if self.now - self.catchup_sent >= self.opt.retransmit_ticks:
                self._request_catchup()
            return
        start = self.commit + 1
        chosen = self._choose_values(dvcs, start)
        changes = self._changes_in(chosen, start)
        if not all(self._meets_every_quorum(c, dvcs) for _, c in changes):
            return  # M3: wait until the DO_VIEW_CHANGEs also cover the memberships chosen values lead to
        self._install_view(chosen, changes)

    def _meets_every_quorum(self, cfg: Membership, senders) -> bool:
        """Do `senders` share a voter with every quorum of `cfg`? That is what M3 needs to see
        whatever such a quorum decided. With an even number of voters it is half of them, not a
        majority: a promotion in flight (3 voters becoming 4) must not need a DO_VIEW_CHANGE
        from the learner it promotes, which takes no part in view changes, nor from a voter
        that lost its disk and cannot recover before a view completes."""
        inside = sum(1 for r in senders if r in cfg.voters)
        return inside > len(cfg.voters) - self._quorum(cfg)

    def _changes_in(self, chosen, start) -> list:
        """The membership changes among the values a view change is about to install, as
        (instance, membership after it), each checked against the one before it."""
        changes = []
        cfg = self.sessions.membership
        log = self.log
        for i in sorted(chosen):
            slot = log.get(i)
            value = slot.value if slot is not None and slot.decided else chosen[i][1]
            change = _change_in(value)
            if change is not None:
                new, _ = cfg.check(change, self.n)
                if new is not None:
                    changes.append((i, new))
                    cfg = new
        return changes

    def _choose_values(self, dvcs, start) -> dict:
        """Per instance >= start, the value accepted in the highest view any of a quorum saw."""
        chosen = {}
        for d in dvcs.values():
            for i, accepted_view, value in d.entries:
                if i >= start:
                    c = chosen.get(i)
                    if c is None or accepted_view > c[0]:
                        chosen[i] = (accepted_view, value)
        return chosen

    def _install_view(self, chosen, changes) -> None:
        start = self.commit + 1
        top = max(chosen, default=self.commit)
        self.pending_changes = changes
        noop = None
        entries = []
        view = self.view
        self.status = NORMAL
        self.dvcs = {}
        self.vc_attempt = 0
        self.leader_commit = 0
        for i in range(start, top + 1):
            c = chosen.get(i)
            if c is not None:
                value = c[1]
            else:
                if noop is None:
                    noop = core.pack_batch((), timestamp=self._stamp())
                value = noop
            slot = self.log.get(i)
            if slot is not None and slot.decided:
                value = slot.value
            else:
                self._accept(i, view, value)
            entries.append((i, value))
            self.sent_at[i] = self.now
            for client_id, seq, _ in Batch(value):
                req = self.pending.pop((client_id, seq), None)
                if req is not None:
                    self.proposed[(client_id, seq)] = req
        self.next_instance = top + 1
        self._broadcast(m.StartView(view, self.commit, tuple(entries)))
        for i in range(start, top + 1):
            if not self.log[i].decided:
                self._vote(i, self.id)
        self._reset_request_timers()
        self._propose()

    def _make_start_view(self) -> m.StartView:
        entries = tuple((i, self.log[i].value) for i in range(self.commit + 1, self.next_instance))
        return m.StartView(self.view, self.commit, entries)

    def _on_start_view(self, sender, msg) -> None:
        if msg.view < self.view or sender != self.leader_of(msg.view) or sender == self.id:
            return
        if msg.view > self.view:
            self.view = msg.view
            self._ready.persist.append(ViewRecord(msg.view))
            self.stats["view_changes"] += 1
        if self.status != NORMAL:
            self.status = NORMAL
            self.vc_attempt = 0
            self.dvcs = {}
            self._reset_request_timers()
        self.leader_commit = 0
        self.marked_upto = self.commit
        self.last_heard = self.now
        for i, value in msg.entries:
            self._accept(i, self.view, value)
        if msg.entries:
            self._send(sender, m.Accepted(self.view, msg.entries[0][0], len(msg.entries)))
        self._learn_leader_commit(msg.commit)

    def _reset_request_timers(self) -> None:
        # A new view gets the full request timeout before anyone suspects its leader.
        now = self.now
        for req in self.pending.values():
            req.arrived = now
            req.forwarded = False

    # ------------------------------------------------------------------ recovery

    def _on_recovery(self, sender, msg) -> None:
        primary = self.is_leader
        entries = ()
        if primary:
            entries = tuple((i, self.log[i].value) for i in range(self.commit + 1, self.next_instance))
        # "Empty" means holding no value, whatever the view: views alone decide nothing.
        empty = self.status == RECOVERING or (self.top == 0 and self.commit == 0)
        self._send(sender, m.RecoveryResponse(self.view, msg.nonce, self.commit, primary, empty, entries,
                                              self.sessions.membership.encode()))

    def _on_recovery_response(self, sender, msg) -> None:
        if self.status != RECOVERING or msg.nonce != self.recovery_nonce or self.recovery_primary:
            return  # an answer to an earlier incarnation's question: its state may be stale
        self.recovery_responses[sender] = msg
        answers = self.recovery_responses
        # The newest membership any of them reports decides whose answers count (the bootstrap
        # one while nobody has changed it). Only the others answer, never this replica.
        cfg = self.sessions.membership
        for a in answers.values():
            if a.membership:
                try:
                    theirs = Membership.decode(a.membership)
                except ValueError:
                    continue
                if theirs.index > cfg.index:
                    cfg = theirs
        if not cfg.quorum_in(answers, self._quorum(cfg)):
            return
        # Not being a voter now is no shortcut: an empty disk cannot tell a replica that never
        # voted from one that voted (as a voter of an earlier membership, which lagging peers may
        # still count it in) and lost its disk. Starting empty, it would also hold the bootstrap
        # membership, and could lead view 0 by it. So every replica restores its votes first.
        if all(a.empty for a in answers.values()):
            # A quorum of the others holds no value, so no value was ever decided: a decided
            # value lives in a quorum of logs, and even without ours this quorum meets it. Start
            # empty; higher views are joined as their messages arrive.
            self._finish_recovery(0, None)
            return
        # The latest view among the voters' answers: a replica outside the membership may hold
        # a view the group never reached (it campaigned alone before it learned it was removed).
        view = max(a.view for r, a in answers.items() if r in cfg.voters)
        primary = answers.get(self.leader_of(view))
        if primary is not None and primary.view == view and primary.primary:
            # First hold every value decided up to the leader's commit point: until then a
            # DO_VIEW_CHANGE from us could not vouch for them.
            self.recovery_primary = primary
            if primary.commit > self.catchup_target:
                self.catchup_target = primary.commit
            peers = self._catchup_peers()
            if self.leader_of(view) in peers:
                self.catchup_peer = peers.index(self.leader_of(view))
            self._check_recovered()
        # else: wait for the latest view's leader (or for a newer view with a live leader)

    def _check_recovered(self) -> None:
        primary = self.recovery_primary
        if primary is not None and self.commit >= primary.commit:
            self._finish_recovery(primary.view, primary)
        elif primary is not None and self.now - self.catchup_sent >= self.opt.retransmit_ticks:
            self._request_catchup()

    def _finish_recovery(self, view, primary) -> None:
        """Adopt the latest view's leader's log: it holds every value this replica might have
        voted for before losing its disk, so its votes are restored before it votes again."""
        self.status = NORMAL
        self.recovery_primary = None
        self.recovery_responses = {}
        self.view = view
        self._ready.persist.append(ViewRecord(view))
        self.last_heard = self.now
        self.leader_commit = 0
        if primary is not None:
            for i, value in primary.entries:
                self._accept(i, view, value)
            if primary.commit > self.catchup_target:
                self.catchup_target = primary.commit
            self._learn_leader_commit(primary.commit)
        self.stats["recoveries"] = self.stats.get("recoveries", 0) + 1
        if self.is_leader:
            self._propose()  # requests that arrived while it recovered (a new cluster's first ones)

    # ------------------------------------------------------------------ catch-up

    def _catchup_peers(self) -> tuple:
        """Whom to ask for decided values: the members, or every id of hosts.conf while the
        membership this replica holds says nothing about who has them (it recovers from an
        empty disk, with the bootstrap membership; or it holds no member but itself)."""
        if self.status == RECOVERING or not self._peers:
            return tuple(r for r in range(self.n) if r != self.id)
        return self._peers

    def _request_catchup(self) -> None:
        peers = self._catchup_peers()
        if not peers or self.transfer_from is not None:
            return  # a state transfer is under way: the values it covers are not in any log
        self.catchup_sent = self.now
        self.stats["catchup_requests"] += 1
        if self.status == NORMAL and self.leader != self.id and self.catchup_peer == 0:
            peer = self.leader
        else:
            peer = peers[self.catchup_peer % len(peers)]
        self._send(peer, m.CatchupRequest(self.view, self.commit + 1))

    def _on_catchup_request(self, sender, msg) -> None:
        if msg.start <= self.low:
            # Those values are only in our checkpoint now: the sender must fetch state.
            self._send(sender, m.LogTruncated(self.view, self.low))
            return
        if msg.start <= self.evicted:
            self._ready.serve_log.append((sender, msg.start))  # from the log files
            return
        entries = []
        size = 0
        opt = self.opt
        for i in range(max(msg.start, 1), self.commit + 1):
            value = self.log[i].value
            if entries and (len(entries) >= opt.catchup_max_entries or size + len(value) > opt.catchup_max_bytes):
                break
            entries.append((i, value))
            size += len(value)
        self._send(sender, m.CatchupReply(self.view, self.commit, tuple(entries)))

    def _on_catchup_reply(self, sender, msg) -> None:
        progressed = False
        for i, value in msg.entries:
            slot = self.log.get(i)
            if slot is not None and slot.decided:
                continue
            self.log[i] = _Slot(slot.view if slot is not None else 0, value, True)
            if i > self.top:
                self.top = i
            self._ready.persist.append(DecideRecord(i, value))
            progressed = True
        if msg.commit > self.catchup_target:
            self.catchup_target = msg.commit
        if progressed:
            self.catchup_sent = -1 << 60  # ask for the next chunk at once
        if self.status == VIEW_CHANGE and self.leader == self.id:
            self._advance_commit()
            self._try_finish_view_change()

    # ------------------------------------------------------------------ commit and apply

    def _after_input(self) -> None:
        if self.applied < self.commit or self.log.get(self.commit + 1) is not None:
            self._advance_commit()
        if self.status == RECOVERING:
            self._check_recovered()
            return
        if self.commit < self.catchup_target and self.now - self.catchup_sent >= self.opt.retransmit_ticks:
            self._request_catchup()

    def _advance_commit(self) -> None:
        log = self.log
        i = self.commit
        while True:
            slot = log.get(i + 1)
            if slot is None or not slot.decided:
                break
            i += 1
        advanced = i > self.commit
        self.commit = i
        if advanced and i % 64 == 0:
            self._discard_votes_below(i + 1)
        if self.applied == i:
            return
        apply = self._ready.apply
        pending, proposed = self.pending, self.proposed
        sessions = self.sessions
        by_origin = self.pending_by_origin
        every = self.opt.checkpoint_every
        membership = sessions.membership
        while self.applied < i:
            self.applied += 1
            value = log[self.applied].value
            plan = plan_batch(sessions, value)
            if len(plan) == 1 and plan[0][2] == SYSTEM:
                client_id, seq, _, payload = plan[0]
                plan = [(client_id, seq, SYSTEM, self._apply_change(payload))]
            apply.append((self.applied, value, plan))
            if every:
                # A function of the decided log alone, so every replica checkpoints at the same
                # instances and their checkpoints can be compared by hash.
                self.since_checkpoint += len(plan)
                if self.since_checkpoint >= every:
                    self.since_checkpoint = 0
                    self._ready.checkpoints.append((self.applied, sessions.capture()))
            for client_id, seq, _, _ in plan:
                key = (client_id, seq)
                req = pending.pop(key, None)
                if req is None:
                    req = proposed.pop(key, None)
                if req is not None and req.origin is not None:
                    left = by_origin[req.origin] - 1
                    if left:
                        by_origin[req.origin] = left
                    else:
                        del by_origin[req.origin]
            self.sent_at.pop(self.applied, None)
        if sessions.membership is not membership:
            self._roles_changed(membership)
        if advanced and self.is_leader:
            before = len(self._ready.messages)
            self._propose()
            if len(self._ready.messages) == before:
                self._broadcast(m.Commit(self.view, self.commit))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_stored(self, instance: int) -> int:
        """The driver made the checkpoint at `instance` durable (file and record). The log is
        kept back to the previous checkpoint, so a peer a little behind still catches up from
        the log; everything before that is dropped. Returns the new low end of the log: the
        driver may delete log segments and checkpoint files below it."""
        if instance <= self.low or instance > self.applied or (
                self.checkpoints and instance <= self.checkpoints[-1]):
            return self.low  # stale (a transfer installed a newer one meanwhile)
        self.checkpoints.append(instance)
        del self.checkpoints[:-2]
        if len(self.checkpoints) == 2:
            self._truncate_log(self.checkpoints[0])
        return self.low

    def _truncate_log(self, upto: int) -> None:
        if upto <= self.low:
            return
        self._drop_values(upto)
        self.low = upto
        self._discard_votes_below(upto + 1)

    def _drop_values(self, upto: int) -> None:
        log = self.log
        first = max(self.low, self.evicted)
        if upto - first < len(log):
            for i in range(first + 1, upto + 1):
                log.pop(i, None)
        else:
            for i in [i for i in log if i <= upto]:
                del log[i]
        if upto > self.evicted:
            self.evicted = upto

    def evict(self, upto: int) -> int:
        """The driver keeps memory bounded: drop the values of instances <= upto from memory
        (never above the applied point: those still have to be planned). Catch-up requests for
        them are then handed to the driver (Ready.serve_log), which reads its log files.
        Returns the new eviction point."""
        upto = min(upto, self.applied, self.commit)
        if upto > self.evicted:
            self._drop_values(upto)
        return self.evicted

    def _on_log_truncated(self, sender, msg) -> None:
        if msg.checkpoint <= self.commit or self.transfer_from is not None:
            return  # we hold everything up to there already, or are fetching it
        self.transfer_from = (sender, msg.checkpoint)
        self._ready.transfer = self.transfer_from

    def install_checkpoint(self, instance: int, sessions) -> bool:
        """The driver fetched, verified and stored a checkpoint (state transfer) and restored
        the app from it: this replica now holds every instance <= `instance`. False (and nothing
        changes) if it already did."""
        self.transfer_from = None
        if instance <= self.commit:
            return False
        if sessions.membership is None:
            sessions.membership = self.sessions.membership  # an image from before memberships
        before = self.sessions.membership
        self.sessions = sessions
        self.pending_changes = []
        self._on_membership()
        self.checkpoints = [instance]
        self._truncate_log(instance)
        self.commit = self.applied = self.marked_upto = instance
        if instance > self.top:
            self.top = instance
        if instance > self.catchup_target:
            self.catchup_target = instance
        self.since_checkpoint = 0
        self.catchup_sent = -1 << 60  # ask for what follows at once
        if sessions.membership != before:
            self._roles_changed(before)
        # Requests decided inside the transferred range will never be applied here; holding them
        # would make this replica forward them and then suspect a leader that already ordered them.
        for key in [k for k in self.pending if sessions.classify(*k) != EXECUTE]:
            self._release_origin(self.pending.pop(key))
        self._after_input()
        return True

    def transfer_failed(self) -> None:
        """The driver gave up on a transfer (no quorum agreed on a checkpoint, peers gone):
        catch-up resumes and a peer's LogTruncated starts the next attempt."""
        self.transfer_from = None
        self.catchup_sent = -1 << 60

    # ------------------------------------------------------------------ output

    def _send(self, dest, msg) -> None:
        self._ready.messages.append((dest, msg))

    def _broadcast(self, msg) -> None:
        out = self._ready.messages
        for r in self._peers:
            out.append((r, msg))
        self.last_sent = self.now
