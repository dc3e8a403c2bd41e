"""A deterministic simulation of a whole cluster: n protocol replicas, closed-loop clients, a
network that loses, delays, reorders, duplicates and partitions messages, replicas that crash
(at any point, including between writing and the fsync) and restart from what was durable: what
an fsync covered, and a prefix of what they wrote after it.
Membership changes happen among those faults: replicas outside the bootstrap voters start later
as fresh pods and join, members are asked to leave and maybe come back (disk kept or lost), and
an operator submits changes of its own, often stale or concurrent with others.
A replica's Readies are handled after every message it steps, or (Params.bursts) once per time
step, after every message delivered to it then and its tick: the bursts the daemon's loop makes.

Owns: simulated time, the network, the fault schedule, the membership scenario, the reference
execution (requests and membership changes) and the invariant checks. One seed fixes
everything: the same seed replays the same run exactly.
It must never use wall-clock time, threads, or randomness other than its seeded generators.
"""
import bisect
import hashlib
import heapq
import random

from .. import core
from ..gateway.calls import CallBook
from ..protocol import messages as m
from ..protocol.quorum import CrashFaultPolicy
from ..protocol.ready import group_commit
from ..protocol.records import AcceptRecord, CheckpointRecord, DecideRecord, DurableState
from ..protocol.membership import SYSTEM_CLIENT, Change, Membership
from ..protocol.replica import Replica
from ..protocol.sessions import DUPLICATE, EXECUTE, SYSTEM, Sessions, plan_batch, run_plan
from .kvapp import KVApp
from .membership_scenario import _STEPS, MembershipScenario, _Admin
from .params import Params, Result, Violation


class _Install:
    """A state transfer's outcome in flight to `incarnation` of a replica: (instance, app data,
    session table bytes, digest), or None when the transfer failed."""
    __slots__ = ("incarnation", "payload")

    def __init__(self, incarnation, payload):
        self.incarnation = incarnation
        self.payload = payload


class _Client:
    """A closed-loop client: a gateway's call book (smrd.gateway.calls, the daemon's own) with
    a workload. The simulation stands in for its sockets and for the status answers that give
    it leader hints."""

    def __init__(self, index, client_id, params):
        self.index = index
        self.client_id = client_id  # sessions never expire here (the ttl is 10**12 ticks)
        self.book = CallBook(
            range(params.n), k=params.reply_cache, max_inflight=params.client_window,
            reply_quorum=1, retransmit_s=params.options.request_ticks, deadline_s=float("inf"),
            check_every=0, new_client_id=lambda: client_id)
        self.completed = 0


class Simulation(MembershipScenario):
    def __init__(self, seed: int, params: Params = None, replica_class=Replica,
                 policy_class=CrashFaultPolicy, trace=None, membership_rule=None,
                 group_commit=group_commit):
        """`membership_rule(membership, change, n)` -> (new membership or None, why): the rule
        the reference execution applies changes by (default: the protocol's Membership.check).
        Only tests of deliberately different rules pass another one."""
        self.seed = seed
        self.p = params or Params.swarm(seed)
        self.rng = random.Random(seed)
        # Membership events draw from their own generator: the fault schedule of a run without
        # them is exactly what it was before they existed.
        self.mrng = random.Random(seed * 6007 + 1)
        self.drng = random.Random(seed * 7793 + 3)  # directed sends: their own draws, likewise
        self.replica_class = replica_class
        # The persist/send rule (smrd.protocol.ready): the daemon's, unless a test plants a bad one.
        self.group_commit = group_commit
        self.policy = policy_class(self.p.n)
        self.trace = trace            # callable(str) or None
        self.rule = membership_rule or Membership.check
        self.t = 0
        self.healed = False
        n = self.p.n
        # Each replica's log: what an fsync made durable, and what was written after its last
        # fsync, which a crash loses but for a prefix. A crash that is not mid-Ready draws that
        # prefix from its own generator: the fault schedule's draws stay what they were.
        self.durable = [[] for _ in range(n)]
        self.unsynced = [[] for _ in range(n)]
        # With bursts: per replica, (view, instance) -> the value an ACCEPTED stepped since its last
        # drain vouches for (the slot may change again before the burst is handled).
        self.vouched = [{} for _ in range(n)]
        self.krng = random.Random(seed * 5381 + 29)
        # The daemon's recovery mark (smrd/replica/driver.py): made on disk when a replica starts empty,
        # removed once the record that ends its recovery is durable.
        self.recovery_mark = [False] * n
        # Checkpoint "files" per replica: instance -> (app data, session table bytes, digest).
        self.stored = [{} for _ in range(n)]
        self.transfers = 0
        self.incarnations = 0
        self.wiped = set()             # replicas whose disk was lost and that have not recovered
        self.replicas = [None] * n
        self.apps = [None] * n
        self.executed = [None] * n     # per incarnation: (client_id, seq) run on the app
        self.incarnation = [None] * n  # per replica: the start (self.incarnations) it runs as
        self.tables = [None] * n       # per replica: the exactly-once table its core plans with
        self.down_until = [0] * n
        self.clients = [_Client(j, 1000 + j, self.p) for j in range(self.p.clients)]
        self.net = []                  # heap of (due tick, sequence, src, dst, message)
        self._seq = 0
        self.cut = set()               # (src, dst) links that drop everything
        self.decided = {}              # instance -> value, as first decided anywhere
        self.ref_sessions = Sessions(self.p.reply_cache, 10 ** 12)
        self.ref_app = KVApp()
        self.ref_applied = 0
        self.ref_results = {}          # instance -> execute_batch output of the reference
        self.ref_replies = {}          # (client_id, seq) -> reply of its first execution
        self.leaders = {}              # view -> replica ids seen leading it
        self.beyond_fault_model = None
        self.delivered = 0

        # Membership. The reference applies decided changes by the same rule as the replicas;
        # history[k] is the membership after k changes, in force after instance history_at[k-1].
        self.mem = self.p.membership
        boot = Membership.bootstrap(range(n) if self.p.voters is None else self.p.voters)
        self.boot_voters = tuple(sorted(boot.voters))
        self.history = [boot]
        self.history_at = []
        self.ref_sessions.membership = boot
        self.system_answers = {}       # seq of a SYSTEM entry -> answers of its decided copies
        # Votes, never forgotten (a lost disk does not undo a vote that was counted): instance ->
        # {(view, value): replicas that persisted that value in that view or voted for it}.
        self.support = {}
        # What each replica is meant to do: "join" (auto_join: be a voter) or "leave".
        self.intent = {r: "join" for r in range(n)} if self.mem else {}
        self.stopped = set()           # not running on purpose: a pod not created yet, or deleted
        self.start_at = {}             # stopped replica -> tick its (new) pod starts
        self.left = set()              # leavers seen out of the membership (their pod's fate drawn)
        self.disk_lost = set()         # replicas that ever lost their disk
        self.admin = _Admin()
        self.leaves = self.rejoins = 0
        joiners = dict(self.p.joiners)
        for r in range(n):
            if joiners.get(r, 0) > 0:
                self.stopped.add(r)
                self.start_at[r] = joiners[r]
            else:
                self._start(r)

    # ------------------------------------------------------------------ replicas

    def _start(self, r):
        p = self.p
        durable = DurableState.fold(self.durable[r]) if self.durable[r] else None
        # One or two bootstrap voters can never hear a quorum of others answer a recovery: such
        # a cluster is bootstrapped with new_cluster = true (docs/PROTOCOL.md), which stays in
        # their configuration; it is never set for a replica that replaces a lost disk.
        new_cluster = (self.mem and len(self.boot_voters) < 3 and r in self.boot_voters
                       and r not in self.disk_lost)
        self.incarnations += 1
        self.apps[r] = KVApp()
        sessions = Sessions(p.reply_cache, 10 ** 12)
        if durable is not None and durable.checkpoint is not None:
            data, blob, digest = self.stored[r][durable.checkpoint.instance]
            if digest != durable.checkpoint.digest:
                raise Violation(f"replica {r}: checkpoint file differs from its record")
            self.apps[r].data = dict(data)
            sessions = Sessions.restore(p.reply_cache, 10 ** 12, blob)
        rep = self.replica_class(
            r, self.policy, p.options, sessions, durable,
            recovery_nonce=None if new_cluster else self.incarnations,
            voters=self.boot_voters, auto_join=self.intent.get(r) == "join",
            resume_recovery=self.recovery_mark[r])
        if rep.status == "recovering":
            self.recovery_mark[r] = True
        if self.intent.get(r) == "leave":
            rep.request_leave()
        self.replicas[r] = rep
        self.incarnation[r] = self.incarnations  # which start of replica r a transfer was for
        self.tables[r] = sessions  # the exactly-once table replica r plans with
        self.executed[r] = set()
        role = f", {self.intent[r]}" if self.mem else ""
        self._log(f"replica {r} starts (view {rep.view}, commit {rep.commit}{role})")
        self._drain(r)

    def _crash(self, r, why, keep=None):
        self._log(f"replica {r} crashes ({why})")
        self._lose_unsynced(r, keep)
        self.vouched[r] = {}
        self.replicas[r] = None
        self.down_until[r] = self.t + self.rng.randint(1, self.p.restart_after)

    def _stop(self, r, why):
        """The replica's pod goes away on purpose; it starts again only if start_at says when."""
        self._log(f"replica {r} stops ({why})")
        self._lose_unsynced(r)
        self.vouched[r] = {}
        self.replicas[r] = None
        self.stopped.add(r)
        self.start_at.pop(r, None)

    # ------------------------------------------------------------------ the disk

    def _write(self, r, records):
        self.unsynced[r].extend(records)

    def _fsync(self, r):
        """Everything replica r wrote before it is durable: one fsync covers the whole log."""
        records, self.unsynced[r] = self.unsynced[r], []
        self._persist(r, records)

    def _lose_unsynced(self, r, keep=None):
        # The process dies with the machine (power loss, a kernel panic: the worst case), so the
        # page cache goes too. A log is written in order: a prefix of what was written since the
        # last fsync may have reached the disk, never a record without those before it (torn
        # writes are the WAL's checksums' business). `keep`: how many, when the caller drew it.
        unsynced, self.unsynced[r] = self.unsynced[r], []
        if unsynced:
            if keep is None:
                keep = self.krng.randint(0, len(unsynced))
            self._persist(r, unsynced[:keep])
            self._log(f"replica {r}: {keep} of the {len(unsynced)} records written since its last fsync survive")

    def _persist(self, r, records):
        # Durable from here on. A vote is recorded (`support`) only now: an accept that a crash
        # can still erase must not count toward the quorum the checks look for.
        self.durable[r].extend(records)
        for record in records:
            if type(record) is AcceptRecord and record.instance > self.ref_applied:
                self._support(record.instance, record.view, record.value, r)

    def _support(self, instance, view, value, r):
        self.support.setdefault(instance, {}).setdefault((view, bytes(value)), set()).add(r)

    def _votes_sent(self, r, msg):
        # An ACCEPTED is a vote for whatever the sender holds in those slots (a slot it holds
        # decided is voted for without a new record), when it is made: with bursts, what
        # `vouched` kept then.
        log, vouched = self.replicas[r].log, self.vouched[r]
        for i in range(max(msg.instance, self.ref_applied + 1), msg.instance + msg.count):
            value = vouched.get((msg.view, i))
            if value is None:
                slot = log.get(i)
                value = slot.value if slot is not None else self.decided.get(i)
            if value is not None:
                self._support(i, msg.view, value, r)

    def _drain(self, r):
        # Each Ready as the daemon handles a burst of them (smrd.protocol.ready's rules, the same
        # function): records written, early messages sent, the fsync, then the rest in order.
        # Without bursts a Ready holds what one message (or tick) produced; with them, what every
        # message delivered to r in this time step and its tick produced (Params.bursts).
        rep = self.replicas[r]
        while rep is not None and rep.has_ready():
            rd = rep.ready()
            commit = self.group_commit([rd])
            if commit.records and not self.healed and self.rng.random() < self.p.crash * self.p.crash_mid_ready:
                # The crash lands after the write, before the fsync: a prefix of what was written
                # since the last fsync (this burst's records and any unsynced ones before them)
                # survives, and what the rules let leave early has left.
                self._write(r, commit.records)
                keep = self.rng.randint(0, len(self.unsynced[r]))
                for dst, msg in commit.early:
                    self._send(r, dst, msg)
                self._crash(r, f"mid-ready: before the fsync, {len(commit.early)} sent", keep=keep)
                return
            # A burst with sync=False (commit points only, by the rules) is written and not
            # waited for: it becomes durable with the replica's next fsync, or a crash loses it.
            self._write(r, commit.records)
            for dst, msg in commit.early:
                self._send(r, dst, msg)
            if commit.sync:
                self._fsync(r)
            # As the daemon does, synced burst or not (the Ready that ends a recovery holds a view
            # promise, so its burst was synced).
            if self.recovery_mark[r] and rep.status != "recovering":
                self.recovery_mark[r] = False
            for dst, msg in rd.messages:
                if type(msg) is m.Accepted:
                    self._votes_sent(r, msg)
                self._send(r, dst, msg)
            for origin, client_id, seq, status, reply in rd.replies:
                self._reply(r, origin, client_id, seq, status, reply)
            images = dict(rd.checkpoints)
            filling = list(images.values())  # images wait for replies of requests planned before them
            for instance, value, plan in rd.apply:
                for client_id, seq, status, reply in self._apply(r, instance, value, plan):
                    if status == EXECUTE:
                        for image in filling:
                            image.fill(client_id, seq, reply)
                image = images.get(instance)
                if image is not None:
                    filling.remove(image)
                    self._store_checkpoint(r, instance, image)
                    if self.replicas[r] is None:
                        return
            if rd.transfer is not None:
                self._start_transfer(r, *rd.transfer)
            for peer, start in rd.serve_log:
                self._serve_from_log(r, peer, start)
            if self.p.evict_keep >= 0:
                self.replicas[r].evict(self.replicas[r].applied - self.p.evict_keep)
            self._check_replica(r)
        if self.vouched[r]:
            self.vouched[r] = {}

    def _apply(self, r, instance, value, plan):
        known = self.decided.get(instance)
        if known is None:
            self.decided[instance] = value
        elif known != value:
            raise Violation(f"agreement: replica {r} decided a different value for instance {instance}")
        self._run_reference()
        expected = self.ref_results.get(instance)
        if expected is None:
            raise Violation(f"replica {r} applied instance {instance} before instances below it were decided anywhere")
        results = run_plan(self.tables[r], plan, self.apps[r].execute)
        if results != expected:
            raise Violation(f"replica {r} instance {instance}: replies {results} differ from the "
                            f"sequential execution of the decided order {expected}")
        executed = self.executed[r]
        for client_id, seq, status, reply in results:
            if status == EXECUTE:
                if (client_id, seq) in executed:
                    raise Violation(f"replica {r} executed ({client_id}, {seq}) twice")
                executed.add((client_id, seq))
            if client_id != SYSTEM_CLIENT:
                self._reply(r, ("c", client_id - 1000), client_id, seq, status, reply)
            elif seq in self.admin.sent:
                self._reply(r, _Admin.ORIGIN, client_id, seq, status, reply)
            # else: a replica's own change; it learns the outcome from its membership
        return results

    # ------------------------------------------------------------------ checkpoints

    def _store_checkpoint(self, r, instance, image):
        rep = self.replicas[r]
        blob = image.encode()
        data = dict(self.apps[r].data)
        digest = hashlib.sha256(repr(sorted(data.items())).encode() + blob).digest()
        if not self.healed and self.rng.random() < self.p.crash * self.p.crash_mid_ready:
            self._crash(r, f"while storing the checkpoint at {instance}")
            return
        self.stored[r][instance] = (data, blob, digest)
        self._write(r, [CheckpointRecord(instance, digest, len(blob))])  # as the daemon: append, fsync
        self._fsync(r)
        low = rep.checkpoint_stored(instance)
        for old in [c for c in self.stored[r] if c < low]:
            del self.stored[r][old]
        self._log(f"replica {r} stored checkpoint {instance} (log kept from {low + 1})")

    def _serve_from_log(self, r, peer, start):
        # What the daemon does with its log files (WriteAheadLog.read_decided): the values the
        # replica evicted from memory, read back from what it persisted.
        rep = self.replicas[r]
        last = min(rep.commit, start + rep.opt.catchup_max_entries - 1)
        values = {}
        # The log files as the process reads them: unsynced writes included (the page cache).
        for record in self.durable[r] + self.unsynced[r]:  # the last record of an instance holds its value
            if type(record) in (AcceptRecord, DecideRecord) and start <= record.instance <= last:
                values[record.instance] = record.value
        entries = []
        for i in range(start, last + 1):
            if i not in values:
                break
            entries.append((i, values[i]))
        self._send(r, peer, m.CatchupReply(rep.view, rep.commit, tuple(entries)))

    def _start_transfer(self, r, peer, instance):
        # The daemon's transfer (chunks, hashes, a quorum's agreement) is tested against real
        # processes; here the state arrives whole, late, and maybe never (then the replica gives
        # up and asks again), while everything else keeps happening.
        src = self.stored[peer] if self.replicas[peer] is not None else {}
        usable = [c for c in src if c >= instance]
        incarnation = self.incarnation[r]
        self.transfers += 1
        if not usable or (not self.healed and self.rng.random() < self.p.drop):
            due, payload = self.t + self.p.options.retransmit_ticks, None
        else:
            c = max(usable)
            due, payload = self.t + self.rng.randint(1, 10), (c, *src[c])
        self._seq += 1
        heapq.heappush(self.net, (due, self._seq, peer, r, _Install(incarnation, payload)))

    def _install(self, r, msg):
        rep = self.replicas[r]
        if rep is None or self.incarnation[r] != msg.incarnation or rep.snapshot().transfer_from is None:
            return
        if msg.payload is None:
            rep.transfer_failed()
            self._drain(r)
            return
        instance, data, blob, digest = msg.payload
        if instance <= rep.commit:
            rep.transfer_failed()
            self._drain(r)
            return
        self._log(f"replica {r} installs checkpoint {instance} (its commit was {rep.commit})")
        self.apps[r].data = dict(data)
        self.stored[r][instance] = (data, blob, digest)
        self._write(r, [CheckpointRecord(instance, digest, len(blob))])
        self._fsync(r)
        table = Sessions.restore(self.p.reply_cache, 10 ** 12, blob)
        if rep.install_checkpoint(instance, table):
            self.tables[r] = table
        self._drain(r)

    # ------------------------------------------------------------------ reference and invariants

    def _run_reference(self):
        while (self.ref_applied + 1) in self.decided:
            i = self.ref_applied + 1
            value = self.decided[i]
            self._check_quorum(i, value)
            self.ref_applied = i
            plan = plan_batch(self.ref_sessions, value)
            if len(plan) == 1 and plan[0][2] == SYSTEM:
                client_id, seq, _, payload = plan[0]
                plan = [(client_id, seq, SYSTEM, self._ref_change(i, seq, payload))]
            out = run_plan(self.ref_sessions, plan, self.ref_app.execute)
            self.ref_results[i] = out
            for client_id, seq, status, reply in out:
                if status == EXECUTE:
                    self.ref_replies[(client_id, seq)] = reply

    def _ref_change(self, instance, seq, payload):
        """The reference's answer to a decided membership change (the bytes a replica must give)."""
        change = Change.decode(payload)
        old = self.history[-1]
        if change is None:
            answer = b"REFUSED malformed membership change"
        else:
            new, why = self.rule(old, change, self.p.n)
            if new is None:
                answer = f"REFUSED {why}".encode()
            else:
                moved = [r for r in old.members | new.members if old.role(r) != new.role(r)]
                if (new.index != old.index + 1 or not new.voters or len(moved) != 1
                        or (old.role(moved[0]), new.role(moved[0])) not in _STEPS):
                    raise Violation(f"membership chain: change {change} at instance {instance} takes "
                                    f"{old.describe()} to {new.describe()}, not one step of one replica")
                self.history.append(new)
                self.history_at.append(instance)
                self.ref_sessions.membership = new
                self._log(f"membership {new.index} from instance {instance}: voters {sorted(new.voters)} "
                          f"learners {sorted(new.learners)} ({change.op} {change.replica})")
                answer = (f"OK {change.op} {change.replica}: membership {new.index} voters "
                          f"{sorted(new.voters)} learners {sorted(new.learners)}").encode()
        self.system_answers.setdefault(seq, []).append(answer)
        return answer

    def _membership_at(self, applied):
        """The membership after executing every instance <= applied, by the decided order."""
        return self.history[bisect.bisect_right(self.history_at, applied)]

    def _check_quorum(self, i, value):
        # A decided value was accepted, in one view, by a majority of the voters of the membership
        # in force at its instance (the one the instances before it lead to). This is what M2 is
        # for: counting a vote of anyone else (a learner, a replica already removed, one only
        # about to be added) can decide without meeting the next view change's quorum.
        cfg = self.history[-1]
        need = len(cfg.voters) // 2 + 1
        value = bytes(value)
        seen = {}
        for (view, v), who in self.support.pop(i, {}).items():
            if v == value:
                voters = who & cfg.voters
                if len(voters) >= need:
                    return
                seen[view] = sorted(who)
        raise Violation(f"quorum: instance {i} was decided, but no view had a majority of the voters "
                        f"{sorted(cfg.voters)} (membership {cfg.index}) accept it; who accepted it, "
                        f"by view: {seen}")

    def _check_replica(self, r):
        rep = self.replicas[r]
        if rep is None:
            return
        if rep.is_leader:
            seen = self.leaders.setdefault(rep.view, set())
            seen.add(r)
            if len(seen) > 1 or rep.view % self.p.n != r:
                raise Violation(f"view {rep.view} has leaders {sorted(seen)}")
        # Membership is replicated state: every replica holds the one the decided order gives at
        # its applied point (so every membership in force is one of the chain of single changes).
        want = self._membership_at(rep.applied)
        if rep.membership != want:
            raise Violation(f"membership: replica {r} holds {rep.membership.describe()} after applying "
                            f"{rep.applied}; the decided order gives {want.describe()}")
        if rep.status == "view-change" and r not in want.voters:
            raise Violation(f"replica {r} campaigns for view {rep.view} but is not a voter of {want.describe()}")
        # Decided but not yet applied slots (out of order, above the commit point).
        for i in range(rep.commit + 1, rep.top + 1):
            slot = rep.log.get(i)
            if slot is not None and slot.decided:
                known = self.decided.get(i)
                if known is None:
                    self.decided[i] = slot.value
                elif known != slot.value:
                    raise Violation(f"agreement: replica {r} holds a different decided value for instance {i}")

    # ------------------------------------------------------------------ network

    def _send(self, src, dst, msg):
        p = self.p
        if p.encode:
            msg = m.encode(src if isinstance(src, int) else 0, msg)
        copies = 1
        if not self.healed:
            if self.rng.random() < p.drop:
                return
            if self.rng.random() < p.duplicate:
                copies = 2
        for _ in range(copies):
            self._seq += 1
            heapq.heappush(self.net, (self.t + self.rng.randint(0, p.max_delay), self._seq, src, dst, msg))

    def _deliver(self, src, dst, msg):
        if type(msg) is _Install:
            if self.p.bursts:
                self._drain(dst)  # the burst so far is handled before the transfer completes
            if (src, dst) in self.cut:
                msg.payload = None  # the transfer's connection broke: it fails, and is retried
            self._install(dst, msg)
            return
        if (src, dst) in self.cut:
            return
        if self.p.encode:
            sender, msg = m.decode(msg)
            if isinstance(src, int) and sender != src:
                raise Violation(f"codec: sender {sender} != {src}")
        self.delivered += 1
        if isinstance(dst, tuple):  # a client, or the operator
            if dst == _Admin.ORIGIN:
                self._admin_receive(msg)
            else:
                self._client_receive(self.clients[dst[1]], src, msg)
            return
        rep = self.replicas[dst]
        if rep is None:
            return
        # A client's origin is its address, never a replica id (the leader judges quorum
        # contact by the replica ids it hears from).
        rep.step(src, msg)
        if not self.p.bursts:
            self._drain(dst)
        elif type(msg) in (m.Propose, m.StartView):
            # What its ACCEPTED (if it made one) vouches for, before later messages of the burst
            # change those slots; drained after its tick (step()).
            instances = [msg.instance] if type(msg) is m.Propose else [i for i, _ in msg.entries]
            for i in instances:
                slot = rep.log.get(i)
                if slot is not None:
                    self.vouched[dst][(rep.view, i)] = slot.value

    # ------------------------------------------------------------------ clients

    def _reply(self, r, origin, client_id, seq, status, reply):
        entry = (client_id, seq, bytes([status]) + reply)
        self._send(r, origin, m.Replies(core.pack_batch([entry])))

    def _client_send(self, c, first):
        """What the client's call book says to send, over the simulated network. A first send
        sometimes reaches only some replicas (a fault the retransmission repairs)."""
        for out in c.book.take():
            batch = core.pack_batch([(call.key[0], call.key[1], call.payload) for call in out.calls])
            targets = out.to
            if first and not out.directed and self.rng.random() < 0.3:
                targets = self.rng.sample(range(self.p.n), self.rng.randint(1, self.p.n))
            for r in targets:
                self._send(("c", c.index), r, m.Requests(batch, out.directed))

    def _client_receive(self, c, src, msg):
        book = c.book
        for client_id, seq, data in core.Batch(msg.batch):
            call = book.calls.get((client_id, seq))
            if call is None:
                continue  # a late or duplicate reply
            status, reply = data[0], bytes(data[1:])
            if status not in (EXECUTE, DUPLICATE):
                raise Violation(f"client {client_id} seq {seq} got error status {status}: {reply!r}")
            self._run_reference()
            expected = self.ref_replies.get((client_id, seq))
            if expected != reply:
                raise Violation(f"client {client_id} seq {seq} got {reply!r}, the decided order gives {expected!r}")
            book.on_reply(src, (client_id, seq), reply, self.t)
            if call.done():
                c.completed += 1
        self._client_send(c, first=False)

    def _client_tick(self, c):
        book = c.book
        book.tick(self.t)
        self._client_send(c, first=False)  # retransmissions: to every replica
        if self.healed:
            return
        # The window (a gateway's obligation: no seq is issued k or more above its oldest
        # outstanding one, or the oldest could fall out of the reply cache before it runs) is
        # the call book's.
        while book.window_open():
            book.submit(self._workload(c, book.next_seq), self.t)
        if book.pending:
            # As a gateway with a leader hint sends, right or wrong: to one replica alone, which
            # passes the request on if it does not lead; a retransmission reaches them all.
            hinted = self.p.directed and self.drng.random() < self.p.directed
            book.leader = self.drng.randrange(self.p.n) if hinted else None
            book.flush()
            self._client_send(c, first=True)

    def _workload(self, c, seq):
        key = f"k{self.rng.randrange(self.p.keys)}"
        op = self.rng.random()
        if op < 0.45:
            return f"PUT {key} {c.client_id}.{seq}".encode()
        if op < 0.85:
            return f"GET {key}".encode()
        return f"REMOVE {key}".encode()

    # ------------------------------------------------------------------ faults

    def _faults(self):
        p, rng, n = self.p, self.rng, self.p.n
        if p.crash and rng.random() < p.crash:
            live = [r for r in range(n) if self.replicas[r] is not None]
            if live:
                self._crash(rng.choice(live), "killed")
        if p.wipe and rng.random() < p.wipe:
            # The fault model allows f lost disks at a time: wipe only when no replica is still
            # down or recovering from a wipe (and, with membership changes, never a voter of a
            # membership in force whose f is 0).
            self.wiped = {r for r in self.wiped if self.replicas[r] is None
                          or self.replicas[r].status == "recovering"}
            live = [r for r in range(n) if self.replicas[r] is not None]
            if not self.wiped and live:
                victim = rng.choice(live)
                if self._may_lose_disk(victim):
                    self._crash(victim, "killed, and its disk is lost")
                    self._lose_disk(victim)
        if p.partition and rng.random() < p.partition:
            kind = rng.random()
            nodes = list(range(n))
            if kind < 0.4:
                self.cut = set()
                self._log("network healed")
            elif kind < 0.8:
                side = set(rng.sample(nodes, rng.randint(1, n - 1)))
                self.cut = {(a, b) for a in nodes for b in nodes if (a in side) != (b in side)}
                self._log(f"partition {sorted(side)} | {sorted(set(nodes) - side)}")
            else:
                links = {(rng.choice(nodes), rng.choice(nodes)) for _ in range(n)}
                for j in range(len(self.clients)):
                    if rng.random() < 0.3:
                        links.add((("c", j), rng.choice(nodes)))
                self.cut = links
                self._log(f"asymmetric cuts {sorted(map(str, links))}")

    def _heal(self):
        self.healed = True
        self.cut = set()
        self._log("heal: faults stop, every replica restarts, clients and operators stop issuing")
        self.stopped.clear()
        self.start_at.clear()
        for r in range(self.p.n):
            if self.replicas[r] is None:
                self._start(r)

    # ------------------------------------------------------------------ run

    def _log(self, text):
        if self.trace is not None:
            self.trace(f"[t={self.t}] {text}")

    def step(self):
        """One tick: deliver due messages, tick replicas and clients, inject faults."""
        self.t += 1
        net = self.net
        while net and net[0][0] <= self.t:
            _, _, src, dst, msg = heapq.heappop(net)
            self._deliver(src, dst, msg)
        for r in range(self.p.n):
            rep = self.replicas[r]
            if rep is None:
                if r in self.stopped:
                    if self.t >= self.start_at.get(r, self.t + 1):
                        self.stopped.discard(r)
                        del self.start_at[r]
                        self._start(r)
                elif not self.healed and self.t >= self.down_until[r]:
                    self._start(r)
                continue
            rep.tick(self.t * 10)
            self._drain(r)
        for c in self.clients:
            self._client_tick(c)
        if not self.healed:
            if self.mem:
                self._membership_events()
            self._faults()

    def run(self) -> "Result":
        try:
            while self.t < self.p.fault_ticks:
                self.step()
            self._heal()
            deadline = self.t + self.p.liveness_ticks
            while self.t < deadline:
                self.step()
                if self._settled():
                    return Result(self.seed, self.p, True, None, self._summary())
            stateless = [r for r in range(self.p.n) if self.replicas[r].status == "recovering"]
            over = self._over_fault_model(stateless)
            if over:
                # More than f voters of a membership in force hold no durable state (lost disks,
                # or crashed before their first recovery ended): they cannot tell a new cluster
                # from lost votes, so they wait, by design. Outside the fault model: safety was
                # checked, liveness is not owed.
                self.beyond_fault_model = (f"{len(stateless)} replicas without durable state: {stateless}, "
                                           f"voters {sorted(over[0].voters)}")
                return Result(self.seed, self.p, True, None, self._summary())
            stuck = {c.client_id: sorted(seq for _, seq in c.book.calls) for c in self.clients
                     if c.book.calls}
            raise Violation(f"liveness: after healing, {self.p.liveness_ticks} ticks did not complete "
                            f"requests {stuck}, membership {self.history[-1].describe()} misses "
                            f"{self._unmet_intents()}; "
                            f"replicas {[r.describe() for r in self.replicas]}")
        except Violation as v:
            return Result(self.seed, self.p, False, f"t={self.t}: {v}", self._summary())

    def _settled(self):
        if any(c.book.calls for c in self.clients):
            return False
        applied = {rep.applied for rep in self.replicas}
        if len(applied) != 1 or self.ref_applied != next(iter(applied)):
            return False
        return not self._unmet_intents()

    def _unmet_intents(self):
        """Replicas meant to be voters that are not, and replicas that left but are members."""
        cfg = self.history[-1]
        return {r: want for r, want in self.intent.items()
                if ((r not in cfg.voters) if want == "join" else (r in cfg.members))}

    def _summary(self):
        live = [r for r in self.replicas if r is not None]
        summary = {"ticks": self.t, "decided": len(self.decided), "beyond_fault_model": self.beyond_fault_model,
                   "completed": sum(c.completed for c in self.clients),
                   "views": max((r.view for r in live), default=0), "delivered": self.delivered}
        if self.mem:
            cfg = self.history[-1]
            summary["membership"] = {
                "changes": len(self.history) - 1, "voters": sorted(cfg.voters), "learners": sorted(cfg.learners),
                "leaves": self.leaves, "rejoins": self.rejoins, "operator": dict(self.admin.answers),
                "operator_sent": len(self.admin.sent)}
        return summary


def run_seed(seed: int, **kw) -> Result:
    return Simulation(seed, **kw).run()
