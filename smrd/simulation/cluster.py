# A deterministic simulation of a whole cluster: n protocol replicas, closed-loop clients, a
# network that loses, delays, reorders, duplicates and partitions messages, replicas that crash
# (at any point, including between persisting and sending) and restart from what they persisted.
#
# Owns: simulated time, the network, the fault schedule, the reference execution and the
# invariant checks. One seed fixes everything: the same seed replays the same run exactly.
# It must never use wall-clock time, threads, or randomness other than its seeded generator.
import hashlib
import heapq
import random
from dataclasses import dataclass, field

from .. import core
from ..protocol import messages as m
from ..protocol.options import Options
from ..protocol.quorum import CrashFaultPolicy
from ..protocol.records import (
    AcceptRecord, CheckpointRecord, CommitRecord, DecideRecord, DurableState,
)
from ..protocol.replica import Replica
from ..protocol.sessions import DUPLICATE, EXECUTE, Sessions, execute_batch, run_plan
from .kvapp import KVApp


class Violation(AssertionError):
    """An invariant failed. The message says which, where and when."""


@dataclass(frozen=True)
class Params:
    n: int = 3
    clients: int = 3
    client_window: int = 2       # requests a client keeps outstanding
    reply_cache: int = 8         # k; must be >= client_window
    keys: int = 4
    drop: float = 0.0
    duplicate: float = 0.0
    max_delay: int = 2           # ticks; random delays reorder messages
    crash: float = 0.0           # chance per tick that some replica crashes
    crash_mid_ready: float = 0.0 # chance that a crash lands between persist and send
    wipe: float = 0.0            # chance per tick that a replica dies and loses its disk
    restart_after: int = 40      # ticks a crashed replica stays down (at most)
    partition: float = 0.0       # chance per tick that the link pattern changes
    fault_ticks: int = 400
    liveness_ticks: int = 3000   # after healing, every request must complete within this
    encode: bool = False         # push every message through the wire codec
    evict_keep: int = -1         # >= 0: values more than this far below applied leave memory
    options: Options = field(default_factory=lambda: Options(
        window=2, batch_max_requests=8, batch_max_bytes=4096, heartbeat_ticks=3,
        election_ticks=20, request_ticks=40, retransmit_ticks=6, max_view_change_backoff=4))

    @classmethod
    def swarm(cls, seed: int) -> "Params":
        """Each seed draws its own cluster size, fault mix and workload (swarm testing)."""
        r = random.Random(seed * 7919 + 17)
        window = r.choice([1, 2, 4])
        # Drawn from its own generator so that adding checkpoints left every older seed's
        # scenario as it was (the pinned regression seeds replay what once failed).
        extra = random.Random(seed * 31 + 5)
        every = extra.choice([0, 0, 3, 16])
        evict_keep = extra.choice([-1, -1, 0, 4])
        opts = Options(window=window, batch_max_requests=r.choice([1, 3, 16]),
                       batch_max_bytes=r.choice([64, 4096]), heartbeat_ticks=3,
                       election_ticks=20, request_ticks=40, retransmit_ticks=6,
                       max_view_change_backoff=4, catchup_max_entries=r.choice([1, 4, 64]),
                       checkpoint_every=every)
        client_window = r.choice([1, 2, 3])
        return cls(
            n=r.choice([3, 3, 5, 5, 7]), clients=r.randint(1, 4), client_window=client_window,
            reply_cache=client_window + r.choice([0, 1, 4]), keys=r.choice([1, 3, 8]),
            drop=r.choice([0.0, 0.01, 0.05, 0.15]), duplicate=r.choice([0.0, 0.02, 0.1]),
            max_delay=r.choice([0, 1, 3, 8]), crash=r.choice([0.0, 0.003, 0.01, 0.02]),
            crash_mid_ready=r.choice([0.0, 0.3]), restart_after=r.choice([5, 40, 150]),
            partition=r.choice([0.0, 0.005, 0.02]), fault_ticks=r.choice([200, 400, 600]),
            wipe=r.choice([0.0, 0.0, 0.002, 0.006]),
            encode=r.random() < 0.25, options=opts, evict_keep=evict_keep)


class _Install:
    """A state transfer's outcome in flight to `incarnation` of a replica: (instance, app data,
    session table bytes, digest), or None when the transfer failed."""
    __slots__ = ("incarnation", "payload")

    def __init__(self, incarnation, payload):
        self.incarnation = incarnation
        self.payload = payload


class _Client:
    """A closed-loop client (what a gateway is to the replicas): unique (client_id, seq) per
    request, sent to some replicas, retransmitted to all until a reply comes."""

    def __init__(self, index, client_id):
        self.index = index
        self.client_id = client_id
        self.next_seq = 1
        self.outstanding = {}   # seq -> [payload, last sent tick]
        self.completed = 0


class Simulation:
    def __init__(self, seed: int, params: Params = None, replica_class=Replica,
                 policy_class=CrashFaultPolicy, trace=None):
        self.seed = seed
        self.p = params or Params.swarm(seed)
        self.rng = random.Random(seed)
        self.replica_class = replica_class
        self.policy = policy_class(self.p.n)
        self.trace = trace            # callable(str) or None
        self.t = 0
        self.healed = False
        n = self.p.n
        self.durable = [[] for _ in range(n)]
        # Checkpoint "files" per replica: instance -> (app data, session table bytes, digest).
        self.stored = [{} for _ in range(n)]
        self.transfers = 0
        self.incarnations = 0
        self.wiped = set()             # replicas whose disk was lost and that have not recovered
        self.replicas = [None] * n
        self.apps = [None] * n
        self.executed = [None] * n     # per incarnation: (client_id, seq) run on the app
        self.down_until = [0] * n
        for r in range(n):
            self._start(r)
        self.clients = [_Client(j, 1000 + j) for j in range(self.p.clients)]
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

    # ------------------------------------------------------------------ replicas

    def _start(self, r):
        p = self.p
        durable = DurableState.fold(self.durable[r]) if self.durable[r] else None
        self.incarnations += 1
        self.apps[r] = KVApp()
        sessions = Sessions(p.reply_cache, 10 ** 12)
        if durable is not None and durable.checkpoint is not None:
            data, blob, digest = self.stored[r][durable.checkpoint.instance]
            if digest != durable.checkpoint.digest:
                raise Violation(f"replica {r}: checkpoint file differs from its record")
            self.apps[r].data = dict(data)
            sessions = Sessions.restore(p.reply_cache, 10 ** 12, blob)
        self.replicas[r] = self.replica_class(
            r, self.policy, p.options, sessions, durable, recovery_nonce=self.incarnations)
        self.replicas[r].sim_incarnation = self.incarnations
        self.executed[r] = set()
        self._log(f"replica {r} starts (view {self.replicas[r].view}, commit {self.replicas[r].commit})")
        self._drain(r)

    def _crash(self, r, why):
        self._log(f"replica {r} crashes ({why})")
        self.replicas[r] = None
        self.down_until[r] = self.t + self.rng.randint(1, self.p.restart_after)

    def _drain(self, r):
        rep = self.replicas[r]
        while rep is not None and rep.has_ready():
            rd = rep.ready()
            if rd.persist and not self.healed and self.rng.random() < self.p.crash * self.p.crash_mid_ready:
                keep = self.rng.randint(0, len(rd.persist))
                self.durable[r].extend(rd.persist[:keep])
                sent = 0
                if all(type(x) in (AcceptRecord, CommitRecord) for x in rd.persist):
                    # The daemon sends a leader's PROPOSEs while its own accept is being written
                    # (smrd/server.py, _propose_early): model that they left before the crash.
                    for dst, msg in rd.messages:
                        if type(msg) is m.Propose:
                            self._send(r, dst, msg)
                            sent += 1
                self._crash(r, f"mid-ready: {keep}/{len(rd.persist)} records durable, {sent} sent")
                return
            self.durable[r].extend(rd.persist)
            for dst, msg in rd.messages:
                self._send(r, dst, msg)
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
            for origin, client_id, seq, status, reply in rd.replies:
                self._reply(r, origin, client_id, seq, status, reply)
            self._check_replica(r)

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
        results = run_plan(self.replicas[r].sessions, plan, self.apps[r].execute)
        if results != expected:
            raise Violation(f"replica {r} instance {instance}: replies {results} differ from the "
                            f"sequential execution of the decided order {expected}")
        executed = self.executed[r]
        for client_id, seq, status, reply in results:
            if status == EXECUTE:
                if (client_id, seq) in executed:
                    raise Violation(f"replica {r} executed ({client_id}, {seq}) twice")
                executed.add((client_id, seq))
            self._reply(r, client_id - 1000, client_id, seq, status, reply)
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
        self.durable[r].append(CheckpointRecord(instance, digest, len(blob)))
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
        for record in self.durable[r]:  # the last record of an instance holds its value
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
        incarnation = self.replicas[r].sim_incarnation
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
        if rep is None or rep.sim_incarnation != msg.incarnation or rep.transfer_from is None:
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
        self.durable[r].append(CheckpointRecord(instance, digest, len(blob)))
        rep.install_checkpoint(instance, Sessions.restore(self.p.reply_cache, 10 ** 12, blob))
        self._drain(r)

    def _run_reference(self):
        while (self.ref_applied + 1) in self.decided:
            self.ref_applied += 1
            out = execute_batch(self.ref_sessions, self.decided[self.ref_applied], self.ref_app.execute)
            self.ref_results[self.ref_applied] = out
            for client_id, seq, status, reply in out:
                if status == EXECUTE:
                    self.ref_replies[(client_id, seq)] = reply

    def _check_replica(self, r):
        rep = self.replicas[r]
        if rep is None:
            return
        if rep.is_leader:
            seen = self.leaders.setdefault(rep.view, set())
            seen.add(r)
            if len(seen) > 1 or rep.view % self.p.n != r:
                raise Violation(f"view {rep.view} has leaders {sorted(seen)}")
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
        if isinstance(dst, tuple):  # a client
            self._client_receive(self.clients[dst[1]], msg)
            return
        rep = self.replicas[dst]
        if rep is None:
            return
        rep.step(src if isinstance(src, int) else src[1], msg)
        self._drain(dst)

    # ------------------------------------------------------------------ clients

    def _reply(self, r, origin, client_id, seq, status, reply):
        entry = (client_id, seq, bytes([status]) + reply)
        self._send(r, ("c", origin), m.Replies(core.pack_batch([entry])))

    def _client_send(self, c, seq, everyone):
        payload = c.outstanding[seq][0]
        c.outstanding[seq][1] = self.t
        batch = core.pack_batch([(c.client_id, seq, payload)])
        targets = range(self.p.n)
        if not everyone and self.rng.random() < 0.3:
            targets = self.rng.sample(range(self.p.n), self.rng.randint(1, self.p.n))
        for r in targets:
            self._send(("c", c.index), r, m.Requests(batch))

    def _client_receive(self, c, msg):
        for client_id, seq, data in core.Batch(msg.batch):
            if seq not in c.outstanding:
                continue  # a late or duplicate reply
            status, reply = data[0], bytes(data[1:])
            if status not in (EXECUTE, DUPLICATE):
                raise Violation(f"client {client_id} seq {seq} got error status {status}: {reply!r}")
            self._run_reference()
            expected = self.ref_replies.get((client_id, seq))
            if expected != reply:
                raise Violation(f"client {client_id} seq {seq} got {reply!r}, the decided order gives {expected!r}")
            del c.outstanding[seq]
            c.completed += 1

    def _client_tick(self, c):
        rto = self.p.options.request_ticks
        for seq, (payload, sent) in list(c.outstanding.items()):
            if self.t - sent >= rto:
                self._client_send(c, seq, everyone=True)
        if self.healed:
            return
        # A gateway's obligation: no seq is issued k or more above its oldest outstanding one,
        # or the oldest could fall out of the reply cache before it runs.
        while len(c.outstanding) < self.p.client_window and \
                c.next_seq < min(c.outstanding, default=c.next_seq) + self.p.reply_cache:
            seq = c.next_seq
            c.next_seq += 1
            c.outstanding[seq] = [self._workload(c, seq), self.t]
            self._client_send(c, seq, everyone=False)

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
            # down or recovering from a wipe.
            self.wiped = {r for r in self.wiped if self.replicas[r] is None
                          or self.replicas[r].status == "recovering"}
            live = [r for r in range(n) if self.replicas[r] is not None]
            if not self.wiped and live:
                victim = rng.choice(live)
                self._crash(victim, "killed, and its disk is lost")
                self.durable[victim] = []
                self.stored[victim] = {}
                self.wiped.add(victim)
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
        self._log("heal: faults stop, every replica restarts, clients stop issuing")
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
                if not self.healed and self.t >= self.down_until[r]:
                    self._start(r)
                continue
            rep.tick(self.t * 10)
            self._drain(r)
        for c in self.clients:
            self._client_tick(c)
        if not self.healed:
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
            if len(stateless) > self.policy.max_faults:
                # More than f replicas hold no durable state (lost disks, or crashed before their
                # first recovery ended): they cannot tell a new cluster from lost votes, so they
                # wait, by design. Outside the fault model: safety was checked, liveness is not owed.
                self.beyond_fault_model = f"{len(stateless)} replicas without durable state: {stateless}"
                return Result(self.seed, self.p, True, None, self._summary())
            stuck = {c.client_id: sorted(c.outstanding) for c in self.clients if c.outstanding}
            raise Violation(f"liveness: after healing, {self.p.liveness_ticks} ticks did not complete "
                            f"requests {stuck}; replicas {[r.describe() for r in self.replicas]}")
        except Violation as v:
            return Result(self.seed, self.p, False, f"t={self.t}: {v}", self._summary())

    def _settled(self):
        if any(c.outstanding for c in self.clients):
            return False
        applied = {rep.applied for rep in self.replicas}
        return len(applied) == 1 and self.ref_applied == next(iter(applied))

    def _summary(self):
        live = [r for r in self.replicas if r is not None]
        return {"ticks": self.t, "decided": len(self.decided), "beyond_fault_model": self.beyond_fault_model,
                "completed": sum(c.completed for c in self.clients),
                "views": max((r.view for r in live), default=0), "delivered": self.delivered}


@dataclass
class Result:
    seed: int
    params: Params
    ok: bool
    violation: str
    summary: dict

    def replay_command(self):
        return f"python -m smrd.simulation --seed {self.seed} --trace"


def run_seed(seed: int, **kw) -> Result:
    return Simulation(seed, **kw).run()
