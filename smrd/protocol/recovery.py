"""Recovery of a replica that starts with an empty disk (docs/PROTOCOL.md, "Recovery").

Owns: asking every id of hosts.conf what it knows (RECOVERY, with a nonce naming this
incarnation), answering other replicas' questions, deciding from a quorum of answers (of the
newest membership any of them reports) whether no value was ever decided or whose log to adopt,
and adopting the latest view's leader's log once this replica holds every value decided up to
that leader's commit point.
Must never: promise a view, vote or campaign while recovering (its old votes are gone: voting
again before it learned the current state could let a decided value be forgotten), or take an
answer to an earlier incarnation's question.
"""
from . import messages as m
from .membership import Membership
from .records import ViewRecord
from .status import NORMAL, RECOVERING


class RecoveryMixin:
    """Part of Replica (smrd.protocol.replica): recovery from an empty disk."""

    def _recovery_tick(self) -> None:
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
