# ZeroMQ channels between smrd processes, driven from an asyncio loop.
#
# Owns: sockets, identities, high-water marks, reconnection and lazy name resolution (libzmq
# resolves a peer's DNS name when it connects and again on every reconnect, so a peer that is not
# up or not yet in DNS never crashes anyone), and the readiness plumbing that lets one asyncio loop
# drain many sockets without an await per message.
# Never: knows what a message means (frames are opaque bytes here) or blocks the loop: a send
# that would block is dropped and counted, and the protocol's retransmissions recover it.
#
# Shape (zguide): every replica binds a ROUTER for its peers and one for gateways; senders use a
# DEALER per destination with an explicit identity, so a receiver knows who sent each message.
# A multipart message is one hop's batch: each part is one smrd frame.
import logging
import os

import zmq

log = logging.getLogger(__name__)

PEER_PREFIX = b"r"
GATEWAY_PREFIX = b"g"


def replica_identity(replica_id: int) -> bytes:
    return PEER_PREFIX + str(replica_id).encode()


def gateway_identity(gateway_id: int) -> bytes:
    # The random suffix keeps two incarnations of one gateway apart: replies for the old one
    # must not reach the new one, which uses a different client id anyway.
    return GATEWAY_PREFIX + str(gateway_id).encode() + b"-" + os.urandom(4).hex().encode()


def parse_replica_identity(identity: bytes):
    """The replica id an identity claims, or None if it is not a replica identity."""
    if identity[:1] != PEER_PREFIX or not identity[1:].isdigit() or len(identity) > 6:
        return None
    return int(identity[1:])


class Channels:
    """The sockets of one process and a single readiness callback for all of them."""

    def __init__(self, hwm: int = 10_000):
        self.ctx = zmq.Context.instance()
        self.hwm = hwm
        self.sockets = []
        self.dropped = 0
        self.sent = 0
        self._loop = None
        self._on_message = None
        self._on_idle = None
        self._draining = False

    def _socket(self, kind, identity=None):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, self.hwm)
        s.setsockopt(zmq.RCVHWM, self.hwm)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)     # detects dead TCP peers, then reconnects
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        if kind == zmq.ROUTER:
            s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its identity at once
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        self.sockets.append(s)
        return s

    def bind_router(self, endpoint: str):
        s = self._socket(zmq.ROUTER)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            raise OSError(f"cannot listen on {endpoint}: {e.strerror}") from None
        return s

    def connect_dealer(self, endpoint: str, identity: bytes):
        s = self._socket(zmq.DEALER, identity)
        s.connect(endpoint)
        return s

    def send(self, sock, parts) -> bool:
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
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
                while handled < budget and s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    try:
                        parts = s.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    handled += 1
                    more = True
                    self._on_message(s, parts)
        if handled:
            self._on_idle()
        if handled >= budget:
            self._kick()  # let timers and other callbacks run, then continue
        return handled

    def close(self) -> None:
        if self._loop is not None:
            for s in self.sockets:
                if not s.closed:
                    try:
                        self._loop.remove_reader(s.getsockopt(zmq.FD))
                    except (ValueError, zmq.ZMQError):
                        pass
        for s in self.sockets:
            s.close(0)
        self.sockets = []

