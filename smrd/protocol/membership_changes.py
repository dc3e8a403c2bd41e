"""Membership changes as one replica takes part in them (the Membership value and the rule that
applies a change are smrd.protocol.membership's).

Owns: whom this replica streams to, whose votes count at each instance (M2) and the vote
trackers per membership; asking for its own changes (auto_join, request_leave); the leader's
precheck of a change against who answers now (refused at once, never ordered); executing decided
changes in order; and acting on where they left this replica (a removed replica stops campaigning
or leading, a new voter does not lead a view it never installed, a departed leader is replaced).
Must never: act on a membership in between when several decided changes apply at once (only on
where they ended), or count a vote from a replica that is not a voter of the membership that
holds at that instance. M1 (one change in flight, alone, in a drained log) is kept where the
leader proposes (smrd.protocol.requests); M3 where a view change gathers
(smrd.protocol.view_change).
"""
from .. import core
from ..core import QuorumTracker
from . import messages as m
from .membership import ADD_LEARNER, PROMOTE, REMOVE, SYSTEM_CLIENT, Change, Membership
from .status import NORMAL, VIEW_CHANGE


class MembershipChangesMixin:
    """Part of Replica (smrd.protocol.replica): membership changes and vote counting."""

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
        If it leads, it hands leadership on first (the next leader orders the removal); if it
        leads again after that, it orders its own removal (see _membership_tick)."""
        self.leaving = True
        self.auto_join = False
        self.change_sent = -1 << 60
        self.handed_off_to_leave = False

    def request_join(self) -> None:
        """Become a voter, or stay one: take back a request_leave() and ask to join (as a
        learner, then promoted once caught up) until a decided change made this replica a voter."""
        self.leaving = False
        self.auto_join = True

    def stop_auto_join(self) -> None:
        """Stop asking to join. A driver whose replica was removed calls it: asking again at once
        would undo the operator's removal."""
        self.auto_join = False

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
        if want == REMOVE and self.is_leader and not self.handed_off_to_leave:
            # Hand off first, so that clients wait one round trip rather than the instance of
            # our removal and the view change after it; the next leader orders our removal.
            # Once only: when the voters that could take over are leaving too, they hand the
            # lead back and forth for ever (each leading for election_ticks, then handing off),
            # and nothing is ordered; a leader that led again orders its own removal instead,
            # and steps down when it applies it (_roles_changed).
            self.change_sent = self.now
            self.handed_off_to_leave = self.transfer_leadership()
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
