"""The replicated log as one replica holds it: accepted and decided values per instance, the
commit point, what is handed to execution, and what checkpoints let it forget.

Owns: the slots (accepting a value; deciding it by a quorum's votes or, R3, because the current
view's leader says so), advancing the commit point and planning each decided batch for execution
(Ready.apply, Ready.checkpoints), rebuilding all of it from durable records after a restart, and
shortening it: evicting values to the driver's log files, truncating it below stored checkpoints,
installing a checkpoint fetched from a peer.
Must never: overwrite a decided slot (R4), hand an instance to execution twice or out of order, or
drop a value that neither a stored checkpoint nor the driver's log files hold.
"""
from . import messages as m
from .records import AcceptRecord
from .sessions import EXECUTE, SYSTEM, plan_batch
from .status import NORMAL, RECOVERING


class Slot:
    """One instance of the log: the value accepted (or learned) for it, and whether it is
    decided."""
    __slots__ = ("view", "value", "decided")

    def __init__(self, view, value, decided=False):
        self.view = view
        self.value = value
        self.decided = decided


class ReplicatedLogMixin:
    """Part of Replica (smrd.protocol.replica): the log, the commit point, checkpoints."""

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
            self.log[instance] = Slot(view, value, decided or instance <= durable.commit)
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

    # ------------------------------------------------------------------ accept and decide

    def _accept(self, i, view, value) -> None:
        slot = self.log.get(i)
        if slot is not None and slot.decided:
            return  # R4
        self.log[i] = Slot(view, value)
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
