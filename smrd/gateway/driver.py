# `smrd --role client`: the gateway that outside clients reach.
#
# Owns: the client-facing TCP server (in the app's framing mode), giving each request a unique
# (client_id, seq), sending requests to every member of the replica group in one batch per hop
# (the membership is learned from the replicas' status answers; every replica of hosts.conf
# while it is not known), picking the reply
# (the first, or reply_quorum matching ones), counting divergence, retransmission, deadlines and
# the error an outside client sees when the cluster cannot answer.
# Never: keeps state that matters after a crash (kill it any time: outside clients retry, and
# the replicas' reply cache answers retries that carry an idempotency key), or answers a request
# with anything but a replica's reply or an explicit smrd error.
import asyncio
import hashlib
import json
import logging
import os
import signal
from collections import OrderedDict

from .. import core
from ..errors import ProtocolError
from ..ops.observability import Observability
from .client_connection import ClientConnection
from ..framing import FramingError, error_reply, split_idempotency
from ..protocol import messages as m
from ..protocol.sessions import NOT_EXECUTING, TOO_OLD, UNKNOWN_SESSION
from ..net.transport import Channels, gateway_identity

log = logging.getLogger(__name__)

IDEMPOTENT_BIT = 1 << 63
# How often the gateway asks the members for their status (reachability, and the membership).
PROBE_S = 1.0
# For FAST_PROBES_S after start-up and after losing the leader, while none is known, ask every
# PROBE_NO_LEADER_S: until a status answer names one, every new request goes to every replica
# (each follower holds and answers it too). Not for longer: a DEALER queues what it sends to a
# replica that is down, and that replica would answer the whole queue when it comes back.
PROBE_NO_LEADER_S = 0.1
FAST_PROBES_S = 3.0
# A replica counts as reachable (and a known membership as current) this long after it answered.
REACHABLE_S = 3.0


def idempotent_client_id(key: str) -> int:
    """A retry through any gateway maps to the same (client_id, seq=1) at the replicas."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return IDEMPOTENT_BIT | (int.from_bytes(digest, "little") & (IDEMPOTENT_BIT - 1))


class ClusterUnavailable(Exception):
    """No reply from the replicas within the deadline (or a definitive error from them)."""


class _Call:
    """One request in flight, and what a client connection waits on for its reply.

    It answers the part of asyncio.Future's interface that ClientConnection uses (done, result,
    exception, cancelled, add_done_callback), but runs its done-callbacks at once when it
    completes instead of scheduling each with call_soon: a Future and its scheduled callback
    cost the gateway 2.3 µs per request against 0.5 for this (timeit, this machine). A real
    Future is made only for those that await the call (Gateway.submit), on demand."""

    __slots__ = ("key", "payload", "first_sent", "last_sent", "replies", "_done", "_reply",
                 "_error", "_callbacks", "_waiter")

    def __init__(self, key, payload, now):
        self.key = key
        self.payload = payload
        self.first_sent = now
        self.last_sent = now
        self.replies = {}   # replica id -> reply
        self._done = False
        self._reply = self._error = self._waiter = None
        self._callbacks = []

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False  # never cancelled: it completes with a reply or an error

    def exception(self):
        return self._error

    def result(self) -> bytes:
        if self._error is not None:
            raise self._error
        return self._reply

    def add_done_callback(self, callback) -> None:
        if self._done:
            asyncio.get_running_loop().call_soon(callback, self)  # as a Future would
        else:
            self._callbacks.append(callback)

    def future(self, loop) -> asyncio.Future:
        """An asyncio Future of the reply, for awaiting (one per call, shared)."""
        if self._waiter is None:
            self._waiter = loop.create_future()
            if self._done:
                self._resolve_waiter()
        return self._waiter

    def _complete(self, reply, error) -> None:
        if self._done:
            return
        self._done = True
        self._reply, self._error = reply, error
        if self._waiter is not None:
            self._resolve_waiter()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # one connection's bug must not stop the replies of the others
                log.exception("a reply callback failed")

    def _resolve_waiter(self) -> None:
        if not self._waiter.done():
            if self._error is not None:
                self._waiter.set_exception(self._error)
            else:
                self._waiter.set_result(self._reply)


class Gateway:
    def __init__(self, config):
        s = config.settings
        self.config = config
        self.settings = s
        self.mode = s.framing
        self.n = config.hosts.n
        self.k = s.reply_cache_size
        self.max_inflight = min(s.max_inflight_per_gateway, self.k)
        self.reply_quorum = s.reply_quorum
        self.check_every = s.divergence_check_every
        self.directed_batches = 0
        self.retransmit_s = s.gateway_retransmit_ms / 1000
        self.deadline_s = s.gateway_request_deadline_ms / 1000
        self.channels = Channels(hwm=s.hwm, security=config.security)
        self.identity = gateway_identity(config.settings.id or 0)
        self.replica_socks = {}
        self.sock_replica = {}
        for r, addr in config.hosts.replicas.items():
            sock = self.channels.connect_dealer(addr.client_endpoint, self.identity, replica=r)
            self.replica_socks[r] = sock
            self.sock_replica[sock] = r
            self.channels.watch_disconnect(sock, lambda r=r: self._connection_lost(r))
        self._new_session()
        self.calls = {}                 # (client_id, seq) -> _Call
        self.session_calls = OrderedDict()  # seq -> _Call of the current session, oldest first
        self.window_open = asyncio.Event()
        self.to_send = []
        self._flush_scheduled = False
        self.recent = OrderedDict()     # (client_id, seq) -> reply, to compare late replies
        self.stats = {"requests": 0, "replies": 0, "retransmits": 0, "timeouts": 0,
                      "divergences": 0, "errors": 0, "connections": 0, "bad_messages": 0}
        self.server = None
        self.stopping = asyncio.Event()
        self.heard_from = {}            # replica id -> loop time of its last message
        # The replica group as the replicas report it (smrd.protocol.membership): requests go to
        # its members only, so that candidates of hosts.conf that are not running (a 7-line
        # hosts.conf with 3 replicas up) cost nothing. None: not known yet, send to every replica.
        self.membership = None          # {"index", "voters", "learners", ...} with the highest index
        self.targets = tuple(self.replica_socks)  # replica ids requests go to
        # The replica the members' status answers name as leader (of the highest view heard of,
        # status normal), or None. With reply_quorum 1, new requests go to it alone: the
        # followers learn them from its proposals and neither receive nor answer them, which
        # saves every process CPU on each request. Retransmissions, and everything in flight
        # when its connection drops, go to every target, as all requests do while it is None.
        self.leader = None
        self.leader_view = -1
        self.fast_probes_until = 0.0  # set when the loop starts; see FAST_PROBES_S
        self.probe_timer = None
        self.disconnected = set()       # replicas whose connection dropped and who were not heard since
        # Replicas that said they cannot execute now (halted, rebuilding their app, app down):
        # they still order, but they would not answer. New requests then go to every target, not
        # to such a leader alone. Learned from a NOT_EXECUTING answer (at once) or a status
        # answer; forgotten when a status answer says it executes again.
        self.not_executing = set()
        self.notified = OrderedDict()   # (client_id, seq, replica) told it diverged, not to repeat
        self.drained = asyncio.Event()  # set whenever no request is in flight
        self.obs = Observability("client", config.settings.id or 0, self._snapshot, self.ready)

    def _new_session(self):
        # 63 random bits: two gateways (or incarnations) never share a session by accident.
        self.client_id = int.from_bytes(os.urandom(8), "little") & (IDEMPOTENT_BIT - 1) or 1
        self.next_seq = 1

    # ------------------------------------------------------------------ submitting

    async def submit(self, payload: bytes, idempotency_key: str = None) -> bytes:
        """Order and execute one request; returns the reply or raises ClusterUnavailable."""
        while True:
            call = self.try_submit(payload, idempotency_key)
            if call is not None:
                future = call.future(self.loop)
                return await (asyncio.shield(future) if idempotency_key is not None else future)
            # The replicas keep k replies per client: issuing further ahead could evict the
            # reply of a request still outstanding. Wait (back-pressure on outside clients).
            self.window_open.clear()
            await self.window_open.wait()

    def _window_open(self) -> bool:
        oldest = next(iter(self.session_calls), self.next_seq)
        return self.next_seq < oldest + self.k and len(self.session_calls) < self.max_inflight

    def try_submit(self, payload: bytes, idempotency_key: str = None):
        """The request's _Call (future-like: see _Call), or None while the window is full (no
        task, no coroutine: this is the per-request path)."""
        loop = self.loop
        if idempotency_key is not None:
            key = (idempotent_client_id(idempotency_key), 1)
            call = self.calls.get(key)
            if call is not None:
                return call
        else:
            if not self._window_open():
                return None
            key = (self.client_id, self.next_seq)
            self.next_seq += 1
        call = _Call(key, payload, loop.time())
        self.calls[key] = call
        if key[0] == self.client_id:
            self.session_calls[key[1]] = call
        self.stats["requests"] += 1
        self.to_send.append(call)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return call

    def _flush(self):
        self._flush_scheduled = False
        calls, self.to_send = self.to_send, []
        self._send(calls)

    def _send(self, calls, everyone=False):
        if not calls:
            return
        leader = self.leader
        directed = (not everyone and leader is not None and self.reply_quorum == 1
                    and leader in self.targets and leader not in self.not_executing)
        if directed and self.check_every:
            self.directed_batches += 1
            if self.directed_batches % self.check_every == 0:
                # To every replica: the followers answer too, and their replies are compared
                # with the leader's (a divergence is otherwise seen only on retransmissions).
                directed = False
        limit = self.settings.batch_max_bytes
        frames = []
        entries, size = [], 0
        for call in calls:
            if entries and size + len(call.payload) > limit:
                frames.append(m.encode(0, m.Requests(core.pack_batch(entries), directed)))
                entries, size = [], 0
            entries.append((call.key[0], call.key[1], call.payload))
            size += len(call.payload) + core.ENTRY_HEADER_SIZE
        frames.append(m.encode(0, m.Requests(core.pack_batch(entries), directed)))
        socks = self.replica_socks
        if directed:
            self.channels.send(socks[leader], frames)
            return
        for r in self.targets:
            self.channels.send(socks[r], frames)

    def _connection_lost(self, replica):
        # A hint (the connection may come back), but the requests sent to it alone may be lost
        # with it: send everything in flight to every target now rather than at retransmit_s.
        # Until it is heard from again it is not taken for the leader: the others still name it
        # until their view change ends.
        self.disconnected.add(replica)
        if len(self.disconnected) == len(self.replica_socks):
            self.leader_view = -1  # all gone: a cluster started anew begins at view 0 again
        if replica != self.leader or self.stopping.is_set():
            return
        log.info("event=gateway_leader leader=none view=%d reason='connection to replica %d dropped'",
                 self.leader_view, replica)
        self._leader_lost()
        now = self.loop.time()
        calls = list(self.calls.values())
        for call in calls:
            call.last_sent = now
        self._send(calls, everyone=True)

    def _complete(self, call, reply=None, error=None):
        key = call.key
        self.calls.pop(key, None)
        if key[0] == self.client_id:
            self.session_calls.pop(key[1], None)
            self.window_open.set()
        if not self.calls:
            self.drained.set()
        call._complete(reply, error)

    # ------------------------------------------------------------------ replies

    def _snapshot(self) -> dict:
        return dict(self.stats, inflight=len(self.calls), n=self.n,
                    replicas_reachable=self._reachable(),
                    replicas_not_executing=len(self.not_executing))

    def _reachable(self, among=None) -> int:
        now = self.loop.time()
        return sum(1 for r, t in self.heard_from.items()
                   if now - t <= REACHABLE_S and (among is None or r in among))

    def ready(self):
        """Ready while listening and a quorum of the voters (of every replica in hosts.conf while
        the membership is not known) answered within the last 3 s."""
        if self.stopping.is_set() or self.server is None:
            return False, "not listening"
        if self.membership is not None:
            voters = self.membership["voters"]
            reachable, quorum = self._reachable(voters), len(voters) // 2 + 1
            if reachable < quorum:
                return False, f"{reachable} of {len(voters)} voters reachable, need {quorum}"
        else:
            voters = None
            reachable, quorum = self._reachable(), self.n // 2 + 1
            if reachable < quorum:
                return False, f"{reachable} of {self.n} replicas reachable, need {quorum}"
        now = self.loop.time()
        if not any(now - t <= REACHABLE_S and r not in self.not_executing
                   and (voters is None or r in voters) for r, t in self.heard_from.items()):
            return False, ("no reachable replica can execute (each is halted, rebuilding its app, "
                           "or its app is down): see smrd status")
        return True, "ready"

    def _probe(self):
        # Ask the members how they are, every second (more often while no leader is known, see
        # FAST_PROBES_S): an idle gateway hears nothing otherwise (readiness reflects
        # reachability rather than traffic), and the answers carry the membership and the
        # leader. While no member answered for REACHABLE_S (or none is known), ask and send
        # to every replica of hosts.conf: the group may have moved on without this gateway.
        if self.stopping.is_set():
            return
        self._probe_once()
        fast = self.leader is None and self.loop.time() < self.fast_probes_until
        self.probe_timer = self.loop.call_later(PROBE_NO_LEADER_S if fast else PROBE_S, self._probe)

    def _leader_lost(self):
        """No leader known any more: probe at once, then often for a while (FAST_PROBES_S)."""
        self.leader = None
        self.fast_probes_until = self.loop.time() + FAST_PROBES_S
        if self.probe_timer is not None:
            self.probe_timer.cancel()
        self.probe_timer = self.loop.call_soon(self._probe)

    def _probe_once(self):
        self._retarget()
        frame = [core.encode_frame(m.STATUS_REQUEST, 0, 0, 0)]
        for r in self.targets:
            self.channels.send(self.replica_socks[r], frame)

    def _retarget(self):
        every = tuple(self.replica_socks)
        cfg = self.membership
        if cfg is None:
            targets = every
        else:
            members = set(cfg["voters"]) | set(cfg["learners"])
            targets = tuple(r for r in every if r in members)
            if not targets or self._reachable(members) == 0:
                targets = every  # fall back: nobody we think is a member answers
        if targets != self.targets:
            log.info("event=gateway_targets replicas=%s membership=%s", list(targets),
                     cfg["index"] if cfg else "unknown")
            self.targets = targets

    def _on_status(self, replica, frame):
        try:
            _, _, _, _, _, payload = core.decode_frame(frame)
            status = json.loads(bytes(payload))
            cfg = status.get("membership")
            index, voters, learners = cfg["index"], cfg["voters"], cfg["learners"]
        except (ProtocolError, ValueError, TypeError, KeyError, AttributeError):
            return  # a replica without memberships, or garbage: ignore
        if self.membership is None or index > self.membership["index"]:
            self.membership = {"index": index, "voters": list(voters), "learners": list(learners)}
            self._retarget()
        if status.get("can_execute", True):
            self._executes(replica)
        elif replica not in self.not_executing:
            self._cannot_execute(replica, status.get("execution_reason") or "says so")
        self._leader_hint(replica, status)

    def _leader_hint(self, replica, status):
        view, leader, state = status.get("view"), status.get("leader"), status.get("status")
        if type(view) is not int or type(leader) is not int:
            return
        if state == "normal" and leader in self.replica_socks and leader not in self.disconnected and (
                view > self.leader_view or (view == self.leader_view and self.leader is None)):
            new = leader
        elif replica == self.leader and (state != "normal" or leader != replica):
            new = None  # the one we send to says it is not leading (now): send to everyone
        else:
            return
        self.leader_view = max(self.leader_view, view)
        if new != self.leader:
            log.info("event=gateway_leader leader=%s view=%d", "none" if new is None else new, view)
            if new is None:
                self._leader_lost()
            else:
                self.leader = new

    def _cannot_execute(self, replica, why):
        self.not_executing.add(replica)
        log.warning("event=replica_cannot_execute replica=%d leader=%s reason=%r (new requests go "
                    "to every replica until it executes again)", replica, replica == self.leader, why)

    def _executes(self, replica):
        if replica in self.not_executing:
            self.not_executing.discard(replica)
            log.info("event=replica_executes replica=%d", replica)

    def _on_message(self, sock, parts):
        replica = self.sock_replica.get(sock)
        self.heard_from[replica] = self.loop.time()
        if self.disconnected:
            self.disconnected.discard(replica)
        for frame in parts:
            if len(frame) > 3 and frame[3] == m.STATUS_REPLY:
                self._on_status(replica, frame)  # an answer to _probe: membership, leader, a sign of life
                continue
            try:
                _, msg = m.decode(frame)
            except ProtocolError as e:
                self.stats["bad_messages"] += 1
                log.warning("dropped a malformed frame from replica %s: %s", replica, e)
                continue
            if isinstance(msg, m.Replies):
                for client_id, seq, reply in core.Batch(msg.batch):
                    self._on_reply(replica, (client_id, seq), bytes(reply))
            elif isinstance(msg, m.ReplyErrors):
                again = []
                for client_id, seq, data in core.Batch(msg.batch):
                    status = data[0] if len(data) else 0
                    if status == NOT_EXECUTING:
                        call = self.calls.get((client_id, seq))
                        if call is not None and replica not in call.replies:
                            again.append(call)
                        continue
                    self._on_error(replica, (client_id, seq), status, bytes(data[1:]))
                if again:
                    # It orders them but will not answer: the others will, once asked.
                    if replica not in self.not_executing:
                        self._cannot_execute(replica, "it answered a request with NOT_EXECUTING")
                    now = self.loop.time()
                    for call in again:
                        call.last_sent = now
                    self._send(again, everyone=True)

    def _on_reply(self, replica, key, reply):
        call = self.calls.get(key)
        if call is None:
            replies = self.recent.get(key)
            if replies is not None:
                if any(seen != reply for seen in replies.values()):
                    self._divergence(key, replica)
                    replies[replica] = reply
                    self._tell_minority(key, replies)
                else:
                    replies[replica] = reply
            return
        replies = call.replies
        matching = 1
        diverged = False
        for other, seen in replies.items():
            if seen != reply:
                self._divergence(key, replica, other)
                diverged = True
            elif other != replica:  # the same replica again (a retransmission's answer) counts once
                matching += 1
        replies[replica] = reply
        if diverged:
            self._tell_minority(key, replies)
        if matching >= self.reply_quorum:
            self.stats["replies"] += 1
            self.obs.observe_request_latency(self.loop.time() - call.first_sent)
            self.recent[key] = replies  # late replies are compared with these
            if len(self.recent) > 4096:
                self.recent.popitem(last=False)
            self._complete(call, reply)

    def _tell_minority(self, key, replies):
        """Once a majority of the voters gave one reply, every replica that gave another is told:
        its app's state is not the others', and it rebuilds it (smrd.replica.executor)."""
        voters = self.membership["voters"] if self.membership else range(self.n)
        majority = len(voters) // 2 + 1
        counts = {}
        for seen in replies.values():
            counts[seen] = counts.get(seen, 0) + 1
        best, count = max(counts.items(), key=lambda item: item[1])
        if count < majority:
            return
        digest = m.reply_digest(best) + bytes([min(count, 255)])
        for r, seen in replies.items():
            if seen == best or (key[0], key[1], r) in self.notified:
                continue
            self.notified[(key[0], key[1], r)] = True
            if len(self.notified) > 4096:
                self.notified.popitem(last=False)
            log.error("event=divergence_minority client_id=%x seq=%d replica=%d majority=%d (told to "
                      "rebuild its app)", key[0], key[1], r, count)
            self.channels.send(self.replica_socks[r], [m.encode(0, m.Diverged(
                core.pack_batch([(key[0], key[1], digest)])))])

    def _divergence(self, key, replica, other=None):
        self.stats["divergences"] += 1
        log.error("event=divergence client_id=%x seq=%d replica=%s other=%s (replicas returned "
                  "different replies for one request)", key[0], key[1], replica,
                  "first_reply" if other is None else other)

    def _on_error(self, replica, key, status, text):
        call = self.calls.get(key)
        if call is None:
            return
        if status == UNKNOWN_SESSION and key[0] == self.client_id:
            # Our session expired at the replicas (idle longer than session_ttl): the request was
            # not executed. Start a new session and send everything outstanding again under it.
            log.info("client session %x expired at the replicas; starting a new one", key[0])
            pending = list(self.session_calls.values())
            self.session_calls.clear()
            self._new_session()
            for c in pending:
                self.calls.pop(c.key, None)
                c.key = (self.client_id, self.next_seq)
                self.next_seq += 1
                c.replies = {}
                self.calls[c.key] = c
                self.session_calls[c.key[1]] = c
            self._send(pending)
            return
        self.stats["errors"] += 1
        what = "too old (its reply was evicted)" if status == TOO_OLD else text.decode("ascii", "replace")
        self._complete(call, error=ClusterUnavailable(f"replica {replica}: {what}"))

    def _timer(self):
        if self.stopping.is_set():
            return
        now = self.loop.time()
        resend = []
        for call in list(self.calls.values()):
            if now - call.first_sent >= self.deadline_s:
                self.stats["timeouts"] += 1
                self._complete(call, error=ClusterUnavailable(
                    f"no reply from the replicas within {self.deadline_s:g} s"))
            elif now - call.last_sent >= self.retransmit_s:
                call.last_sent = now
                resend.append(call)
        if resend:
            self.stats["retransmits"] += len(resend)
            self._send(resend, everyone=True)
        self.loop.call_later(min(self.retransmit_s, self.deadline_s) / 4, self._timer)

    # ------------------------------------------------------------------ outside clients

    def reply_for(self, request):
        """What a client connection writes for one request: bytes, or what completes with the
        reply (a _Call, or the Task of a request that waits for the window: both future-like)."""
        mode = self.mode
        try:
            key, payload = split_idempotency(mode, request)
        except FramingError as e:
            return error_reply(mode, str(e), status=400)
        call = self.try_submit(payload, key)
        if call is None:  # window full: wait for it in a task (rare)
            return asyncio.ensure_future(self.submit(payload, key))
        return call

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        me = self.config.gateway
        self.channels.start(self.loop, self._on_message, lambda: None)
        try:
            self.server = await self.loop.create_server(lambda: ClientConnection(self), me.host, me.port)
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", me.host, me.port, e.strerror or e)
            self.channels.close()
            return 1
        self.loop.call_soon(self._timer)
        self.fast_probes_until = self.loop.time() + FAST_PROBES_S
        self.loop.call_soon(self._probe)
        if self.config.metrics_port:
            try:
                port = await self.obs.start(me.host, self.config.metrics_port)
            except OSError as e:
                log.error("cannot serve metrics on port %d: %s", self.config.metrics_port, e)
                self.server.close()
                self.channels.close()
                return 1
            log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", port)
        log.info("gateway %d listening on %s:%d (%s framing) for %d replicas; reply quorum %d",
                 self.config.settings.id or 0, me.host, me.port, self.mode, self.n, self.reply_quorum)
        try:
            await self.stopping.wait()
            # Stop intake, then let what is in flight finish (bounded by the request deadline)
            # so a rolling restart of gateways shows clients no errors.
            self.server.close()
            end = self.loop.time() + self.deadline_s
            if self.calls:
                log.info("draining %d requests in flight before stopping", len(self.calls))
            if self.calls:
                self.drained.clear()
                try:
                    await asyncio.wait_for(self.drained.wait(), max(0.0, end - self.loop.time()))
                except asyncio.TimeoutError:
                    log.warning("%d requests still in flight after %.1f s; stopping anyway",
                                len(self.calls), self.deadline_s)
            await asyncio.sleep(0)  # let the connection writers send the last replies
        finally:
            self.server.close()
            for call in list(self.calls.values()):
                self._complete(call, error=ClusterUnavailable("gateway shutting down"))
            self.channels.close()
            await self.obs.stop()
        log.info("gateway stopped")
        return 0

    def _on_signal(self, sig):
        if self.stopping.is_set():
            os._exit(1)
        log.info("received %s: stopping", signal.Signals(sig).name)
        self.stopping.set()


def run(config) -> int:
    return asyncio.run(Gateway(config).run())
