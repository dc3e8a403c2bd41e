"""`smrd --role client`: the gateway that outside clients reach, as an asyncio process.

Owns: the client-facing TCP server (in the app's framing mode), the ZeroMQ sockets to the
replicas, encoding what the call book (smrd.gateway.calls) says to send into frames (one batch per
hop, split at batch_max_bytes), the timers (flush, retransmission, status probes), readiness and
metrics. What a call is, where it goes and what a reply means is the call book's.
Never: keeps state that matters after a crash (kill it any time: outside clients retry, and the
replicas' reply cache answers retries that carry an idempotency key), or answers a request with
anything but a replica's reply or an explicit smrd error.
"""
import asyncio
import json
import logging
import os
import signal

from .. import core
from ..errors import ProtocolError
from ..framing import FramingError, error_reply, split_idempotency
from ..framing.volatile import comparable_reply, header_names
from ..net.transport import Channels, gateway_identity
from ..ops import trace
from ..ops.observability import Observability
from ..protocol import messages as m
from .calls import IDEMPOTENT_BIT, REACHABLE_S, CallBook, Notice
from .client_connection import ClientConnection, serve_close

log = logging.getLogger(__name__)

# How often the gateway asks the members for their status (reachability, and the membership).
PROBE_S = 1.0
# For FAST_PROBES_S after start-up and after losing the leader, while none is known, ask every
# PROBE_NO_LEADER_S: until a status answer names one, every new request goes to every replica
# (each follower holds and answers it too). Not for longer: a DEALER queues what it sends to a
# replica that is down, and that replica would answer the whole queue when it comes back.
PROBE_NO_LEADER_S = 0.1
FAST_PROBES_S = 3.0


def new_client_id() -> int:
    # 63 random bits: two gateways (or incarnations) never share a session by accident.
    return int.from_bytes(os.urandom(8), "little") & (IDEMPOTENT_BIT - 1) or 1


class Gateway:
    def __init__(self, config):
        s = config.settings
        self.config = config
        self.settings = s
        self.mode = s.framing
        self.n = config.hosts.n
        self.channels = Channels(hwm=s.hwm, security=config.security)
        self.identity = gateway_identity(config.settings.id or 0)
        self.replica_socks = {}
        self.sock_replica = {}
        for r, addr in config.hosts.replicas.items():
            sock = self.channels.connect_dealer(addr.client_endpoint, self.identity, replica=r)
            self.replica_socks[r] = sock
            self.sock_replica[sock] = r
            self.channels.watch_disconnect(sock, lambda r=r: self._connection_lost(r))
        self.book = CallBook(
            tuple(self.replica_socks), k=s.reply_cache_size, max_inflight=s.max_inflight_per_gateway,
            reply_quorum=s.reply_quorum, retransmit_s=s.gateway_retransmit_ms / 1000,
            deadline_s=s.gateway_request_deadline_ms / 1000, check_every=s.divergence_check_every,
            new_client_id=new_client_id,
            comparable=comparable_reply(s.framing, header_names(s.volatile_reply_headers)))
        self.window_open = asyncio.Event()
        self.drained = asyncio.Event()  # set whenever no request is in flight
        book = self.book
        book.on_window_open = self.window_open.set
        book.on_drained = self.drained.set
        book.on_leader_lost = self._leader_lost
        self._flush_scheduled = False
        self.stats = book.stats  # the call book's counts, and the connection-side ones below
        self.stats.update(connections=0, bad_messages=0)
        self.server = None
        self.stopping = asyncio.Event()
        self.fast_probes_until = 0.0  # set when the loop starts; see FAST_PROBES_S
        self.probe_timer = None
        self.obs = Observability("client", config.settings.id or 0, self._snapshot, self.ready)
        book.on_replied = self.obs.observe_request_latency

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

    def try_submit(self, payload: bytes, idempotency_key: str = None):
        """The request's Call (future-like: see smrd.gateway.calls.Call), or None while the
        window is full (no task, no coroutine: this is the per-request path)."""
        call = self.book.submit(payload, self.loop.time(), idempotency_key)
        if call is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return call

    def _flush(self):
        self._flush_scheduled = False
        self.book.flush()
        self._send_out()

    def _send_out(self):
        """Whatever the call book has to send, as frames on the replicas' sockets."""
        socks = self.replica_socks
        for out in self.book.take():
            if type(out) is Notice:
                self.channels.send(socks[out.to], [m.encode(0, m.Diverged(core.pack_batch(out.entries)))])
                continue
            limit = self.settings.batch_max_bytes
            frames = []
            entries, size = [], 0
            for call in out.calls:
                if entries and size + len(call.payload) > limit:
                    frames.append(m.encode(0, m.Requests(core.pack_batch(entries), out.directed)))
                    entries, size = [], 0
                entries.append((call.key[0], call.key[1], call.payload))
                size += len(call.payload) + core.ENTRY_HEADER_SIZE
            frames.append(m.encode(0, m.Requests(core.pack_batch(entries), out.directed)))
            if trace.ON:
                for call in out.calls:
                    trace.stamp("gw_send", call.key)
            for r in out.to:
                self.channels.send(socks[r], frames)

    def _connection_lost(self, replica):
        if self.stopping.is_set():
            return
        self.book.connection_lost(replica, self.loop.time())
        self._send_out()

    # ------------------------------------------------------------------ replies

    def _snapshot(self) -> dict:
        book = self.book
        return dict(self.stats, inflight=len(book.calls), n=self.n,
                    replicas_reachable=book.reachable(self.loop.time()),
                    replicas_not_executing=len(book.not_executing))

    def ready(self):
        """Ready while listening, a quorum of the voters (of every replica in hosts.conf while
        the membership is not known) answered within the last 3 s, and one of them can execute."""
        if self.stopping.is_set() or self.server is None:
            return False, "not listening"
        book, now = self.book, self.loop.time()
        if book.membership is not None:
            voters = book.membership["voters"]
            reachable, quorum = book.reachable(now, voters), len(voters) // 2 + 1
            if reachable < quorum:
                return False, f"{reachable} of {len(voters)} voters reachable, need {quorum}"
        else:
            voters = None
            reachable, quorum = book.reachable(now), self.n // 2 + 1
            if reachable < quorum:
                return False, f"{reachable} of {self.n} replicas reachable, need {quorum}"
        if not any(now - t <= REACHABLE_S and r not in book.not_executing
                   and (voters is None or r in voters) for r, t in book.heard_from.items()):
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
        fast = self.book.leader is None and self.loop.time() < self.fast_probes_until
        self.probe_timer = self.loop.call_later(PROBE_NO_LEADER_S if fast else PROBE_S, self._probe)

    def _leader_lost(self):
        """No leader known any more: probe at once, then often for a while (FAST_PROBES_S)."""
        self.fast_probes_until = self.loop.time() + FAST_PROBES_S
        if self.probe_timer is not None:
            self.probe_timer.cancel()
        self.probe_timer = self.loop.call_soon(self._probe)

    def _probe_once(self):
        book = self.book
        book.retarget(self.loop.time())
        frame = [core.encode_frame(m.STATUS_REQUEST, 0, 0, 0)]
        for r in book.targets:
            self.channels.send(self.replica_socks[r], frame)

    def _on_status(self, replica, frame):
        try:
            _, _, _, _, _, payload = core.decode_frame(frame)
            status = json.loads(bytes(payload))
        except (ProtocolError, ValueError):
            return  # garbage: ignore
        if isinstance(status, dict):
            self.book.on_status(replica, status, self.loop.time())

    def _on_message(self, sock, parts):
        replica = self.sock_replica.get(sock)
        book, now = self.book, self.loop.time()
        book.heard(replica, now)
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
                    if trace.ON:
                        trace.stamp("gw_reply", (client_id, seq), replica)
                    book.on_reply(replica, (client_id, seq), bytes(reply), now)
            elif isinstance(msg, m.ReplyErrors):
                for client_id, seq, data in core.Batch(msg.batch):
                    book.on_error(replica, (client_id, seq), data[0] if len(data) else 0,
                                  bytes(data[1:]), now)
        if book.outbox:
            self._send_out()

    def _timer(self):
        if self.stopping.is_set():
            return
        book = self.book
        book.tick(self.loop.time())
        self._send_out()
        self.loop.call_later(min(book.retransmit_s, book.deadline_s) / 4, self._timer)

    # ------------------------------------------------------------------ outside clients

    def reply_for(self, request):
        """What a client connection writes for one request: bytes, or what completes with the
        reply (a Call, or the Task of a request that waits for the window: both future-like)."""
        mode = self.mode
        try:
            key, payload = split_idempotency(mode, request)
        except FramingError as e:
            return error_reply(mode, str(e), status=400)
        call = self.try_submit(payload, key)
        if call is None:  # window full: wait for it in a task (rare)
            return asyncio.ensure_future(self.submit(payload, key))
        if trace.ON:
            trace.stamp("gw_read", call.key)
        return call

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        trace.start(f"gateway-{self.config.settings.id or 0}")
        me = self.config.gateway
        self.channels.start(self.loop, self._on_message, lambda: None)
        try:
            if self.mode == "close":  # one connection per request: plain sockets, see there
                self.server = await serve_close(self, me.host, me.port)
            else:
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
                 self.config.settings.id or 0, me.host, me.port, self.mode, self.n, self.book.reply_quorum)
        try:
            await self.stopping.wait()
            # Stop intake, then let what is in flight finish (bounded by the request deadline)
            # so a rolling restart of gateways shows clients no errors.
            self.server.close()
            end = self.loop.time() + self.book.deadline_s
            calls = self.book.calls
            if calls:
                log.info("draining %d requests in flight before stopping", len(calls))
                self.drained.clear()
                try:
                    await asyncio.wait_for(self.drained.wait(), max(0.0, end - self.loop.time()))
                except asyncio.TimeoutError:
                    log.warning("%d requests still in flight after %.1f s; stopping anyway",
                                len(calls), self.book.deadline_s)
            await asyncio.sleep(0)  # let the connection writers send the last replies
        finally:
            self.server.close()
            self.book.fail_all("gateway shutting down")
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
