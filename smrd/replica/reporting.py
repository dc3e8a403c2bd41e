"""What a replica tells about itself: its status (smrd status, a gateway's probe), readiness
(/readyz), the numbers /metrics exports, and the event log lines of its role, view, membership and
catch-up changes.

Owns: those descriptions, as a part of the replica driver (smrd.replica.driver), read from the
protocol core's snapshot() and progress() and the executor's state.
Never: changes anything but its own bookkeeping of what it already logged (and, when this replica
was removed while running, turns its auto_join off, through the core's stop_auto_join()).
"""
import logging
import os
import time

from ..protocol.status import NORMAL, RECOVERING

log = logging.getLogger("smrd.replica.driver")  # the replica's events, under one logger name

# A replica further behind than this (instances) reports itself not ready.
READY_MAX_LAG = 64


class ReplicaReporting:
    """Mixin of the replica driver (Server)."""

    def _log_changes(self):
        # After every burst of messages: progress() is cheap; a snapshot is taken only when
        # something worth a log line changed.
        rep = self.replica
        view, status, commit, target, leader_commit, membership, refused = rep.progress()
        if (view, status) != self._last_role:
            old = self._last_role
            self._last_role = (view, status)
            snap = rep.snapshot()
            if status == RECOVERING:
                log.info("event=recovering (the log is empty: asking the other replicas for the "
                         "current state before taking part)")
            elif old and old[1] == RECOVERING:
                log.info("event=recovered view=%d leader=%d commit_target=%d", view, snap.leader,
                         target)
            if status == NORMAL:
                log.info("event=view_active view=%d leader=%d self=%s previous_view=%s",
                         view, snap.leader, snap.is_leader, old[0] if old else "-")
            elif status != RECOVERING:
                log.info("event=view_change view=%d new_leader=%d old_leader=%s reason=%r",
                         view, snap.leader, rep.leader_of(old[0]) if old else "-",
                         snap.view_change_reason)
        suspected = rep.stats.get("pre_view_changes", 0)
        if suspected != self._suspected_seen:
            self._suspected_seen = suspected
            log.warning("event=leader_suspected view=%d leader=%d (not heard for the election "
                        "timeout: asking the other voters; a new view starts once a quorum of them "
                        "misses it too, and nothing changes while they still hear it)", view,
                        rep.leader_of(view))
        if not self._live_member and (leader_commit > 0 or status == NORMAL):
            snap = rep.snapshot()
            if snap.role != "none" and (snap.is_leader or (
                    leader_commit > 0 and commit + READY_MAX_LAG >= leader_commit)):
                self._live_member = True  # (a leader hears no leader's commit point: it is the one)
        if membership is not self._last_membership:
            self._on_membership()
        if refused > self._refused_seen and time.monotonic() >= self._refused_quiet_until:
            # Changes that reached this leader through another replica (a copy of an operator's
            # change, or a replica's own auto_join or leave request) and were refused: no answer
            # goes back from here, and a replica asking for itself asks again every election
            # timeout, so say it at most every 10 s.
            count, self._refused_seen = refused - self._refused_seen, refused
            self._refused_quiet_until = time.monotonic() + 10.0
            log.warning("event=membership_change_refused when=proposal count=%d reason=%r", count,
                        "forwarded by another replica: it would lose quorum, or its base is stale "
                        "(whoever asked directly got the reason; a replica asking for itself asks "
                        "again later)")
        if self._lagging != (commit < target):
            self._lagging = not self._lagging
            if self._lagging:
                log.info("event=catching_up commit=%d target=%d", commit, target)
            else:
                log.info("event=caught_up commit=%d", commit)

    def _on_membership(self):
        """The applied membership changed (or is seen for the first time): say so, and size the
        checkpoint agreement of state transfers to the voters (f+1 of them)."""
        rep = self.replica
        snap = rep.snapshot()
        old, new = self._last_membership, snap.membership
        self._last_membership = new
        self._size_transfer()
        if old is None:
            log.info("event=membership index=%d voters=%s learners=%s role=%s auto_join=%s (%s)",
                     new.index, sorted(new.voters), sorted(new.learners), snap.role, snap.auto_join,
                     "the bootstrap voters, until a change is applied" if new.index == 0 else
                     "the replicated membership, from this replica's checkpoint and log; catching up "
                     "may move it on")
            return
        if old == new:
            return
        log.info("event=membership_changed index=%d voters=%s learners=%s role=%s previous_index=%d",
                 new.index, sorted(new.voters), sorted(new.learners), snap.role, old.index)
        if old.role(self.id) != "none" and snap.role == "none":
            auto_join = snap.auto_join
            if auto_join and self._live_member:
                # Removed while running (smrd admin leave, a scale-down's preStop): stay out. A
                # restart with auto_join asks again, as a new pod would.
                rep.stop_auto_join()
                auto_join = False
            log.info("event=removed_from_membership index=%d auto_join=%s (this replica no longer votes "
                     "or receives the stream; stop it, or join it again)", new.index, auto_join)
            self._live_member = False

    def _log_change_answer(self, instance, answer):
        text = _answer_text(answer)
        if text.startswith("REFUSED"):
            log.warning("event=membership_change_refused when=execution instance=%d reason=%r",
                        instance, text.removeprefix("REFUSED "))
        else:
            log.info("event=membership_change_applied instance=%d answer=%r", instance, text)

    def _metrics(self) -> dict:
        """The numbers /metrics exports (smrd.ops.observability, SERVER_SERIES)."""
        d = self.status()
        snap, wal, app = self.replica.snapshot(), self.wal, self.executor.adapter.stats
        d.update(known_commit=snap.known_commit,
                 app_errors=app.get("errors", 0), app_timeouts=app.get("timeouts", 0),
                 app_reconnects=app.get("reconnects", 0), app_retries=app.get("retries", 0),
                 log_bytes=self.recovered_bytes + wal.bytes_written,
                 log_records=self.recovered_records + wal.records_written,
                 wal_bytes_written=wal.bytes_written, wal_records_written=wal.records_written,
                 wal_syncs=wal.syncs)
        t = self.transfer
        d.update(state_transfer_bytes=t.received, state_transfer_size=t.size)
        cfg = snap.membership
        d.update(membership_index=cfg.index, membership_voters=len(cfg.voters),
                 membership_learners=len(cfg.learners),
                 membership_changes=snap.stats.get("membership_changes", 0),
                 membership_refused=snap.stats.get("membership_refused", 0))
        return d

    def ready(self):
        """In the current view and normal, caught up within READY_MAX_LAG, able to execute."""
        if self.stopping.is_set():
            return False, "stopping"
        s = self.replica.snapshot()
        if s.status == RECOVERING:
            return False, "recovering: learning the cluster's state before taking part"
        if self.transfer.active:
            t = self.transfer
            return False, f"state transfer: {t.received} of {t.size or '?'} bytes of checkpoint {t.instance}"
        known = s.known_commit
        if s.role == "learner":
            return False, f"learner: catching up (commit {s.commit} of {known})"
        if s.role != "voter":
            cfg = s.membership
            return False, (f"not a member of the replica group (membership {cfg.index}: voters "
                           f"{sorted(cfg.voters)})")
        if s.status != NORMAL:
            return False, f"view change to view {s.view} in progress"
        if s.is_leader and not s.has_quorum_contact:
            return False, "leader without contact to a quorum (view change expected)"
        if known - s.commit > READY_MAX_LAG:
            return False, f"catching up: decided {s.commit} of {known}"
        state, reason = self.executor.describe()
        if state != "executing":
            return False, f"{state}: {reason}"
        executed = self.executor.executed
        if s.commit - executed > READY_MAX_LAG:
            return False, f"executing: {executed} of {s.commit} applied to the app"
        return True, "ready"

    def status(self) -> dict:
        """This replica as `smrd status`, a gateway's probe and /metrics see it."""
        if self.replica.progress()[5] is not self._last_membership:
            # A change applied earlier in this burst of messages: act on it (auto_join after a
            # removal) before describing it, as the end of the burst would.
            self._on_membership()
        s = self.replica.snapshot()
        d = s.describe()  # "role": voter | learner | none; "membership": the applied one
        ex = self.executor
        execution, reason = ex.describe()
        tick_s = self.settings.tick_ms / 1000
        d.update(process="server", auto_join=s.auto_join, executed=ex.executed, pid=os.getpid(),
                 app_ready=ex.adapter._state is not False, halted=ex.halted, execution=execution,
                 execution_reason=reason, can_execute=ex.can_execute,
                 rss_bytes=self.process.memory_info().rss, ready=self.ready()[0],
                 connections_refused=self.channels.refused, messages_sent=self.channels.sent,
                 messages_received=self.channels.received,
                 peer_contact_s={r: round(age * tick_s, 3) for r, age in s.contact_ages.items()},
                 uptime_s=round(time.time() - self.started, 3),
                 n=self.n, **{k: v for k, v in self.stats.items()}, **self.transfer.describe())
        return d


def _answer_text(answer) -> str:
    return bytes(answer).decode("utf-8", "replace")
