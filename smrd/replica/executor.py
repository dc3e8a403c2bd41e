"""A replica's execution: decided requests into the local app, in order, exactly once, and the
app kept in a state smrd can account for.

Owns: the apply queue the driver (smrd.replica.driver) fills from each Ready, executing it on the app
(smrd.replica.app_adapter), the replies it hands back to the driver, checkpoints (taking, storing,
restoring), and healing the app. The app is always in one of two conditions:
  - accounted for: it executed exactly the decided requests up to `executed` (or it is a new,
    empty process, verified by smrd.replica.app_watch);
  - unaccounted for: smrd restarted while the app kept running, the connection broke in the middle
    of a request, a snapshot hook failed, the app restarted with files of its own, or its replies
    disagreed with a majority of the replicas.
An unaccounted-for app is reset, cheapest way first: restore the newest checkpoint with the restore
hook (there is always one with hooks: checkpoint 0, the empty app, taken before the first request)
and replay the log after it; else end the app's process (smrd.replica.app_reset) so that its supervisor
starts it empty, and replay the whole log. Only when neither can be done does it halt, say what
the operator must do, and keep retrying.
Never: executes on an app it could not verify, answers while it rebuilds, answers with anything
but the app's own reply to a request it executed (or the cached one), or skips a decided request.
"""
import asyncio
import logging
import os
import time
from collections import deque

from .app_adapter import AppAdapter, AppConnectionLost, AppError, AppProtocolError
from .app_reset import ResetFailed, end_app, wait_for_new_app
from .app_watch import AppIdentity, AppRestarted, AppWatch
from .checkpoints import CheckpointError, CheckpointStore
from ..config.settings import data_paths
from ..ops import trace
from ..framing.volatile import comparable_reply, header_names
from ..protocol.messages import reply_digest
from ..protocol.sessions import DUPLICATE, ERROR_TEXT, EXECUTE, SYSTEM, plan_batch
from .wal.records import StorageError

log = logging.getLogger(__name__)

# How many requests the executor hands the app in one go (one pipelined round trip).
EXECUTE_CHUNK = 512

# Execution states, as status and readiness report them.
EXECUTING = "executing"     # the app is accounted for and answers
APP_DOWN = "app-down"       # the app does not answer; requests wait, nothing is skipped
REBUILDING = "rebuilding"   # replaying the log into a new or restored app; no replies until done
RESETTING = "resetting"     # the app was ended to reset it; waiting for its supervisor to start it
HALTED = "halted"           # the last resort: cannot reset the app now; retrying

# Resets in a row (each within RESET_WINDOW_S of the previous) before a pause: an app that fails
# again right after every reset (a broken restore hook, a crash on some request) must not be
# restarted in a tight loop. The pause doubles up to HALT_RETRY_MAX_S.
RESETS_BEFORE_PAUSE = 3
RESET_WINDOW_S = 30.0
HALT_RETRY_S = 2.0
HALT_RETRY_MAX_S = 60.0
# While halted, the same reason is logged again at most this often.
HALT_LOG_EVERY_S = 60.0


class _TakeCheckpoint:
    # Apply-queue item: after executing `instance`, snapshot the app and store a checkpoint.
    __slots__ = ("instance", "image")

    def __init__(self, instance, image):
        self.instance = instance
        self.image = image


class _RestoreApp:
    # Apply-queue item: replace the app's state with a checkpoint's (at start, after a state
    # transfer, to reset the app); execution continues after `instance`.
    __slots__ = ("instance", "state")

    def __init__(self, instance, state):
        self.instance = instance
        self.state = state


class _HookFailed(Exception):
    # A snapshot or restore hook answered with an error: the app's state is not what smrd needs.
    pass


class _Unaccounted(Exception):
    # The app's state is not what smrd fed it: reset it.
    pass


class _CannotRebuild(Exception):
    # What a rebuild needs (a checkpoint file, log values) cannot be read.
    pass


class Executor:
    def __init__(self, server, data_dir: str, sessions, restored=None, restored_state=None):
        s = server.settings
        self.server = server
        self.settings = s
        self.rep = server.replica
        # The exactly-once table the core plans with (the same object): execution fills in the
        # replies. Replaced on a rebuild (_replay) and by a state transfer (install).
        self.sessions = sessions
        self.stats = server.stats
        self.hooks = bool(s.snapshot_request)
        self.data_paths = data_paths(s.app_data_paths)
        self.queue = deque()
        self.wakeup = asyncio.Event()
        self.open_images = []       # checkpoint images still waiting for replies
        self.checkpoint_lock = asyncio.Lock()
        self.executed = 0           # last instance whose requests ran on the app (replies sent)
        self.state, self.reason = EXECUTING, ""
        self.halted = None          # why execution cannot go on now, while HALTED
        self.quiet_until = 0        # a rebuild's replay: instances up to here are not answered
        self.comparable = comparable_reply(s.framing, header_names(s.volatile_reply_headers))
        self.adapter = AppAdapter(s.app_host, s.app_port, s.framing, s.app_timeout_ms / 1000,
                                  on_state_change=self._app_state)
        self._app_was_down = False  # for the log only: "reachable" vs "reachable again"
        self.watch = AppWatch(s.app_port, os.path.join(data_dir, "app-identity.json"), s.app_host)
        self.adapter.on_connect = self.watch.check
        # Checkpoint 0: the empty app's snapshot, taken before it executes anything, so that a
        # reset by the restore hook always has a state to start from.
        self.base = CheckpointStore(os.path.join(server.checkpoint_dir, "app-empty"),
                                    fsync=s.durability == "fsync") if self.hooks else None
        # The app listening is a new process that executed nothing (it may take checkpoint 0).
        self.fresh = False
        self.pending_reset = None   # why the app must be reset before anything else runs
        self._last_replay = self._retry = None  # a rebuild that could not be planned, to retry
        self._resets = []           # loop times of recent resets (RESETS_BEFORE_PAUSE)
        self._pause = HALT_RETRY_S
        if restored is not None:
            self.queue.append(_RestoreApp(restored.instance, restored_state))
        fed = self.watch.fed_before()
        if fed is not None:
            # Only smrd restarted: the app still holds what the earlier smrd fed it. Replaying
            # the log into it would run every request twice. (Adopted: it is the one to end.)
            # Never "the log is empty, so nothing was fed": a follower executes what it learns
            # is decided, and the commit record that said so may not have reached the disk
            # (it rides with the next fsync) when smrd was killed. The identity record is
            # written before anything is sent to the app.
            self.watch.adopt(fed)
            self.pending_reset = (f"the app ({fed.describe()}) outlived smrd's restart and holds "
                                  f"the requests an earlier smrd process fed it")
        elif self.data_paths:
            self.pending_reset = ("smrd started and the app may hold files of its own from before "
                                  "(app_data_paths)")
        else:
            self.fresh = restored is None

    # ------------------------------------------------------------------ what the driver sees

    @property
    def can_execute(self) -> bool:
        return self.state == EXECUTING and self.adapter._state is not False

    def describe(self):
        """(state, reason) for status and readiness."""
        if self.state == EXECUTING and self.adapter._state is False:
            s = self.settings
            return APP_DOWN, f"the app at {s.app_host}:{s.app_port} is not answering"
        if self.state == REBUILDING:
            return REBUILDING, f"{self.reason}: replayed {self.executed} of {self.quiet_until}"
        return self.state, self.reason

    def feed(self, apply, checkpoints) -> None:
        """A Ready's decided entries (and the checkpoints it asks for after some of them)."""
        if checkpoints:
            marks = {i: _TakeCheckpoint(i, image) for i, image in checkpoints}
            for entry in apply:
                self.queue.append(entry)
                mark = marks.get(entry[0])
                if mark is not None:
                    self.queue.append(mark)
        else:
            self.queue.extend(apply)
        self.wakeup.set()

    def install(self, instance: int, app_state: bytes, sessions) -> None:
        """A state transfer ended: the app's state becomes the checkpoint's, and the table the
        core plans with from now on is `sessions` (the checkpoint's)."""
        self.sessions = sessions
        self.queue.append(_RestoreApp(instance, app_state))
        self.wakeup.set()

    def diverged(self, client_id: int, seq: int, digest: bytes, majority: int) -> None:
        """A gateway saw a majority of the replicas answer (client_id, seq) with a reply whose
        blake2b-16 is `digest`, and this replica answer otherwise."""
        mine = self.sessions.reply(client_id, seq)
        if mine is not None and self.comparable is not None:
            mine = self.comparable(mine)  # the gateway's digest is of the comparable part
        if mine is None or reply_digest(mine) == digest or self.pending_reset is not None:
            return  # no longer cached (cannot tell), or it agrees after all
        log.error("event=divergence_reported client_id=%x seq=%d majority=%d action=reset (this "
                  "replica's reply disagrees with a majority of the replicas: its app's state is "
                  "not the others')", client_id, seq, majority)
        self.stats["divergences_reported"] += 1
        self.pending_reset = (f"its reply to request {seq} of client {client_id:x} disagrees with "
                              f"{majority} other replicas")
        self.wakeup.set()

    # ------------------------------------------------------------------ the loop

    async def run(self):
        queue = self.queue
        while True:
            try:
                if self.pending_reset is not None:
                    why, self.pending_reset = self.pending_reset, None
                    await self._reset(why)
                    continue
                if self._retry is not None:
                    args, self._retry = self._retry, None
                    self._replay(*args)
                    continue
                if not queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                if self.fresh and self.hooks:
                    await self._take_base()
                head = queue[0]
                if type(head) is _TakeCheckpoint:
                    queue.popleft()
                    await self._take_checkpoint(head)
                elif type(head) is _RestoreApp:
                    await self._restore(head)
                    queue.popleft()
                else:
                    await self._execute_chunk()
            except AppRestarted as e:
                await self._on_restart(e)
            except (AppConnectionLost, AppProtocolError) as e:
                await self._after_failure(e)
            except (_Unaccounted, _HookFailed) as e:
                self.pending_reset = str(e)
            except _CannotRebuild as e:
                # Nothing was executed on the app since the rebuild was asked for: plan it again
                # once the pause is over (the files may be readable again).
                await self._halt(str(e))
                self._retry = self._last_replay

    async def _execute_chunk(self):
        queue = self.queue
        plan = []        # (client_id, seq, status, payload or cached reply) in decided order
        payloads = []
        last_instance = 0
        quiet = self.quiet_until
        while queue and len(payloads) < EXECUTE_CHUNK and type(queue[0]) is tuple:
            if last_instance and last_instance <= quiet < queue[0][0]:
                break  # the replay ends here: what follows is answered
            instance, _, batch_plan = queue.popleft()
            last_instance = instance
            plan += batch_plan
            payloads += [bytes(entry[3]) for entry in batch_plan if entry[2] == EXECUTE]
        # If this raises, what happens next (a rebuild, a reset) plans again from the log.
        if trace.ON:
            for client_id, seq, status, _ in plan:
                if status == EXECUTE:
                    trace.stamp("app_write", (client_id, seq))
        results = await self.adapter.execute(payloads) if payloads else []
        if trace.ON:
            for client_id, seq, status, _ in plan:
                if status == EXECUTE:
                    trace.stamp("app_reply", (client_id, seq))
        self.fresh = False
        sessions = self.sessions
        replies = []
        append = replies.append
        it = iter(results)
        images = self.open_images
        finish = sessions.finish
        system = 0
        for client_id, seq, status, payload in plan:
            if status == EXECUTE:
                reply = next(it)
                finish(client_id, seq, reply)
                if images:
                    for image in images:
                        image.fill(client_id, seq, reply)
                append((None, client_id, seq, status, reply))
                continue
            if status == DUPLICATE:
                reply = payload if payload is not None else sessions.take_reply(client_id, seq)
            elif status == SYSTEM:
                # A membership change: the core applied it; never the app's business, not in
                # the session table (nor in checkpoint images). Its payload is the core's
                # answer, except when the log is replayed after an app reset (then it is the
                # change itself, already answered long ago: nothing to send).
                system += 1
                reply = bytes(payload)
                if not reply.startswith((b"OK", b"REFUSED")):
                    continue
            else:
                reply = ERROR_TEXT[status]
            replies.append((None, client_id, seq, status, reply))
        self.stats["requests_executed"] += len(payloads)
        self.stats["requests_deduplicated"] += len(plan) - len(payloads) - system
        self.executed = last_instance
        if last_instance > quiet:
            self.server.send_replies(replies)
        elif self.state == REBUILDING and last_instance == quiet:
            self._rebuilt()
        self.server.evict()

    # ------------------------------------------------------------------ checkpoints

    async def _take_base(self):
        # Checkpoint 0, once per data directory: the new app executed nothing yet.
        self.fresh = False
        if self._base_state() is not None:
            return
        s = self.settings
        state = (await self.adapter.execute([s.snapshot_request.encode()]))[0]
        if state.startswith(b"ERR"):
            log.warning("event=checkpoint_failed instance=0 reason=%r (the empty app's snapshot: "
                        "without it a reset before the first checkpoint ends the app's process)",
                        state[:200].decode("utf-8", "replace"))
            return
        blob = self.server.new_sessions().capture().encode()
        try:
            size, _ = await asyncio.to_thread(self.base.write, 0, blob, state)
        except OSError as e:
            log.warning("event=checkpoint_failed instance=0 error=%r", str(e))
            return
        log.info("event=checkpoint instance=0 bytes=%d (the empty app: a reset restores it and "
                 "replays the log)", size)

    def _base_state(self):
        if self.base is None:
            return None
        for instance, _, digest in self.base.info():
            if instance == 0:
                try:
                    return self.base.read(0, digest)[1]
                except CheckpointError as e:
                    log.warning("checkpoint 0 (the empty app) is unreadable: %s", e)
        return None

    async def _take_checkpoint(self, mark):
        if mark.image in self.open_images:
            self.open_images.remove(mark.image)
        s = self.settings
        state = (await self.adapter.execute([s.snapshot_request.encode()]))[0]
        if state.startswith(b"ERR"):
            # The snapshot request may have changed what the app holds: do not trust it.
            raise _Unaccounted(f"the snapshot hook {s.snapshot_request!r} failed at instance "
                               f"{mark.instance}: {state[:200]!r}")
        self.executed = mark.instance
        try:
            blob = mark.image.encode()
        except ValueError as e:  # a bug, not a fault: say so, keep the log, carry on
            log.error("event=checkpoint_skipped instance=%d reason=%r", mark.instance, str(e))
            return
        # Writing (compress, fsync) runs beside execution; one checkpoint at a time.
        asyncio.get_running_loop().create_task(self._store_checkpoint(mark.instance, blob, state))

    async def _store_checkpoint(self, instance, sessions_blob, state):
        server = self.server
        async with self.checkpoint_lock:
            started = time.monotonic()
            try:
                size, digest = await asyncio.to_thread(server.store.write, instance, sessions_blob, state)
            except OSError as e:
                log.error("event=checkpoint_failed instance=%d error=%r (the log is kept; the next "
                          "checkpoint tries again)", instance, str(e))
                return
            try:
                low = server.record_checkpoint(instance, digest, size)
            except StorageError as e:
                server.storage_failed(e)
                return
            log.info("event=checkpoint instance=%d bytes=%d state_bytes=%d seconds=%.3f log_from=%d",
                     instance, size, len(state), time.monotonic() - started,
                     self.rep.snapshot().low + 1)
            if low:
                try:
                    deleted, freed = await asyncio.to_thread(server.wal.truncate_before, low)
                except StorageError as e:
                    server.storage_failed(e)
                    return
                if deleted:
                    log.info("event=log_truncated before=%d segments=%d bytes=%d", low + 1, deleted, freed)

    async def _restore(self, item):
        s = self.settings
        request = s.restore_request.encode().replace(b"{state}", item.state)
        try:
            reply = (await self.adapter.execute([request]))[0]
        except (AppConnectionLost, AppProtocolError) as e:
            # The app may be half restored, or hung: only ending it helps now.
            raise _Unaccounted(f"the restore hook failed at instance {item.instance}: {e}") from None
        self.fresh = False
        if not reply.startswith(s.restore_ok.encode()):
            self.queue.clear()
            raise _HookFailed(f"the restore hook failed at instance {item.instance}: the app "
                              f"answered {reply[:200]!r}, not {s.restore_ok!r}")
        self.executed = item.instance
        log.info("event=app_restored instance=%d bytes=%d", item.instance, len(item.state))
        if self.state == REBUILDING and item.instance >= self.quiet_until:
            self._rebuilt()

    # ------------------------------------------------------------------ healing

    async def _on_restart(self, e: AppRestarted):
        new, old = e.new, e.old
        if new is not None and old is not None and new.same_process(old):
            self.watch.adopt(new)  # the process to reset, under its new socket
            self.pending_reset = f"the app's process re-opened its listening socket ({new.describe()})"
            return
        if self.data_paths:
            # A new process, but it may have found the files the old one left.
            log.warning("event=app_restart_detected detail=%r action=reset (the new app may hold "
                        "the old one's files in app_data_paths)", str(e))
            self.stats["app_restarts"] += 1
            self.pending_reset = f"the app restarted by itself and may hold files of its own: {e}"
            return
        log.warning("event=app_restart_detected detail=%r action=replay (a new app process: its "
                    "state is rebuilt from the log)", str(e))
        self.watch.adopt(new)
        self.fresh = True
        self.stats["app_restarts"] += 1
        self._replay(f"app restart detected: {e}", restore_base=False)

    async def _after_failure(self, e: AppError):
        """A request was written and its reply did not come: find out whether the app that took
        it is still the one listening."""
        old = self.watch.identity
        s = self.settings
        delay = 0.02
        while True:
            sockets = self.watch.listening()
            if sockets and old is not None and sockets != old.sockets:
                new = self.watch.current() or AppIdentity(sockets)
                await self._on_restart(AppRestarted(f"the app's process changed after: {e}", new, old))
                return
            if sockets and not (old is not None and self.watch.dead(old)):
                # The same socket, so the same process: whether the request ran is unknown.
                self.pending_reset = f"the app failed mid-request: {e}"
                return
            # Nothing listens, or what listens is the socket of an app that died (it goes with
            # the process a moment later): the app is down; wait for the next one.
            self._set_state(EXECUTING, "")  # the adapter reports the app down meanwhile
            log.debug("waiting for an app to listen on %s:%d", s.app_host, s.app_port)
            await asyncio.sleep(delay)  # there is no event for "a process started listening"
            delay = min(delay * 1.5, 0.5)

    async def _reset(self, why: str):
        """The app holds a state smrd cannot account for: restore it, or end it and replay."""
        self.stats["app_resets"] += 1
        await self._pace(why)
        self.queue.clear()
        self.open_images = []
        checkpoint = self.rep.snapshot().checkpoint
        if self.hooks and (checkpoint or self._base_state() is not None):
            log.warning("event=app_reset reason=%r action=restore checkpoint=%d", why, checkpoint)
            try:
                self._replay(f"reset: {why}", restore_base=True)
                if self.queue and type(self.queue[0]) is _RestoreApp:
                    await self._restore(self.queue[0])
                    self.queue.popleft()
                    return
            except (_HookFailed, _Unaccounted, AppConnectionLost, AppProtocolError) as e:
                why = f"{why}; restoring a checkpoint failed too ({e})"
            except AppRestarted as e:
                await self._on_restart(e)  # it died under the restore: a new app is as good
                return
        await self._end_and_replay(why)

    async def _end_and_replay(self, why: str):
        s = self.settings
        old = self.watch.identity
        ended = False  # by us, with its data paths emptied: its successor starts empty
        while True:
            sockets = self.watch.listening()
            if not sockets:
                break  # nothing listens: the app is down already
            if old is None or sockets != old.sockets:
                # Replaced meanwhile (by a person, or its supervisor): that one is new.
                new = self.watch.current() or AppIdentity(sockets)
                if not self.data_paths:
                    await self._on_restart(AppRestarted("the app was replaced while smrd was "
                                                        "resetting it", new, None))
                    return
                old = new  # it may hold the old one's files: end it too
            try:
                pid = end_app(self.watch, old, self.data_paths)
            except ResetFailed as e:
                await self._halt(f"{why}; and smrd cannot reset the app: {e}")
                continue
            ended = True
            log.warning("event=app_reset reason=%r action=end_process pid=%d emptied=%s (its "
                        "supervisor starts it again empty; then the log is replayed)", why, pid,
                        ",".join(self.data_paths) or "-")
            break
        self.watch.forget()
        self._set_state(RESETTING, f"{why}: waiting for a new app on port {s.app_port}")
        gone = old or AppIdentity(frozenset())
        new = await wait_for_new_app(self.watch, gone, s.app_restart_timeout_s, self.server.stopping)
        while new is None:
            if self.server.stopping.is_set():
                return
            await self._halt(f"{why}: no app listens on {s.app_host}:{s.app_port} "
                             f"{s.app_restart_timeout_s} s after "
                             + ("smrd ended it to reset it" if ended else "it went away")
                             + "; check what supervises the app (in Kubernetes: kubectl describe "
                             "pod, the app container's restarts)", wait=False)
            new = await wait_for_new_app(self.watch, gone, HALT_RETRY_MAX_S, self.server.stopping)
        if not ended and self.data_paths:
            # It came back by itself: nobody emptied its files while it was down.
            self.watch.adopt(new)
            self.pending_reset = f"{why}; the app came back by itself and may hold files of its own"
            return
        self.watch.adopt(new)
        self.fresh = True
        self._replay(f"reset: {why}", restore_base=False)

    def _replay(self, why: str, restore_base: bool):
        """Plan the app's rebuild: restore the newest local checkpoint (checkpoint 0 when
        `restore_base` and there is no other), then every decided instance after it. The
        exactly-once decisions are made again in the same order, so they come out as before
        and as on every other replica."""
        rep, server = self.rep, self.server
        self._last_replay = (why, restore_base)
        snap = rep.snapshot()
        self.fresh = self.fresh and not snap.checkpoints
        self.queue.clear()
        self.open_images = []
        start, app_state, sessions = 0, None, None
        if snap.checkpoints:
            start = snap.checkpoint
            digest = dict((i, d) for i, _, d in server.store.info()).get(start)
            try:
                if digest is None:
                    raise CheckpointError(f"checkpoint {start} is not on disk")
                sessions_blob, app_state = server.store.read(start, digest)
                sessions = server.new_sessions(sessions_blob)
            except (CheckpointError, ValueError) as e:
                raise _CannotRebuild(
                    f"the app's state cannot be rebuilt: {e}; move the data directory aside to "
                    f"rejoin with an empty disk (the state is then fetched from the peers)") from None
        elif restore_base:
            app_state = self._base_state()
        if sessions is None:
            sessions = server.new_sessions()
        if app_state is not None:
            self.queue.append(_RestoreApp(start, app_state))
        log.warning("event=app_rebuild reason=%r checkpoint=%d instances=%d..%d (no replies until "
                    "it is done)", why, start, start + 1, snap.applied)
        server.set_sessions(sessions)  # the core gives it the membership it applied
        self.sessions = sessions
        try:
            for i, value in server.values(start + 1, snap.applied):
                self.queue.append((i, value, plan_batch(sessions, value)))
        except StorageError as e:
            self.queue.clear()
            raise _CannotRebuild(
                f"the app's state cannot be rebuilt: {e}; move the data directory aside to rejoin "
                f"with an empty disk (the state is then fetched from the peers)") from None
        self.executed = 0
        self.quiet_until = snap.applied
        self._set_state(REBUILDING, why)
        if not self.queue:
            self._rebuilt()  # nothing was decided yet: the new app is all there is
        self.wakeup.set()

    def _rebuilt(self):
        log.info("event=app_rebuilt executed=%d (executing and answering again)", self.executed)
        self._unhalt()

    def _set_state(self, state, reason):
        self.state, self.reason = state, reason
        if state != HALTED:
            self.halted = None

    def _unhalt(self):
        self._set_state(EXECUTING, "")
        self._pause = HALT_RETRY_S

    async def _halt(self, why: str, wait: bool = True):
        """The last resort: report why (status, readiness, metric, log) and, with `wait`, pause
        before the caller tries again."""
        if self.halted != why or time.monotonic() - self._halt_logged > HALT_LOG_EVERY_S:
            self._halt_logged = time.monotonic()
            log.error("event=execution_halted reason=%r (this replica still votes, but executes and "
                      "answers nothing until this is fixed; it keeps retrying by itself)", why)
        if self.state != HALTED:
            self.stats["execution_halts"] += 1
        self.state, self.reason, self.halted = HALTED, why, why
        if wait:
            await asyncio.sleep(self._pause)  # retrying: no event tells that permissions changed
            self._pause = min(self._pause * 2, HALT_RETRY_MAX_S)

    _halt_logged = 0.0

    async def _pace(self, why: str):
        # Resets that follow each other quickly: pause (halted) before the next one.
        now = time.monotonic()
        self._resets = [t for t in self._resets if now - t < RESET_WINDOW_S * RESETS_BEFORE_PAUSE]
        self._resets.append(now)
        recent = [t for t in self._resets if now - t < RESET_WINDOW_S]
        if len(recent) > RESETS_BEFORE_PAUSE:
            await self._halt(f"the app needed {len(recent)} resets within {RESET_WINDOW_S:g} s; "
                             f"the latest because {why}. Look at the app's logs: it may fail on a "
                             f"request, or its restore hook may not work")

    def _app_state(self, ready, reason):
        s = self.settings
        if ready:
            log.info("app at %s:%d is reachable%s", s.app_host, s.app_port,
                     " again" if self._app_was_down else "")
            self._app_was_down = False
        else:
            self._app_was_down = True
            log.warning("app at %s:%d is not answering (%s); requests wait, nothing is skipped",
                        s.app_host, s.app_port, reason)

    async def close(self):
        async with self.checkpoint_lock:
            pass  # a checkpoint being written finishes (its record needs the log open)
        await self.adapter.close()
        self.watch.close()
