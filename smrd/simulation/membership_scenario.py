"""The membership scenario of a simulated run: replicas that start later as fresh pods and join,
members asked to leave and maybe coming back (disk kept or lost), and an operator submitting
changes of its own, often stale or concurrent with others.

Owns: those events and the operator, as a part of Simulation (smrd.simulation.cluster). Never:
checks invariants (the simulation does) or uses randomness other than the run's seeded generators.
"""
import bisect

from .. import core
from ..protocol import messages as m
from ..protocol.membership import ADD_LEARNER, OPS, PROMOTE, SYSTEM_CLIENT, Change
from ..protocol.records import DurableState
from ..protocol.sessions import SYSTEM
from .params import Violation


class _Admin:
    """An operator submitting membership changes straight to replicas, as a controller or an
    admin command would: each change names the membership it was made for (the current one, a
    stale one, or one not there yet), and two operators sometimes submit at once. It does not
    retransmit: a change that is lost is simply not made."""
    ORIGIN = ("a", 0)

    def __init__(self):
        self.next_seq = 1 << 62  # above the seqs replicas give their own changes (tick << 16 | count)
        self.sent = {}           # seq -> Change
        self.answers = {"OK": 0, "REFUSED": 0}


# Role steps a single membership change may make (smrd.protocol.membership): the chain of
# memberships moves one replica by one step at a time, so consecutive majorities intersect.
_STEPS = {("none", "learner"), ("learner", "voter"), ("learner", "none"), ("voter", "none")}


class MembershipScenario:
    """Mixin of Simulation: the membership events, the operator and what they allow."""


    def _membership_events(self):
        p, rng, n = self.p, self.mrng, self.p.n
        cfg = self.history[-1]
        for r in range(n):
            if self.intent[r] == "leave" and r not in self.left and r not in cfg.members \
                    and self.replicas[r] is not None:
                # Out of the membership: the scale-down deletes its pod, or (half the time) the
                # pod lingers, a replica outside the membership.
                self.left.add(r)
                if rng.random() < 0.5:
                    self._stop(r, "it left the membership: its pod is deleted")
        if p.leave and rng.random() < p.leave:
            staying = [r for r in range(n) if self.intent[r] == "join"]
            members = [r for r in staying if r in cfg.members and self.replicas[r] is not None]
            if len(staying) >= 2 and members:  # someone must stay a voter
                r = rng.choice(members)
                self.intent[r] = "leave"
                self.leaves += 1
                self.replicas[r].request_leave()
                self._log(f"replica {r} is asked to leave ({cfg.role(r)} of membership {cfg.index})")
        if p.rejoin and rng.random() < p.rejoin:
            leavers = [r for r in range(n) if self.intent[r] == "leave"]
            if leavers:
                self._rejoin(rng.choice(leavers), cfg)
        if p.admin and rng.random() < p.admin:
            self._admin_submit(cfg)

    def _rejoin(self, r, cfg):
        rng = self.mrng
        self.intent[r] = "join"
        self.left.discard(r)
        self.rejoins += 1
        rep = self.replicas[r]
        if r in cfg.members:
            # Asked back before it was out: the running process changes its mind (a crashed one
            # restarts with auto_join).
            if rep is not None:
                rep.request_join()
            self._log(f"replica {r} is asked to stay after all")
            return
        # A new pod with the same id, on the old disk or on a new one.
        if rep is not None:
            self._stop(r, "its pod is replaced to rejoin")
        lost = ""
        if rng.random() < 0.5 and self._may_lose_disk(r):
            self._lose_disk(r)
            lost = ", with a new disk"
        self.stopped.add(r)
        self.start_at[r] = self.t + rng.randint(1, self.p.restart_after)
        self._log(f"replica {r} is asked to rejoin{lost} (its pod starts at t={self.start_at[r]})")

    def _admin_submit(self, cfg):
        rng, n = self.mrng, self.p.n
        joining = [r for r in range(n) if self.intent[r] == "join"]
        for _ in range(rng.choice([1, 1, 2])):  # sometimes two operators at once
            op = rng.choice(OPS)
            if op == ADD_LEARNER:
                pool = [r for r in joining if r not in cfg.members]
            elif op == PROMOTE:
                pool = [r for r in joining if r in cfg.learners]
            else:
                pool = sorted(cfg.members)
            if not pool or rng.random() < 0.15:
                pool = list(range(n + 1))  # whatever it is, including an id not in hosts.conf
            change = Change(op, rng.choice(pool), max(0, cfg.index + rng.choice([0, 0, 0, -1, 1])))
            seq = self.admin.next_seq
            self.admin.next_seq += 1
            self.admin.sent[seq] = change
            batch = core.pack_batch([(SYSTEM_CLIENT, seq, change.encode())])
            targets = rng.sample(range(n), rng.randint(1, n))
            self._log(f"operator submits {change} to {sorted(targets)}")
            for r in targets:
                self._send(_Admin.ORIGIN, r, m.Requests(batch))

    def _admin_receive(self, msg):
        for client_id, seq, data in core.Batch(msg.batch):
            status, reply = data[0], bytes(data[1:])
            if client_id != SYSTEM_CLIENT or seq not in self.admin.sent or status != SYSTEM:
                raise Violation(f"operator got a reply to something it never sent: {client_id} {seq} {status}")
            if reply.startswith(b"OK "):
                self._run_reference()
                if reply not in self.system_answers.get(seq, ()):
                    raise Violation(f"operator's change {self.admin.sent[seq]} answered {reply!r}; the decided "
                                    f"order answers {self.system_answers.get(seq)}")
                self.admin.answers["OK"] += 1
            elif reply.startswith(b"REFUSED "):
                self.admin.answers["REFUSED"] += 1
            else:
                raise Violation(f"operator's change {self.admin.sent[seq]} answered {reply!r}")

    def _memberships_in_force(self):
        """Every membership some replica may count votes by: from the oldest one a replica holds
        (or restarts into, from its disk) to the newest decided one, and the ones leaders expect
        their proposed changes to lead to. Conservative: a replica without state counts none."""
        lo = len(self.history) - 1
        ahead = []
        for r in range(self.p.n):
            rep = self.replicas[r]
            if rep is not None:
                if rep.status != "recovering":
                    lo = min(lo, rep.membership.index)
                    ahead.extend(c for _, c in rep.pending_changes)
            elif self.durable[r]:
                # It restarts into its checkpoint's membership (or the bootstrap one) and replays.
                checkpoint = DurableState.fold(self.durable[r]).checkpoint
                lo = min(lo, bisect.bisect_right(self.history_at, checkpoint.instance) if checkpoint else 0)
        return self.history[lo:] + ahead

    def _may_lose_disk(self, v):
        """May replica v lose its disk now without leaving the fault model? At most f voters of a
        membership in force may be without durable state: one wiped replica at a time, and none
        that votes in a membership of fewer than three voters (f = 0 there)."""
        self.wiped = {r for r in self.wiped if self.replicas[r] is None
                      or self.replicas[r].status == "recovering"}
        counted = [c for c in self._memberships_in_force() if v in c.voters]
        return not counted or (not self.wiped and all(len(c.voters) >= 3 for c in counted))

    def _lose_disk(self, v):
        if any(v in c.voters for c in self._memberships_in_force()):
            self.wiped.add(v)  # it held votes: it counts against f until it recovers
        self.durable[v] = []
        self.unsynced[v] = []
        self.recovery_mark[v] = False
        self.stored[v] = {}
        self.disk_lost.add(v)

    def _over_fault_model(self, stateless):
        """The memberships in force in which more than f voters hold no durable state."""
        return [c for c in self._memberships_in_force()
                if sum(1 for r in stateless if r in c.voters) > (len(c.voters) - 1) // 2]
