"""ZeroMQ channels between smrd processes, driven from an asyncio loop.

Owns: sockets, identities, high-water marks, reconnection and lazy name resolution (libzmq
resolves a peer's DNS name when it connects and again on every reconnect, so a peer that is not
up or not yet in DNS never crashes anyone), and the readiness plumbing that lets one asyncio loop
drain many sockets without an await per message.
Never: knows what a message means (frames are opaque bytes here) or blocks the loop: a send
that would block is dropped and counted, and the protocol's retransmissions recover it.

Shape (zguide): every replica binds a ROUTER for its peers and one for gateways; senders use a
DEALER per destination with an explicit identity, so a receiver knows who sent each message.
A multipart message is one hop's batch: each part is one smrd frame.

CURVE (optional, smrd/net/security.py holds the keys): every bound ROUTER is then a CURVE server and
every DEALER a CURVE client that knows its replica's public key; a ZAP handler on the asyncio loop
checks each connecting key against the allow-list, and a socket monitor reports handshakes that
are not CURVE at all. All of it is settled when a connection is made: sending and receiving are
the same code, and a process without CURVE runs exactly what it ran before.
"""
import logging
import os

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..errors import ListenError
from .security import CLIENT_DOMAIN, PEER_DOMAIN, KeyFileError, replica_key_name, zap_answer

log = logging.getLogger(__name__)

# RFC 27 fixes the ZAP handler's address; it is per context, hence a context per secured Channels.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# How often a secured process re-reads its allow-list directory (rotation without restarts).
KEY_RELOAD_S = 2.0
# Distinct refusals logged at WARNING before only the counter and every 1000th refusal speak.
REFUSALS_LOGGED = 1000
_HANDSHAKE_FAILURES = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not use CURVE",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its CURVE handshake failed (it expects another server key)",
}

# Plain ints: pyzmq's option and flag constants are enums, and `events & zmq.POLLIN` builds an
# enum member on every call (a few µs each, several times per message on the hot path).
# (Socket.get still looks its option up in an enum; docs/benchmarks.md says what that costs.)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK

PEER_PREFIX = b"r"
GATEWAY_PREFIX = b"g"


def replica_identity(replica_id: int) -> bytes:
    # r<id>-<random>: every incarnation of a replica connects under a routing id of its own. A
    # replica that died without its peers seeing the connection close (killed inside a partition,
    # a host that lost power) is still connected as far as they know, until their heartbeat
    # times out; a router refuses a second connection with an identity in use, and libzmq never
    # lets that connection through, even once the old one is gone (seen in the pod lab: a
    # replica restarted inside a partition was never heard again). With its own routing id the
    # new incarnation is heard at once; the old connection dies by heartbeat.
    return PEER_PREFIX + str(replica_id).encode() + b"-" + os.urandom(4).hex().encode()


def gateway_identity(gateway_id: int) -> bytes:
    # The random suffix keeps two incarnations of one gateway apart: replies for the old one
    # must not reach the new one, which uses a different client id anyway.
    return GATEWAY_PREFIX + str(gateway_id).encode() + b"-" + os.urandom(4).hex().encode()


def parse_replica_identity(identity: bytes):
    """The replica id an identity claims (r<id>-<8 hex digits>, or r<id> from an smrd before
    incarnation suffixes), or None if it is not a replica identity."""
    head, dash, suffix = identity.partition(b"-")
    if head[:1] != PEER_PREFIX or not head[1:].isdigit() or len(head) > 6:
        return None
    if dash and (len(suffix) != 8 or suffix.strip(b"0123456789abcdef")):
        return None
    return int(head[1:])


class Channels:
    """The sockets of one process and a single readiness callback for all of them."""

    def __init__(self, hwm: int = 10_000, security=None):
        self.security = security  # smrd.net.security.Security, or None: no CURVE
        # A secured Channels owns its context: the ZAP endpoint is one per context, so in a shared
        # one a second Channels could not bind it, or another handler would judge our clients.
        self.ctx = zmq.Context() if security is not None else zmq.Context.instance()
        self.hwm = hwm
        self.sockets = []
        self.dropped = 0
        self.sent = 0
        self.received = 0
        self.refused = 0  # incoming handshakes refused: key not allowed, or not CURVE at all
        self._loop = None
        self._on_message = None
        self._on_idle = None
        self._draining = False
        self._zap = None
        self._monitors = {}  # monitor socket -> endpoint of the ROUTER it watches
        self._watches = {}   # monitor socket -> callback when its DEALER's connection drops
        self._dealers = []  # [socket, endpoint, replica id, server key] of secured DEALERs
        self._refusals_seen = set()
        self._reload_timer = None

    def _socket(self, kind, identity=None):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, self.hwm)
        s.setsockopt(zmq.RCVHWM, self.hwm)
        # The first retries come soon: processes of a cluster start together, and a peer that
        # was not listening yet at the first attempt is found 10-30 ms after it is, not after
        # 50-150 ms (an empty replica's recovery waits for its peers). Backs off to the max.
        s.setsockopt(zmq.RECONNECT_IVL, 10)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 250)  # a restarted peer is found within 250 ms
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)     # detects dead TCP peers, then reconnects
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if kind == zmq.ROUTER:
            # No ROUTER_HANDOVER: with it, any connection that merely claims a connected peer's
            # routing id takes it over, and the real peer's messages are then dropped in silence
            # until the heartbeat times out (~4 s; a forged frame on a peer port moved the view
            # that way in CI). Without it a duplicate is refused for good, which is why every
            # incarnation of a replica or gateway has a routing id of its own (replica_identity).
            s.setsockopt(zmq.ROUTER_HANDOVER, 0)
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        self.sockets.append(s)
        return s

    def bind_router(self, endpoint: str, *, replicas_only: bool = False):
        """A bound ROUTER; with CURVE, replicas_only admits only replica-* keys (a peer port)."""
        s = self._socket(zmq.ROUTER)
        if self.security is not None:
            self._secure_router(s, endpoint, replicas_only)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            raise ListenError(f"cannot listen on {endpoint}: {e.strerror} (another process holds "
                              f"the port, or the address is not this host's; see hosts.conf)") from None
        return s

    def connect_dealer(self, endpoint: str, identity: bytes, *, replica: int | None = None):
        """A DEALER towards replica `replica` (its id picks the public key to expect, with CURVE)."""
        s = self._socket(zmq.DEALER, identity)
        if self.security is not None:
            if replica is None:
                raise ValueError("a CURVE client needs the id of the replica it connects to")
            self._dealers.append([s, endpoint, replica, self.security.configure_client(s, replica)])
        s.connect(endpoint)
        return s

    def watch_disconnect(self, sock, on_disconnect) -> None:
        """Call on_disconnect() each time `sock` loses its connection: the peer's process died or
        closed it. A hint only (a connection can also drop and come back): callers must treat it
        as a reason to look closer, never as proof that the peer is gone."""
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._watches[mon] = on_disconnect
        if self._loop is not None:
            self._loop.add_reader(mon.getsockopt(zmq.FD), self._serve_watch, mon)

    def _serve_watch(self, mon) -> None:
        while not mon.closed and mon.get(_EVENTS) & _POLLIN:
            try:
                parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            self._watches[mon]()

    # ------------------------------------------------------------------ CURVE (connections only)

    def _secure_router(self, s, endpoint: str, replicas_only: bool) -> None:
        if self._zap is None:
            # Bound before the first CURVE server: with no ZAP handler, libzmq admits every client
            # that knows our public key, allow-list or not.
            self._zap = self.ctx.socket(zmq.ROUTER)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(ZAP_ENDPOINT)
        self.security.configure_server(s, PEER_DOMAIN if replicas_only else CLIENT_DOMAIN)
        # ZAP never hears of a client that fails the handshake before it (no CURVE, wrong server
        # key); the monitor does. Such a client often hangs up first, once it sees our greeting
        # ask for CURVE: that is a "no detail" failure, so both kinds count.
        mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._monitors[mon] = endpoint

    def _serve_zap(self) -> None:
        zap = self._zap
        # Edge-triggered FD (see _kick): read until EVENTS says empty, after our own sends too.
        while not zap.closed and zap.get(_EVENTS) & _POLLIN:
            try:
                frames = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            reply, refusal = zap_answer(self.security, frames)
            if reply is not None:
                zap.send_multipart(reply, zmq.NOBLOCK)
            if refusal is not None:
                if refusal.name is not None:
                    why = f"key {refusal.key} ({refusal.name}.pub) is not a replica's, and this is a peer port"
                else:
                    why = f"public key {refusal.key} is not in the allow-list {self.security.directory}"
                port = "peer" if refusal.domain.endswith(b"peer") else "client"
                self._refuse((refusal.key, port), f"refused a connection from {refusal.address} on the "
                             f"{port} port: {why}")

    def _serve_monitor(self, mon) -> None:
        while not mon.closed and mon.get(_EVENTS) & _POLLIN:
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            endpoint = self._monitors.get(mon, "?")
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                kind, why = "hung up", ("it hung up during the handshake (a client without CURVE or "
                                        "without our public key, or a bare TCP probe)")
            else:
                kind = event["value"]
                why = _HANDSHAKE_FAILURES.get(kind, f"its handshake failed (protocol error {kind:#x})")
            self._refuse((endpoint, kind), f"refused a connection on {endpoint}: {why}")

    def _refuse(self, key, message: str) -> None:
        self.refused += 1
        # Once per distinct client and reason: a refused client reconnects forever.
        if key not in self._refusals_seen and len(self._refusals_seen) < REFUSALS_LOGGED:
            self._refusals_seen.add(key)
            log.warning("%s (refused so far: %d)", message, self.refused)
        elif self.refused % 1000 == 0:
            log.warning("%s (refused so far: %d; repeats are not logged)", message, self.refused)
        else:
            log.debug("%s (refused so far: %d)", message, self.refused)

    def _reload_keys(self) -> None:
        self._reload_timer = self._loop.call_later(KEY_RELOAD_S, self._reload_keys)
        try:
            change = self.security.reload()
        except KeyFileError as e:
            log.warning("allow-list not re-read: %s; the previous one stays in force", e)
            return
        if change is None:
            return
        added, removed, changed = change
        log.info("allow-list %s re-read: %d keys (added: %s; removed: %s; changed: %s); connections "
                 "already made keep their authentication", self.security.directory, len(self.security.allowed),
                 ", ".join(added) or "-", ", ".join(removed) or "-", ", ".join(changed) or "-")
        for entry in self._dealers:
            sock, endpoint, replica, used = entry
            key = self.security.allowed.get(replica_key_name(replica))
            if sock.closed or key is None or key == used:
                continue
            # Replica `replica` has a new key pair: reconnect expecting it. Messages queued on the
            # old connection are lost; the protocol's retransmissions cover that, as for any reconnect.
            sock.disconnect(endpoint)
            sock.setsockopt(zmq.CURVE_SERVERKEY, key)
            sock.connect(endpoint)
            entry[3] = key
            log.info("replica %d's public key changed; reconnecting to %s with the new one", replica, endpoint)

    def send(self, sock, parts) -> bool:
        try:
            # send_multipart, without its per-part flag arithmetic (2-3x its cost here). A part
            # after the first never fails with EAGAIN: ZeroMQ admits or refuses a message whole.
            send = sock.send
            for part in parts[:-1]:
                send(part, _MORE_NOBLOCK)
            send(parts[-1], _NOBLOCK)
            self.sent += 1
            return True
        except zmq.Again:
            self.dropped += 1  # at the high-water mark: back-pressure, never unbounded memory
            return False
        finally:
            self._kick()

    def start(self, loop, on_message, on_idle) -> None:
        """on_message(sock, parts) for every message; on_idle() once after each burst of them."""
        self._loop = loop
        self._on_message = on_message
        self._on_idle = on_idle
        for s in self.sockets:
            loop.add_reader(s.getsockopt(zmq.FD), self.drain)
        for mon in self._watches:
            loop.add_reader(mon.getsockopt(zmq.FD), self._serve_watch, mon)
            self._serve_watch(mon)
        if self.security is not None:
            if self._zap is not None:
                loop.add_reader(self._zap.getsockopt(zmq.FD), self._serve_zap)
                self._serve_zap()  # handshakes that began before the loop was ours
            for mon in self._monitors:
                loop.add_reader(mon.getsockopt(zmq.FD), self._serve_monitor, mon)
                self._serve_monitor(mon)
            self._reload_timer = loop.call_later(KEY_RELOAD_S, self._reload_keys)
        self._kick()

    def _kick(self):
        # ZeroMQ's FD is edge-triggered and may not fire for messages that arrived while we were
        # sending; re-check on the next loop turn.
        if self._loop is not None and not self._draining:
            self._draining = True
            self._loop.call_soon(self.drain)

    def drain(self, budget: int = 4096) -> int:
        """Receive everything ready on every socket (up to budget messages); returns the count."""
        self._draining = False
        handled = 0
        more = True
        while more and handled < budget:
            more = False
            for s in self.sockets:
                if s.closed:
                    continue
                get, recv = s.get, s.recv
                while handled < budget and get(_EVENTS) & _POLLIN:
                    try:
                        parts = [recv(_NOBLOCK)]  # recv_multipart, without flag arithmetic
                    except zmq.Again:
                        break
                    while get(_RCVMORE):
                        parts.append(recv(_NOBLOCK))
                    handled += 1
                    more = True
                    self._on_message(s, parts)
        if handled:
            self.received += handled
            self._on_idle()
        if handled >= budget:
            self._kick()  # let timers and other callbacks run, then continue
        return handled

    def close(self) -> None:
        extra = ([self._zap] if self._zap is not None else []) + list(self._monitors) + list(self._watches)
        if self._reload_timer is not None:
            self._reload_timer.cancel()
            self._reload_timer = None
        if self._loop is not None:
            for s in self.sockets + extra:
                if not s.closed:
                    try:
                        self._loop.remove_reader(s.getsockopt(zmq.FD))
                    except (ValueError, zmq.ZMQError):
                        pass
        for s in extra + self.sockets:
            s.close(0)
        self.sockets = []
        self._monitors = {}
        self._watches = {}
        self._dealers = []
        self._zap = None
        if self.security is not None:
            self.ctx.destroy(linger=0)  # ours alone (see __init__); the shared instance stays

