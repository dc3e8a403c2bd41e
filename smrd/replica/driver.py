"""`smrd --role server`: one replica beside its app.

Owns the loop: receive -> step -> persist -> send -> hand to the executor -> reply, in that order
for every Ready (persisting before sending is what makes a vote count; see
smrd/protocol/ready.py), the routing of replies back to the gateway that asked, and the
replica's lifecycle (start from the write-ahead log, stop on a signal).
Never: decides anything about order (the protocol core does), talks to the app (smrd.replica.executor
does, in its own task, fed in decided order), or answers a request it did not execute or find
in the reply cache.
"""
import asyncio
import glob
import ipaddress
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import psutil

from .. import core
from .app_watch import is_local_host
from .checkpoints import CheckpointError, CheckpointStore
from ..errors import ProtocolError, SmrdError
from .durable import durable_touch, durable_unlink
from .executor import Executor
from .reporting import ReplicaReporting, _answer_text
from ..ops import trace
from ..ops.observability import Observability
from ..protocol import messages as m
from ..protocol.options import Options
from ..protocol.quorum import CrashFaultPolicy
from ..protocol.replica import NORMAL, RECOVERING, Replica
from ..protocol.ready import group_commit
from ..protocol.records import AcceptRecord, CheckpointRecord
from ..protocol.sessions import DUPLICATE, ERROR_TEXT, EXECUTE, NOT_EXECUTING, SYSTEM, Sessions
from .state_transfer import StateTransfer
from .wal.log import CORRUPT_MIDDLE, CORRUPT_SUFFIX, WriteAheadLog
from .wal.records import StorageError
from ..net.transport import Channels, parse_replica_identity, replica_identity

log = logging.getLogger(__name__)

STATUS_REQUEST = m.STATUS_REQUEST
ROUTES_MIN = 4096  # routes kept before pruning those of sessions the table no longer holds
STATUS_REPLY = m.STATUS_REPLY

# In the data directory while a replica that started with an empty disk has not finished its
# recovery (docs/PROTOCOL.md, "Recovery"): a crash in between must not pass for a normal restart.
RECOVERY_MARK = "recovering"


# How often closed log segments are looked at for compression.
COMPRESS_EVERY_S = 5.0


def bind_endpoint(host: str, port: int) -> str:
    # An IP literal is bound as given; a DNS name (a pod's headless-service name) is ours, so bind
    # every interface rather than resolving it now.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"tcp://*:{port}"
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Server(ReplicaReporting):
    def __init__(self, config):
        s = config.settings
        self.config = config
        self.settings = s
        self.id = s.id
        hosts = config.hosts
        self.n = hosts.n
        self.hooks = bool(s.snapshot_request)
        self.options = Options.from_millis(
            s.tick_ms, s.heartbeat_ms, s.election_timeout_ms, s.request_timeout_ms,
            window=s.window, batch_max_requests=s.batch_max_requests,
            batch_max_bytes=s.batch_max_bytes,
            max_pending_per_origin=s.max_inflight_per_gateway,
            checkpoint_every=s.checkpoint_every if self.hooks else 0)
        if not is_local_host(s.app_host):
            raise SmrdError(
                f"app_host {s.app_host!r} is not an address of this host: a replica runs beside its "
                f"app (same host, or same pod), because telling an app that restarted from a dropped "
                f"connection needs the app's listening socket in sight; use 127.0.0.1")
        sessions = self._sessions()
        data_dir = s.data_dir.replace("<id>", str(s.id))
        self.wal = WriteAheadLog(data_dir, s.durability, segment_bytes=s.log_segment_bytes)
        durable, report = self.wal.open()
        self._scratch = None
        if s.durability == "memory":
            # Nothing of this replica survives it; checkpoints still need files to be served from.
            self._scratch = tempfile.mkdtemp(prefix=f"smrd-{s.id}-checkpoints-")
        self.checkpoint_dir = self._scratch or data_dir
        self.store = CheckpointStore(self.checkpoint_dir, fsync=s.durability == "fsync")
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
        restored = durable.checkpoint if durable.records else None
        app_state = None
        if restored is not None:
            if not self.hooks:
                self.wal.close()
                raise StorageError(
                    f"the log in {data_dir} starts at a checkpoint (instance {restored.instance}), but "
                    f"no snapshot hooks are configured: the app's state before it can only come from "
                    f"that checkpoint; set snapshot_request/restore_request as when it was taken")
            try:
                sessions_blob, app_state = self.store.read(restored.instance, restored.digest)
                sessions = self._sessions(sessions_blob)
            except (CheckpointError, ValueError) as e:
                self.wal.close()
                raise StorageError(
                    f"cannot restore from the checkpoint at instance {restored.instance}: {e}; the log "
                    f"before it is gone, so this replica cannot serve. Move {data_dir} aside to rejoin "
                    f"with an empty disk (it then fetches the state from its peers).") from None
            log.info("event=checkpoint_loaded instance=%d bytes=%d (the app is restored from it, then "
                     "the log after it is replayed)", restored.instance, len(app_state))
        # The nonce tells this incarnation's recovery answers from an earlier one's.
        nonce = None if s.new_cluster else int.from_bytes(os.urandom(8), "little")
        # voters: the bootstrap membership, used only until the replicated state (the log, a
        # checkpoint) says otherwise; auto_join: ask to become a voter when not one.
        # A recovery that began and never ended (the mark is still on disk) is resumed: what the
        # log holds then are decided values it caught up, not the votes it lost with its disk.
        self._recovery_mark = Path(data_dir) / RECOVERY_MARK
        self.policy = CrashFaultPolicy(self.n)
        self.replica = Replica(self.id, self.policy, self.options, sessions,
                               durable, recovery_nonce=nonce, voters=s.voters, auto_join=s.auto_join,
                               resume_recovery=self._recovery_mark.exists())
        self._marked = self._recovery_mark.exists()
        if self.replica.snapshot().status == RECOVERING and not self._marked and self._recovery_mark.parent.is_dir():
            durable_touch(self._recovery_mark)  # before the first record this replica writes
            self._marked = True
        me = hosts.replica(self.id)
        self.channels = Channels(hwm=s.hwm, security=config.security)
        self.peer_router = self.channels.bind_router(bind_endpoint(me.host, me.peer_port), replicas_only=True)
        self.client_router = self.channels.bind_router(bind_endpoint(me.host, me.client_port))
        self.peer_out = {
            r: self.channels.connect_dealer(addr.peer_endpoint, replica_identity(self.id), replica=r)
            for r, addr in hosts.peers_of(self.id).items()
        }
        for r, sock in self.peer_out.items():
            self.channels.watch_disconnect(sock, lambda r=r: self._peer_lost(r))
        self.max_payload = max(64 << 20, s.batch_max_bytes * 2)
        # client_id -> (identity of the gateway that last sent it, highest seq it sent us). We
        # answer only requests up to that seq: a gateway that sends to the leader alone wants no
        # answer from us, and one that sent us a request (or its retransmission) wants one.
        self.routes = {}
        self._routes_limit = ROUTES_MIN
        self.transfer = StateTransfer(
            self.id, hosts.peers_of(self.id).keys(), self.policy.max_faults + 1, self.store,
            self._send_state, s.state_transfer_rate_mb * 1_000_000, self._transfer_done,
            self._transfer_failed)
        self._compressing = False
        # Bounded memory: (instance, value bytes) of the values in the core's log, oldest first.
        self.mem_values = deque()
        self.mem_bytes = 0
        self.mem_budget = s.log_memory_bytes if s.durability != "memory" else None
        self._serving = set()       # peers whose catch-up is being read from the log files
        self.proposed_at = {}       # leader: instance -> loop time of its first PROPOSE
        self.exit_code = 0
        self.stats = defaultdict(int)
        for key in ("requests_received", "requests_executed", "requests_deduplicated", "bad_messages",
                    "app_restarts", "app_resets", "execution_halts", "divergences_reported"):
            self.stats[key] = 0
        self.stopping = asyncio.Event()
        self.executor = Executor(self, self.checkpoint_dir if s.durability == "memory" else data_dir,
                                 sessions, restored, app_state)
        self.process = psutil.Process()
        self.recovered_bytes, self.recovered_records = report.bytes, report.records
        self.obs = Observability("server", self.id, self._metrics, self.ready)
        self.wal.on_fsync = self.obs.observe_wal_fsync
        self._last_role = None
        self._last_membership = None
        self._refused_seen = 0      # the core's count of refused changes already logged
        self._suspected_seen = 0    # the core's count of pre-votes (leader suspected) already logged
        self._refused_quiet_until = 0.0
        # Set once this process took part as a member with the current leader's stream (not just
        # replaying its own log): a removal after that is an operator's decision that auto_join
        # must not undo by asking to join again (see _on_membership).
        self._live_member = False
        self._transfer_wide = False  # the last state transfer failed: ask every candidate
        self._lagging = False
        self._bad_frames_logged = 0
        self.started = time.time()
        log.info("replica %d of %d starting: view %d, commit %d, log top %d, data %s (%s)",
                 self.id, self.n, *(lambda s: (s.view, s.commit, s.top))(self.replica.snapshot()),
                 data_dir, s.durability)
        self._on_membership()

    def _sessions(self, image=None) -> Sessions:
        # An empty exactly-once table, or the one a checkpoint holds (ValueError if damaged).
        s = self.settings
        if image is None:
            return Sessions(s.reply_cache_size, s.session_ttl_s * 1000)
        return Sessions.restore(s.reply_cache_size, s.session_ttl_s * 1000, image)

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
                if type(msg) in m.STATE_MESSAGES:
                    self.transfer.on_message(sender, msg)
                    continue
                if trace.ON and type(msg) in (m.Propose, m.Accepted):
                    trace.stamp("propose_recv" if type(msg) is m.Propose else "accepted_recv",
                                msg.instance, sender)
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
        if type(msg) is m.Diverged:
            for client_id, seq, data in core.Batch(msg.batch):
                if len(data) == 17:
                    self.executor.diverged(client_id, seq, bytes(data[:16]), data[16])
            return
        if not isinstance(msg, m.Requests):
            self._bad(f"gateway {identity[:16]!r} sent {type(msg).__name__}, which only replicas may send")
            return
        batch = core.Batch(msg.batch)
        routes = self.routes
        for client_id, seq, _ in batch:
            route = routes.get(client_id)
            if route is None or route[1] < seq or route[0] != identity:
                routes[client_id] = (identity, seq)
        self.stats["requests_received"] += len(batch)
        if trace.ON:
            for client_id, seq, _ in batch:
                trace.stamp("r_recv", (client_id, seq))
        self.replica.step(identity, msg)
        if msg.directed and not self.executor.can_execute:
            # Sent to this replica alone, which orders it but cannot answer it: say so now, so
            # that the gateway asks the others at once instead of at its retransmission timer.
            refusal = bytes([NOT_EXECUTING]) + ERROR_TEXT[NOT_EXECUTING]
            entries = [(client_id, seq, refusal) for client_id, seq, _ in batch]
            self.channels.send(self.client_router,
                               [identity, m.encode(self.id, m.ReplyErrors(core.pack_batch(entries)))])

    def _bad(self, what):
        self.stats["bad_messages"] += 1
        # Garbage can arrive at line rate; say what it is without flooding the log.
        if self._bad_frames_logged < 20 or self.stats["bad_messages"] % 1000 == 0:
            self._bad_frames_logged += 1
            log.warning("dropped: %s (total dropped %d)", what, self.stats["bad_messages"])

    # ------------------------------------------------------------------ the Ready cycle

    def _flush(self):
        # Every Ready the core has now, handled as protocol.ready's rules say: the records
        # written with ONE fsync (group commit), a leader's proposals sent before it, everything
        # else after it.
        rep = self.replica
        try:
            batch = []
            while rep.has_ready():
                rd = rep.ready()
                if rd.checkpoints:
                    # From now on every reply the executor gets goes into these images.
                    self.executor.open_images.extend(image for _, image in rd.checkpoints)
                batch.append(rd)
            if batch:
                commit = group_commit(batch)
                if commit.records:
                    self.wal.append(commit.records)
                if commit.early:
                    if trace.ON:  # stamped as it leaves (the hop then includes the sending)
                        for _, msg in commit.early:
                            trace.stamp("propose", msg.instance)
                    self._send_all(commit.early)
                if commit.sync:
                    self.wal.sync()
                if trace.ON:
                    for record in commit.records:
                        if type(record) is AcceptRecord:
                            trace.stamp("persisted", record.instance)
            if self._marked and rep.progress()[1] != RECOVERING:
                durable_unlink(self._recovery_mark)  # the record that ended recovery is durable
                self._marked = False
            for rd in batch:
                self._output(rd)
        except StorageError as e:
            self._storage_failed(e)
            return
        self._log_changes()

    def _storage_failed(self, e):
        # After a failed write or fsync the log may have lost votes this replica already counted
        # on; the only safe move is to stop (a restart recovers from what is on disk).
        if not self.stopping.is_set():
            log.critical("event=storage_failed error=%r; stopping this replica (restart it: it "
                         "recovers from its log and its peers)", str(e))
            self.exit_code = 1
            self.stopping.set()

    def _output(self, rd):
        rep = self.replica
        if rd.messages:
            if trace.ON:
                for _, msg in rd.messages:
                    if type(msg) is m.Accepted:
                        trace.stamp("accepted_sent", msg.instance)
            self._send_all(rd.messages)
        if rd.replies:
            for _, _, _, status, reply in rd.replies:
                if status == SYSTEM:  # the leader refused a change before ordering it
                    self._refused_seen += 1
                    log.warning("event=membership_change_refused when=proposal reason=%r",
                                _answer_text(reply).removeprefix("REFUSED "))
            self.send_replies([(o, c, q, st, r) for o, c, q, st, r in rd.replies])
        if rd.apply:
            self.executor.feed(rd.apply, rd.checkpoints)
            if trace.ON:
                for instance, _, plan in rd.apply:
                    trace.stamp("decided", instance)
                    for client_id, seq, _, _ in plan:
                        trace.stamp("planned", (client_id, seq), instance)
            if self.mem_budget is not None:
                for instance, value, _ in rd.apply:
                    self.mem_values.append((instance, len(value)))
                    self.mem_bytes += len(value)
            obs = self.obs
            now = self.loop.time()
            for instance, _, plan in rd.apply:
                if len(plan) == 1 and plan[0][2] == SYSTEM:
                    self._log_change_answer(instance, plan[0][3])
                obs.observe_batch(len(plan))
                started = self.proposed_at.pop(instance, None)
                if started is not None:
                    obs.observe_consensus_latency(now - started)
        for peer, start in rd.serve_log:
            if peer not in self._serving:
                self._serving.add(peer)
                self.loop.create_task(self._serve_log(peer, start))
        if rd.transfer is not None:
            peer, instance = rd.transfer
            log.info("event=state_transfer_start commit=%d peer=%d peer_checkpoint=%d (the log "
                     "this replica needs was truncated: fetching a checkpoint)",
                     rep.progress()[2], peer, instance)
            self.transfer.start(peer, instance)

    def _size_transfer(self):
        """State transfers ask the members of the membership this replica knows (not every
        candidate of hosts.conf: one that is not running would make each query wait its whole
        timeout) and need f+1 of its voters to agree on a checkpoint. After a transfer failed,
        the next one asks every candidate: the group may have moved on without this replica."""
        cfg = self.replica.progress()[5]
        self.transfer.need = (len(cfg.voters) - 1) // 2 + 1
        members = tuple(sorted(r for r in cfg.members if r != self.id))
        if self._transfer_wide or len(members) < self.transfer.need:
            members = tuple(sorted(self.config.hosts.peers_of(self.id)))
        self.transfer.peers = members

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

    def _prune_routes(self):
        # One route per client id ever seen: without this, every Idempotency-Key (a client id of
        # its own) would stay here for good. Keep those the session table still knows; a request
        # whose session is not in it yet loses its route at worst, and its gateway's
        # retransmission brings it back.
        cache = self.executor.sessions.cache
        self.routes = {cid: route for cid, route in self.routes.items() if cid in cache}
        self._routes_limit = max(ROUTES_MIN, 2 * len(self.routes))

    def send_replies(self, replies):
        """replies: (identity or None, client_id, seq, status, bytes); one message per gateway."""
        ok = defaultdict(list)
        errors = defaultdict(list)
        routes = self.routes
        last_client = route = None  # a gateway's requests come in runs of one client id
        for identity, client_id, seq, status, reply in replies:
            if trace.ON:
                trace.stamp("reply_send", (client_id, seq))
            if identity is None:
                if client_id != last_client:
                    last_client, route = client_id, routes.get(client_id)
                if route is None or seq > route[1]:
                    continue  # its gateway did not send it to us: it retransmits if it must
                identity = route[0]
            if status == EXECUTE or status == DUPLICATE or status == SYSTEM:
                # A membership change's answer ("OK ..." or "REFUSED ...") is an ordinary reply.
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
        if len(self.routes) > self._routes_limit:
            self._prune_routes()
        now = self.loop.time()
        if not self._compressing and now >= self._next_compress:
            self._next_compress = now + COMPRESS_EVERY_S
            self._compressing = True
            self.loop.create_task(self._compress_log())
        self.loop.call_later(self.settings.tick_ms / 1000, self._tick)

    def _on_idle(self):
        self._flush()

    # ------------------------------------------------------------------ for the executor

    def new_sessions(self, image=None) -> Sessions:
        return self._sessions(image)

    def set_sessions(self, sessions) -> None:
        """The executor rebuilds the app with this exactly-once table (the core plans with it)."""
        self.replica.replace_sessions(sessions)

    def storage_failed(self, e):
        self._storage_failed(e)

    def record_checkpoint(self, instance, digest, size):
        # The checkpoint file is durable (written, fsynced, renamed, directory fsynced): say so in
        # the log, then let the core drop what it covers (keeping one checkpoint's worth back, for
        # peers a little behind). Returns where the log may now start.
        self.wal.append([CheckpointRecord(instance, digest, size)])
        self.wal.sync()
        low = self.replica.checkpoint_stored(instance)
        self.store.delete_below(low)
        self._flush()
        return low

    def _peer_lost(self, r):
        # A leader killed (or its pod gone) closes its connections at once: suspecting it then
        # takes ~2 heartbeats instead of the election timeout (docs/PROTOCOL.md, "Leader change").
        snap = self.replica.snapshot()
        if r == snap.leader:
            log.info("event=leader_connection_lost leader=%d view=%d", r, snap.view)
        self.replica.peer_lost(r)
        self._flush()

    def evict(self):
        # Keep the newest log_memory_bytes of executed values in memory; drop down to 3/4 of it.
        if self.mem_budget is None or self.mem_bytes <= self.mem_budget:
            return
        values, upto = self.mem_values, 0
        while values and self.mem_bytes > self.mem_budget * 3 // 4 and values[0][0] <= self.executor.executed:
            upto, size = values.popleft()
            self.mem_bytes -= size
        if upto:
            self.replica.evict(upto)

    async def _serve_log(self, peer, start):
        rep, opt = self.replica, self.options
        try:
            entries = await asyncio.to_thread(self.wal.read_decided, start, rep.progress()[2],
                                              opt.catchup_max_entries, opt.catchup_max_bytes)
            view, _, commit = rep.progress()[:3]
            self._send_state(peer, m.CatchupReply(view, commit, tuple(entries)))
        except StorageError as e:
            log.error("cannot serve catch-up from the log files: %s", e)
        finally:
            self._serving.discard(peer)

    def values(self, first, last):
        # Decided values first..last, from memory or (evicted ones) read back from the log files.
        rep = self.replica
        evicted = rep.snapshot().evicted
        i = first
        while i <= last:
            value = rep.value_of(i)
            if value is not None:
                yield i, value
                i += 1
                continue
            chunk = self.wal.read_decided(i, min(last, evicted), 4096, 64 << 20)
            if not chunk:
                raise StorageError(f"instance {i} is neither in memory nor in the log files")
            yield from chunk
            i = chunk[-1][0] + 1

    def _send_state(self, peer, msg):
        out = self.peer_out.get(peer)
        if out is not None:
            self.channels.send(out, [m.encode(self.id, msg)])

    def _transfer_done(self, instance, digest, size, sessions_blob, app_state):
        rep = self.replica
        if instance <= rep.progress()[2]:
            rep.transfer_failed()  # caught up from the log meanwhile
            self._flush()
            return
        if self._transfer_wide:
            self._transfer_wide = False
            self._size_transfer()
        sessions = self._sessions(sessions_blob)
        self.wal.append([CheckpointRecord(instance, digest, size)])
        self.wal.sync()
        if rep.install_checkpoint(instance, sessions):
            self.executor.install(instance, app_state, sessions)
        self._flush()

    def _transfer_failed(self, why):
        self._transfer_wide = True
        self._size_transfer()
        log.warning("event=state_transfer_failed reason=%r (catch-up resumes; a peer that truncated "
                    "its log starts the next attempt)", why)
        self.replica.transfer_failed()
        self._flush()

    async def _compress_log(self):
        try:
            count, before, after = await asyncio.to_thread(self.wal.compress_closed)
            if count:
                log.info("event=log_compressed segments=%d bytes=%d compressed=%d", count, before, after)
        except StorageError as e:
            log.error("log compression failed: %s", e)
        finally:
            self._compressing = False

    # ------------------------------------------------------------------ status and lifecycle

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        trace.start(f"replica-{self.id}")
        self._next_compress = self.loop.time() + COMPRESS_EVERY_S
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
        commit = self.replica.progress()[2]
        if commit and self.executor.pending_reset is None:
            log.info("replaying %d decided instances into the app at %s:%d (a new app, started "
                     "empty)", commit, self.settings.app_host, self.settings.app_port)
        executor = asyncio.create_task(self.executor.run())
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
            self.transfer.cancel()
            try:
                await executor
            except (asyncio.CancelledError, Exception):
                pass
            await self.executor.close()  # a checkpoint being written finishes first
            self.channels.close()
            await self.obs.stop()
            self.wal.close()
            if self._scratch:
                shutil.rmtree(self._scratch, ignore_errors=True)
        log.info("replica %d stopped", self.id)
        return self.exit_code

    async def _hand_off(self, deadline_s: float = 3.0):
        """Graceful stop: a leader first hands leadership to the next replica and waits (bounded)
        until that replica's view is active, so a rolling restart costs no election timeout."""
        rep = self.replica
        if not rep.transfer_leadership():
            return
        s = rep.snapshot()
        old_view = s.view - 1
        log.info("handing leadership of view %d to replica %d before stopping", old_view, s.leader)
        self._flush()
        end = self.loop.time() + deadline_s
        while self.loop.time() < end and not (s.status == NORMAL and s.view > old_view):
            await asyncio.sleep(self.settings.tick_ms / 1000)
            rep.tick(int(time.time() * 1000))
            self._flush()
            s = rep.snapshot()
        if s.status == NORMAL:
            log.info("view %d is active under replica %d; stopping", s.view, s.leader)
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
