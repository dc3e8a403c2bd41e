"""Leader change (view change), in the shape of Viewstamped Replication.

Owns: promising a new view (a ViewRecord, then START_VIEW_CHANGE to the others), telling its
leader what this replica accepted above its commit point (DO_VIEW_CHANGE), the new leader's
gathering of them from a quorum (M3: also from enough voters of every membership the chosen values
lead to), choosing per instance the value accepted in the highest view (a no-op where there is
none), installing the view (START_VIEW) and answering stragglers with it, backing off a view change
that does not complete, and a non-voter's following of a view without taking part.
Must never: choose values above a commit point it does not hold yet (it catches up first),
overwrite a decided slot (R4), or let a replica that is not a voter promise, gather or lead.
"""
from .. import core
from ..core import Batch
from . import messages as m
from .membership import SYSTEM_CLIENT, Change, Membership
from .records import ViewRecord
from .status import NORMAL, VIEW_CHANGE


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


class ViewChangeMixin:
    """Part of Replica (smrd.protocol.replica): leader change."""

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

    def _suspect_leader(self, reason) -> None:
        """The leader of our view is silent: move to the next view once a quorum of the voters
        (ourselves included) say they miss it too (pre-vote). A voter that still hears the leader
        says nothing, so a replica that hears nobody while the others hear the leader (a one-way
        partition, or a key its peers no longer accept) never starts a view change they would
        join; it waits, and follows the leader once it hears it again. Nothing is promised or
        persisted here: a pre-vote binds no one."""
        cfg = self.sessions.membership
        if self.prevote_view != self.view:
            self.prevote_view, self.prevote_ok, self.prevote_sent = self.view, {self.id}, -1 << 60
        if cfg.quorum_in(self.prevote_ok, self._quorum(cfg)):
            self.prevote_view = -1
            self._start_view_change(self._next_view(self.view), reason=reason)
            return
        # Asked again every heartbeat: a voter whose own timer has not run out yet says nothing
        # the first time, and agrees once it has (so a dead leader costs at most a heartbeat more).
        if self.now - self.prevote_sent >= self.opt.heartbeat_ticks:
            if self.prevote_sent < 0:
                self.stats["pre_view_changes"] = self.stats.get("pre_view_changes", 0) + 1
            self.prevote_sent = self.now
            for r in self._peers:
                if r in cfg.voters:
                    self._send(r, m.PreViewChange(self.view))
            # Maybe the others went on without us (a removal we have not applied, so the leader
            # no longer writes to us): what they decided says so, as in _view_change_tick.
            if self.now - self.catchup_sent >= self.opt.retransmit_ticks:
                self.catchup_peer += 1
                self._request_catchup()

    def _on_pre_view_change(self, sender, msg) -> None:
        cfg = self.sessions.membership
        if sender not in cfg.voters:
            # Asked by a replica our membership no longer counts: it missed its removal. Say
            # how far we got; its catch-up brings it the decided change.
            self._send(sender, m.CatchupReply(self.view, self.commit, ()))
            return
        if self.id not in cfg.voters:
            return
        if self.status == VIEW_CHANGE or msg.view > self.view or (self.status == NORMAL and (
                not self.has_quorum_contact() if self.is_leader
                else self.now - self.last_heard >= self.opt.election_ticks)):
            # Agreed: we miss a leader too, or we are behind the asker's view (a leader of an
            # older view that the group left), or we lead without hearing a quorum.
            self._send(sender, m.PreViewChangeOk(msg.view))

    def _on_pre_view_change_ok(self, sender, msg) -> None:
        if msg.view == self.prevote_view and sender in self.sessions.membership.voters:
            self.prevote_ok.add(sender)

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
