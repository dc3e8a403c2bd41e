# `smrd --role server`: one replica beside its app.
#
# Owns the loop: receive -> step -> persist -> send -> execute -> reply, in that order for every
# Ready (persisting before sending is what makes a vote count; see smrd/protocol/ready.py), the
# routing of replies back to the gateway that asked, and the replica's lifecycle (start from the
# write-ahead log, replay the log into the app, stop on a signal).
# Never: decides anything about order (the protocol core does), blocks the loop on the app (the
# executor is its own task, fed in decided order), or answers a request it did not execute or
# find in the reply cache.
import asyncio
import glob
import ipaddress
import json
import logging
import os
import signal
import time
from collections import defaultdict, deque

import psutil

from . import core
from .app_adapter import AppAdapter, AppConnectionLost, AppProtocolError
from .app_watch import AppRestarted, AppWatch
from .errors import ProtocolError
from .observability import Observability
from .protocol import messages as m
from .protocol.options import Options
from .protocol.quorum import CrashFaultPolicy
from .protocol.replica import NORMAL, RECOVERING, Replica
from .protocol.sessions import DUPLICATE, ERROR_TEXT, EXECUTE, Sessions, plan_batch
from .storage import CORRUPT_MIDDLE, CORRUPT_SUFFIX, StorageError, WriteAheadLog
from .transport import Channels, parse_replica_identity, replica_identity

log = logging.getLogger(__name__)

STATUS_REQUEST = m.STATUS_REQUEST
STATUS_REPLY = m.STATUS_REPLY

# How many requests the executor hands the app in one go (one pipelined round trip).
EXECUTE_CHUNK = 512
# A replica further behind than this (instances) reports itself not ready.
READY_MAX_LAG = 64


def bind_endpoint(host: str, port: int) -> str:
    # An IP literal is bound as given; a DNS name (a pod's headless-service name) is ours, so bind
    # every interface rather than resolving it now.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"tcp://*:{port}"
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Server:
    def __init__(self, config):
        s = config.settings
        self.config = config
        self.settings = s
        self.id = s.id
        hosts = config.hosts
        self.n = hosts.n
        self.options = Options.from_millis(
            s.tick_ms, s.heartbeat_ms, s.election_timeout_ms, s.request_timeout_ms,
            window=s.window, batch_max_requests=s.batch_max_requests,
            batch_max_bytes=s.batch_max_bytes,
            max_pending_per_origin=s.max_inflight_per_gateway)
        self.sessions = Sessions(s.reply_cache_size, s.session_ttl_s * 1000)
        data_dir = s.data_dir.replace("<id>", str(s.id))
        self.wal = WriteAheadLog(data_dir, s.durability)
        durable, report = self.wal.open()
        corrupt = sorted(glob.glob(os.path.join(data_dir, "*" + CORRUPT_SUFFIX)))
        if corrupt or (report.damage is not None and report.damage.kind == CORRUPT_MIDDLE):
            # Records that were durable (and may have been votes) are unreadable: serving from
            # the rest could contradict what this replica promised. Refuse, loudly, on every
            # start until an operator decides (the damaged bytes are kept for inspection).
            d = report.damage
            where = f"{d.segment} at offset {d.offset}: {d.reason}" if d else f"kept in {corrupt[0]}"
            self.wal.close()
            raise StorageError(
                f"write-ahead log {data_dir} is corrupt in the middle ({where}); refusing to "
                f"serve from a log that cannot be verified. Move the directory aside to rejoin "
                f"this replica with an empty log.")
        if not report.clean:
            d = report.damage
            log.warning("write-ahead log damaged: %s in %s at offset %d (%s); %d bytes discarded, "
                        "%d valid records kept; what is missing is fetched from peers",
                        d.kind, d.segment, d.offset, d.reason, d.discarded, report.records)
        # The nonce tells this incarnation's recovery answers from an earlier one's.
        nonce = None if s.new_cluster else int.from_bytes(os.urandom(8), "little")
        self.replica = Replica(self.id, CrashFaultPolicy(self.n), self.options, self.sessions,
                               durable, recovery_nonce=nonce)
        me = hosts.replica(self.id)
        self.channels = Channels(hwm=s.hwm, security=config.security)
        self.peer_router = self.channels.bind_router(bind_endpoint(me.host, me.peer_port), replicas_only=True)
        self.client_router = self.channels.bind_router(bind_endpoint(me.host, me.client_port))
        self.peer_out = {
            r: self.channels.connect_dealer(addr.peer_endpoint, replica_identity(self.id), replica=r)
            for r, addr in hosts.peers_of(self.id).items()
        }
        self.adapter = AppAdapter(s.app_host, s.app_port, s.framing, s.app_timeout_ms / 1000,
                                  on_state_change=self._app_state)
        self.watch = AppWatch(s.app_port)
        self.adapter.on_connect = self.watch.check
        self.max_payload = max(64 << 20, s.batch_max_bytes * 2)
        self.routes = {}            # client_id -> gateway identity that last sent it
        self.apply_queue = deque()
        self.apply_wakeup = asyncio.Event()
        self.executed = 0           # last instance whose replies went out
        self.halted = None          # why execution stopped, if it did
        self.proposed_at = {}       # leader: instance -> loop time of its first PROPOSE
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.stats = defaultdict(int)
        for key in ("requests_received", "requests_executed", "requests_deduplicated", "bad_messages", "app_restarts"):
            self.stats[key] = 0
        self.process = psutil.Process()
        self.recovered_bytes, self.recovered_records = report.bytes, report.records
        self.obs = Observability("server", self.id, self._snapshot, self.ready)
        self._last_role = None
        self._lagging = False
        self._bad_frames_logged = 0
        self.started = time.time()
        log.info("replica %d of %d starting: view %d, commit %d, log top %d, data %s (%s)",
                 self.id, self.n, self.replica.view, self.replica.commit, self.replica.top,
                 data_dir, s.durability)

    # ------------------------------------------------------------------ input

    def _on_message(self, sock, parts):
        if len(parts) < 2:
            return
        identity = parts[0]
        if sock is self.peer_router:
            claimed = parse_replica_identity(identity)
            if claimed is None or claimed == self.id or claimed >= self.n:
                self._bad(f"message from unknown peer identity {identity[:16]!r}")
                return
            for frame in parts[1:]:
                try:
                    sender, msg = m.decode(frame, self.max_payload)
                except ProtocolError as e:
                    self._bad(f"malformed frame from replica {claimed}: {e}")
                    continue
                if sender != claimed:
                    self._bad(f"frame claims sender {sender} on replica {claimed}'s connection")
                    continue
                self.replica.step(sender, msg)
        else:
            for frame in parts[1:]:
                self._on_gateway_frame(identity, frame)

    def _on_gateway_frame(self, identity, frame):
        try:
            mtype = frame[3] if len(frame) > 3 else -1
            if mtype == STATUS_REQUEST:
                core.decode_frame(frame, 1024)
                body = json.dumps(self.status()).encode()
                self.channels.send(self.client_router,
                                   [identity, core.encode_frame(STATUS_REPLY, self.id, 0, 0, body)])
                return
            sender, msg = m.decode(frame, self.max_payload)
        except ProtocolError as e:
            self._bad(f"malformed frame from gateway {identity[:16]!r}: {e}")
            return
        if self.stopping.is_set():
            return  # stopping: take no new work (every replica got the same requests)
        if not isinstance(msg, m.Requests):
            self._bad(f"gateway {identity[:16]!r} sent {type(msg).__name__}, which only replicas may send")
            return
        batch = core.Batch(msg.batch)
        routes = self.routes
        last = None
        for client_id, _, _ in batch:
            if client_id != last:
                routes[client_id] = identity
                last = client_id
        self.stats["requests_received"] += len(batch)
        self.replica.step(identity, msg)

    def _bad(self, what):
        self.stats["bad_messages"] += 1
        # Garbage can arrive at line rate; say what it is without flooding the log.
        if self._bad_frames_logged < 20 or self.stats["bad_messages"] % 1000 == 0:
            self._bad_frames_logged += 1
            log.warning("dropped: %s (total dropped %d)", what, self.stats["bad_messages"])

    # ------------------------------------------------------------------ the Ready cycle

    def _flush(self):
        rep = self.replica
        while rep.has_ready():
            rd = rep.ready()
            if rd.persist:
                self.wal.append(rd.persist)
                self.wal.sync()
            if rd.messages:
                self._send_all(rd.messages)
            if rd.apply:
                self.apply_queue.extend(rd.apply)
                self.apply_wakeup.set()
                obs = self.obs
                now = self.loop.time()
                for instance, _, plan in rd.apply:
                    obs.observe_batch(len(plan))
                    started = self.proposed_at.pop(instance, None)
                    if started is not None:
                        obs.observe_consensus_latency(now - started)
            if rd.replies:
                self._send_replies([(o, c, q, st, r) for o, c, q, st, r in rd.replies])
        role = (rep.view, rep.status)
        if role != self._last_role:
            old = self._last_role
            self._last_role = role
            if rep.status == RECOVERING:
                log.info("event=recovering (the log is empty: asking the other replicas for the "
                         "current state before taking part)")
            elif old and old[1] == RECOVERING:
                log.info("event=recovered view=%d leader=%d commit_target=%d", rep.view,
                         rep.leader, rep.catchup_target)
            if rep.status == NORMAL:
                log.info("event=view_active view=%d leader=%d self=%s previous_view=%s",
                         rep.view, rep.leader, rep.leader == self.id, old[0] if old else "-")
            elif rep.status != RECOVERING:
                log.info("event=view_change view=%d new_leader=%d old_leader=%s reason=%r",
                         rep.view, rep.leader, rep.leader_of(old[0]) if old else "-",
                         rep.view_change_reason)
        if self._lagging != (rep.commit < rep.catchup_target):
            self._lagging = not self._lagging
            if self._lagging:
                log.info("event=catching_up commit=%d target=%d", rep.commit, rep.catchup_target)
            else:
                log.info("event=caught_up commit=%d", rep.commit)

    def _send_all(self, messages):
        by_dest = defaultdict(list)
        encoded = {}
        for dest, msg in messages:
            if type(msg) is m.Propose and msg.instance not in self.proposed_at:
                self.proposed_at[msg.instance] = self.loop.time()
            frame = encoded.get(id(msg))
            if frame is None:
                frame = encoded[id(msg)] = m.encode(self.id, msg)
            by_dest[dest].append(frame)
        for dest, frames in by_dest.items():
            self.channels.send(self.peer_out[dest], frames)

    def _send_replies(self, replies):
        """replies: (identity or None, client_id, seq, status, bytes); one message per gateway."""
        ok = defaultdict(list)
        errors = defaultdict(list)
        for identity, client_id, seq, status, reply in replies:
            if identity is None:
                identity = self.routes.get(client_id)
                if identity is None:
                    continue  # its gateway never wrote to us; it retransmits and gets the cache
            if status == EXECUTE or status == DUPLICATE:
                ok[identity].append((client_id, seq, reply))
            else:
                errors[identity].append((client_id, seq, bytes([status]) + reply))
        for identity, entries in ok.items():
            self.channels.send(self.client_router, [identity, m.encode(self.id, m.Replies(core.pack_batch(entries)))])
        for identity, entries in errors.items():
            self.channels.send(self.client_router, [identity, m.encode(self.id, m.ReplyErrors(core.pack_batch(entries)))])

    def _tick(self):
        if self.stopping.is_set():
            return
        self.replica.tick(int(time.time() * 1000))
        self._flush()
        self.loop.call_later(self.settings.tick_ms / 1000, self._tick)

    def _on_idle(self):
        self._flush()

    # ------------------------------------------------------------------ execution

    async def _executor(self):
        queue = self.apply_queue
        sessions = self.sessions
        while True:
            if not queue:
                self.apply_wakeup.clear()
                await self.apply_wakeup.wait()
                continue
            plan = []        # (client_id, seq, status, payload or cached reply) in decided order
            payloads = []
            last_instance = 0
            while queue and len(payloads) < EXECUTE_CHUNK:
                instance, _, batch_plan = queue.popleft()
                last_instance = instance
                for client_id, seq, status, payload in batch_plan:
                    plan.append((client_id, seq, status, payload))
                    if status == EXECUTE:
                        payloads.append(bytes(payload))
            try:
                results = await self.adapter.execute(payloads) if payloads else []
            except AppRestarted as e:
                self._rebuild(str(e))
                continue
            except (AppConnectionLost, AppProtocolError) as e:
                if await self._app_was_replaced():
                    self._rebuild(f"the app's process changed after: {e}")
                    continue
                # What the app holds is unknown now: executing on could run a request twice or
                # skip one. Stop executing (the replica keeps voting, so the cluster keeps its
                # fault tolerance) until the pod restarts and the app is rebuilt from the log.
                self.halted = f"app failed mid-request: {e}"
                log.error("execution halted: %s; this replica still takes part in consensus but "
                          "no longer executes or replies; restart it together with its app to "
                          "rebuild the app's state from the log", e)
                return
            replies = []
            it = iter(results)
            for client_id, seq, status, payload in plan:
                if status == EXECUTE:
                    reply = next(it)
                    sessions.finish(client_id, seq, reply)
                elif status == DUPLICATE:
                    reply = payload if payload is not None else sessions.take_reply(client_id, seq)
                else:
                    reply = ERROR_TEXT[status]
                replies.append((None, client_id, seq, status, reply))
            self.stats["requests_executed"] += len(payloads)
            self.stats["requests_deduplicated"] += len(plan) - len(payloads)
            self.executed = last_instance
            self._send_replies(replies)

    async def _app_was_replaced(self) -> bool:
        """After a failure mid-request: wait for an app to listen again and tell whether it is a
        new process (state lost: rebuild) or the same one (outcome unknown: halt)."""
        watch = self.watch
        if watch.identity is None:
            return False
        old = watch.identity
        delay = 0.05
        while not self.stopping.is_set():
            found = watch.find()
            if found is not None:
                if found == old:
                    return False
                watch.identity = None
                return True
            await asyncio.sleep(delay)  # waiting for a process we cannot get an event from
            delay = min(delay * 2, 1.0)
        return False

    def _rebuild(self, why: str) -> None:
        """The app restarted empty: replay every decided instance into it, from the first.
        Exactly-once decisions are re-made from scratch in the same order, so they come out
        the same as before and as on every other replica."""
        rep = self.replica
        self.stats["app_restarts"] += 1
        log.warning("event=app_restart_detected detail=%r action=replay instances=1..%d "
                    "(app restart detected: rebuilding its state)", why, rep.applied)
        sessions = Sessions(self.settings.reply_cache_size, self.settings.session_ttl_s * 1000)
        self.sessions = rep.sessions = sessions
        self.apply_queue.clear()
        for i in range(1, rep.applied + 1):
            value = rep.log[i].value
            self.apply_queue.append((i, value, plan_batch(sessions, value)))
        self.executed = 0
        self.watch.identity = None  # adopt the new process on the next connection

    def _app_state(self, ready, reason):
        if ready:
            log.info("app at %s:%d is reachable again", self.settings.app_host, self.settings.app_port)
        else:
            log.warning("app at %s:%d is not answering (%s); requests wait, nothing is skipped",
                        self.settings.app_host, self.settings.app_port, reason)

    # ------------------------------------------------------------------ status and lifecycle

    def _snapshot(self) -> dict:
        d = self.status()
        rep, wal, app = self.replica, self.wal, self.adapter.stats
        d.update(known_commit=max(rep.catchup_target, rep.leader_commit, rep.commit),
                 app_errors=app.get("errors", 0), app_timeouts=app.get("timeouts", 0),
                 app_reconnects=app.get("reconnects", 0), app_retries=app.get("retries", 0),
                 log_bytes=self.recovered_bytes + wal.bytes_written,
                 log_records=self.recovered_records + wal.records_written,
                 wal_bytes_written=wal.bytes_written, wal_records_written=wal.records_written,
                 wal_syncs=wal.syncs)
        return d

    def ready(self):
        """In the current view and normal, caught up within READY_MAX_LAG, app reachable."""
        rep = self.replica
        if self.stopping.is_set():
            return False, "stopping"
        if self.halted:
            return False, f"execution halted: {self.halted}"
        if rep.status == RECOVERING:
            return False, "recovering: learning the cluster's state before taking part"
        if rep.status != NORMAL:
            return False, f"view change to view {rep.view} in progress"
        if rep.is_leader and not rep.has_quorum_contact():
            return False, "leader without contact to a quorum (view change expected)"
        known = max(rep.catchup_target, rep.leader_commit, rep.commit)
        if known - rep.commit > READY_MAX_LAG:
            return False, f"catching up: decided {rep.commit} of {known}"
        if rep.commit - self.executed > READY_MAX_LAG:
            return False, f"executing: {self.executed} of {rep.commit} applied to the app"
        if self.adapter._state is False:
            return False, f"app at {self.settings.app_host}:{self.settings.app_port} is not answering"
        return True, "ready"

    def status(self) -> dict:
        d = self.replica.describe()
        d.update(role="server", executed=self.executed, pid=os.getpid(),
                 app_ready=self.adapter._state is not False and self.halted is None, halted=self.halted,
                 rss_bytes=self.process.memory_info().rss, ready=self.ready()[0],
                 connections_refused=self.channels.refused,
                 peer_contact_s={r: round((self.replica.now - t) * self.settings.tick_ms / 1000, 3)
                                 for r, t in self.replica.contact.items()}, uptime_s=round(time.time() - self.started, 3),
                 n=self.n, **{k: v for k, v in self.stats.items()})
        return d

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        self.channels.start(self.loop, self._on_message, self._on_idle)
        if self.config.metrics_port:
            try:
                port = await self.obs.start(self.config.replica.host, self.config.metrics_port)
            except OSError as e:
                log.error("cannot serve metrics on port %d: %s", self.config.metrics_port, e)
                self.channels.close()
                return 1
            log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", port)
        if self.replica.commit:
            log.info("replaying %d decided instances into the app at %s:%d; the app must have "
                     "started empty (restart it together with this replica)", self.replica.commit,
                     self.settings.app_host, self.settings.app_port)
        executor = asyncio.create_task(self._executor())
        self.loop.call_soon(self._tick)
        log.info("replica %d ready: peers on port %d, gateways on port %d, app %s:%d (%s framing)",
                 self.id, self.config.replica.peer_port, self.config.replica.client_port,
                 self.settings.app_host, self.settings.app_port, self.settings.framing)
        try:
            await self.stopping.wait()
            if self.exit_code == 0:
                await self._hand_off()
        finally:
            executor.cancel()
            try:
                await executor
            except (asyncio.CancelledError, Exception):
                pass
            self.channels.close()
            await self.obs.stop()
            await self.adapter.close()
            self.wal.close()
        log.info("replica %d stopped", self.id)
        return self.exit_code

    async def _hand_off(self, deadline_s: float = 3.0):
        """Graceful stop: a leader first hands leadership to the next replica and waits (bounded)
        until that replica's view is active, so a rolling restart costs no election timeout."""
        rep = self.replica
        if not rep.transfer_leadership():
            return
        old_view = rep.view - 1
        log.info("handing leadership of view %d to replica %d before stopping", old_view, rep.leader)
        self._flush()
        end = self.loop.time() + deadline_s
        while self.loop.time() < end and not (rep.status == NORMAL and rep.view > old_view):
            await asyncio.sleep(self.settings.tick_ms / 1000)
            rep.tick(int(time.time() * 1000))
            self._flush()
        if rep.status == NORMAL:
            log.info("view %d is active under replica %d; stopping", rep.view, rep.leader)
        else:
            log.warning("no new view within %.1f s; stopping anyway (the others will elect one)", deadline_s)

    def _on_signal(self, sig):
        if self.stopping.is_set():
            os._exit(1)  # a second signal: leave now
        log.info("received %s: stopping", signal.Signals(sig).name)
        self.stopping.set()


def run(config) -> int:
    return asyncio.run(_main(config))


async def _main(config) -> int:
    server = Server(config)
    return await server.run()
