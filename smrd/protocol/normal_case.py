"""The normal case of a view: its leader proposes, the others accept, and each watches the other.

Owns: handling PROPOSE, ACCEPTED, COMMIT and ACK; admitting normal-case messages by their view (a
lower view's are stale, a higher view's mean a view change completed without this replica); the
leader's retransmissions and heartbeats, and whether it still hears a quorum; the follower's
timeouts (a silent leader, a request the leader does not order) and its forwarding of requests
that waited too long for order; a non-voter's asking now and then how far the group got.
Must never: accept a proposal of a view lower than the one promised (R1), send an ACCEPTED for a
value not recorded in the same or an earlier Ready (R2: the driver persists, then sends), or
take a value in the normal case from anyone but the current view's leader (R3).
"""
from ..core import BatchBuilder
from . import messages as m
from .membership import SYSTEM_CLIENT
from .status import NORMAL


class NormalCaseMixin:
    """Part of Replica (smrd.protocol.replica): the normal case and its timers."""

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
            self._suspect_leader(f"leader silent for {now - self.last_heard} ticks{dropped}")
            return
        self.prevote_view = -1  # the leader is heard: any earlier agreement to replace it is void
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
