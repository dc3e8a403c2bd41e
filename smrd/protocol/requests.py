"""Client requests waiting for order, and the leader's proposing of them.

Owns: the requests held here (by key, in arrival order, counted per gateway), what is answered
without ordering (a cached reply, TOO_OLD), passing requests a gateway sent here alone on to the
leader, the leader's batching of them into the window (Options.window instances in flight) with a
membership change alone in its instance (M1), the batch timestamps, and handing a leader's
proposed requests back to the queue when it steps down.
Must never: hold more than Options.max_pending requests (max_pending_per_origin from one
gateway), propose anything while a membership change is in flight (M1), or let batch timestamps
go backwards (they drive session expiry on every replica).
"""
from .. import core
from ..core import Batch, BatchBuilder
from . import messages as m
from .membership import SYSTEM_CLIENT, Change
from .sessions import DUPLICATE, SYSTEM, TOO_OLD
from .status import NORMAL


class PendingRequest:
    """A client request waiting for order (or, at the leader, for its instance to decide)."""
    __slots__ = ("payload", "arrived", "forwarded", "origin")

    def __init__(self, payload, arrived, origin):
        self.payload = payload
        self.arrived = arrived
        self.forwarded = False
        self.origin = origin


class RequestQueueMixin:
    """Part of Replica (smrd.protocol.replica): requests waiting for order, and proposing them."""

    def _on_requests(self, origin, msg) -> None:
        sessions = self.sessions
        pending = self.pending
        now = self.now
        # A gateway sent these to us alone, taking us for the leader: pass them on to the leader
        # now rather than after request_ticks (they are held here too, for the request timer).
        relay = (type(msg) is m.Requests and msg.directed and self.status == NORMAL
                 and self.leader != self.id and self.leader in self._peers)
        held = 0
        limit = self.opt.max_pending
        per_origin = self.opt.max_pending_per_origin
        by_origin = self.pending_by_origin
        replies = self._ready.replies
        for client_id, seq, payload in Batch(msg.batch):
            key = (client_id, seq)
            if key in pending or key in self.proposed:
                continue
            if client_id == SYSTEM_CLIENT and not self.is_leader:
                # Membership changes go straight to the leader and are not held here: the leader
                # may refuse one for good, and a held copy would make us suspect it for that.
                # (Only from a gateway: a forwarded one is not passed on, so none can circle.)
                if (origin is not None and self.status == NORMAL and self.leader != self.id
                        and self.leader in self._peers):
                    self._send(self.leader, m.Forward(core.pack_batch([(client_id, seq, payload)])))
                continue
            status = sessions.classify(client_id, seq)
            if status == DUPLICATE:
                reply = sessions.reply(client_id, seq)
                if reply is not None and origin is not None:
                    replies.append((origin, client_id, seq, DUPLICATE, reply))
                continue  # a None reply means it is executing: the answer follows execution
            if status == TOO_OLD:
                if origin is not None:
                    replies.append((origin, client_id, seq, TOO_OLD, b""))
                continue
            # UNKNOWN_SESSION is only final at execution, where every replica agrees on it.
            if len(pending) >= limit or (origin is not None and by_origin.get(origin, 0) >= per_origin):
                # Memory stays bounded whatever the gateways send; nothing was acknowledged, and
                # the gateway retransmits.
                self.stats["requests_dropped"] += 1
                continue
            req = pending[key] = PendingRequest(payload, now, origin)
            self.queue.append(key)
            if origin is not None:
                by_origin[origin] = by_origin.get(origin, 0) + 1
            if relay:
                req.forwarded = True
                held += 1
        if held:
            # The whole batch, as it came: the leader drops what it holds already or has ordered.
            self.stats["requests_relayed"] += held
            self._send(self.leader, m.Forward(msg.batch))
        if self.is_leader:
            self._propose()

    def _on_forward(self, sender, msg) -> None:
        self._on_requests(None, msg)  # no gateway to answer: the follower answers its own

    def _propose(self) -> None:
        """Leader: fill free slots of the window with batches of pending requests."""
        opt = self.opt
        while self.pending and self.next_instance <= self.commit + opt.window:
            if self.pending_changes:
                return  # M1: a membership change is in flight; nothing follows it until applied
            builder = BatchBuilder(opt.batch_max_requests, opt.batch_max_bytes)
            queue, pending, proposed = self.queue, self.pending, self.proposed
            while queue:
                key = queue[0]
                req = pending.get(key)
                if req is None:
                    queue.popleft()
                    continue
                if key[0] == SYSTEM_CLIENT:
                    if builder.count:
                        break  # a change goes alone in its instance
                    if not self._propose_change(key, req):
                        return  # waiting for the instances in flight to be decided (M1)
                    break
                if not builder.add(key[0], key[1], req.payload):
                    break
                queue.popleft()
                del pending[key]
                proposed[key] = req
            if builder.count == 0:
                if self.pending_changes or not (queue and queue[0] in pending):
                    break
                continue  # a refused change left the queue; go on with what follows it
            self._propose_value(builder.build(timestamp=self._stamp()))

    def _propose_change(self, key, req) -> bool:
        """Leader, with a change at the head of the queue: propose it, refuse it, or hand
        leadership off (the change removes this leader). False: wait for the log to drain."""
        if self.next_instance != self.commit + 1 or self.applied != self.commit:
            return False
        why = self._precheck_change(req.payload)
        change = Change.decode(req.payload)
        # A change that removes this leader is ordered here like any other: once it applies,
        # every replica moves to the next view at the same instance (_roles_changed). Handing
        # leadership off first instead would livelock when every voter holds a change removing
        # itself (concurrent operators): each new leader would hand off again.
        self.queue.popleft()
        del self.pending[key]
        if why:
            self._release_origin(req)
            self.stats["membership_refused"] = self.stats.get("membership_refused", 0) + 1
            if req.origin is not None:
                self._ready.replies.append((req.origin, key[0], key[1], SYSTEM, f"REFUSED {why}".encode()))
            return True
        new, _ = self.sessions.membership.check(change, self.n)
        value = core.pack_batch([(key[0], key[1], req.payload)], timestamp=self._stamp())
        self.proposed[key] = req
        self.pending_changes.append((self.next_instance, new))
        self._propose_value(value)
        return True

    def _release_origin(self, req) -> None:
        if req.origin is not None:
            left = self.pending_by_origin.get(req.origin, 1) - 1
            if left > 0:
                self.pending_by_origin[req.origin] = left
            else:
                self.pending_by_origin.pop(req.origin, None)

    def _stamp(self) -> int:
        # Batch timestamps drive session expiry on every replica; they must never go backwards.
        if self.clock_ms > self.last_stamp:
            self.last_stamp = self.clock_ms
        return self.last_stamp

    def _propose_value(self, value: bytes) -> None:
        i = self.next_instance
        self.next_instance = i + 1
        self._accept(i, self.view, value)
        self.sent_at[i] = self.now
        msg = m.Propose(self.view, i, value, self.commit)
        self._broadcast(msg)
        self._vote(i, self.id)

    def _step_down(self) -> None:
        """A leader leaving its view: requests in undecided instances wait for order again."""
        for key, req in self.proposed.items():
            req.arrived = self.now
            self.pending[key] = req
            self.queue.append(key)
        self.proposed = {}
        self.sent_at = {}
        self.pending_changes = []

    def _reset_request_timers(self) -> None:
        # A new view gets the full request timeout before anyone suspects its leader.
        now = self.now
        for req in self.pending.values():
            req.arrived = now
            req.forwarded = False
