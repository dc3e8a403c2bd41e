"""A gateway's calls to the replicas, sans-IO: no sockets, no clock, no event loop. Time comes in
as `now` (seconds, or the simulator's ticks); what must be sent comes out of `take()`.

Owns: the session (client id, seqs) and its window, the calls in flight and their completion,
where requests go (the members of the replica group; a leader that can execute alone, with
reply_quorum 1; everyone for retransmissions, divergence checks and while no leader is known),
what replies, errors and status answers mean (reply quorum, divergence and telling the minority,
an expired session, a replica that cannot execute), retransmission and deadlines. The asyncio
gateway (smrd.gateway.driver) drives it, and so do the simulator's clients
(smrd.simulation.cluster): one implementation of a gateway's obligations, checked by both.
Never: encodes frames or touches a socket, reads a clock, or completes a call with anything but
a replica's reply or an explicit error.
"""
import asyncio
import hashlib
import logging
from collections import OrderedDict
from typing import NamedTuple

from ..framing.volatile import same_reply
from ..protocol.messages import reply_digest
from ..protocol.sessions import NOT_EXECUTING, TOO_OLD, UNKNOWN_SESSION

log = logging.getLogger(__name__)

IDEMPOTENT_BIT = 1 << 63
# A replica counts as reachable (and a known membership as current) this long after it answered.
REACHABLE_S = 3.0


def idempotent_client_id(key: str) -> int:
    """A retry through any gateway maps to the same (client_id, seq=1) at the replicas."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return IDEMPOTENT_BIT | (int.from_bytes(digest, "little") & (IDEMPOTENT_BIT - 1))


class ClusterUnavailable(Exception):
    """No reply from the replicas within the deadline (or a definitive error from them)."""


class Send(NamedTuple):
    """Send `calls` (as one or more REQUESTS batches) to each of `to`; `directed`: to the leader
    alone, which passes requests on if it does not lead."""
    to: tuple
    directed: bool
    calls: list


class Notice(NamedTuple):
    """Tell replica `to` that its replies disagree with a majority's: DIVERGED entries
    (client_id, seq, reply digest + the majority's size)."""
    to: int
    entries: list


class Call:
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


def _nothing(*_):
    pass


class CallBook:
    """The calls of one gateway. `replicas`: the replica ids of hosts.conf. `new_client_id()`
    gives a session's client id (63 random bits in the gateway; a fixed sequence in the
    simulator). Hooks the driver may set: on_leader_lost() (probe at once), on_window_open(),
    on_drained() (nothing in flight), on_replied(seconds) (latency)."""

    def __init__(self, replicas, *, k, max_inflight, reply_quorum, retransmit_s, deadline_s,
                 check_every, new_client_id, comparable=None):
        self.replicas = tuple(replicas)
        # The part of a reply replicas must agree on (smrd.framing.volatile); None: every byte.
        self.comparable = comparable
        self.k = k
        self.max_inflight = min(max_inflight, k)
        self.reply_quorum = reply_quorum
        self.retransmit_s = retransmit_s
        self.deadline_s = deadline_s
        self.check_every = check_every
        self.directed_batches = 0
        self._new_client_id = new_client_id
        self.on_leader_lost = self.on_window_open = self.on_drained = self.on_replied = _nothing
        self._new_session()
        self.calls = {}                     # (client_id, seq) -> Call
        self.session_calls = OrderedDict()  # seq -> Call of the current session, oldest first
        self.pending = []                   # submitted, not yet sent (flush sends them)
        self.outbox = []                    # Send and Notice, for take()
        self.recent = OrderedDict()         # (client_id, seq) -> {replica: reply}, late replies
        self.notified = OrderedDict()       # (client_id, seq, replica) told it diverged
        self.stats = {"requests": 0, "replies": 0, "retransmits": 0, "timeouts": 0,
                      "divergences": 0, "errors": 0}
        self.heard_from = {}                # replica id -> `now` of its last message
        # The replica group as the replicas report it (smrd.protocol.membership): requests go to
        # its members only, so that candidates of hosts.conf that are not running (a 7-line
        # hosts.conf with 3 replicas up) cost nothing. None: not known yet, send to every replica.
        self.membership = None              # {"index", "voters", "learners"} with the highest index
        self.targets = self.replicas        # replica ids requests go to
        # The replica the members' status answers name as leader (of the highest view heard of,
        # status normal), or None. With reply_quorum 1, new requests go to it alone: the
        # followers learn them from its proposals and neither receive nor answer them, which
        # saves every process CPU on each request. Retransmissions, and everything in flight
        # when its connection drops, go to every target, as all requests do while it is None.
        self.leader = None
        self.leader_view = -1
        self.disconnected = set()   # replicas whose connection dropped and who were not heard since
        # Replicas that said they cannot execute now (halted, rebuilding their app, app down):
        # they still order, but they would not answer. New requests then go to every target, not
        # to such a leader alone. Learned from a NOT_EXECUTING answer (at once) or a status
        # answer; forgotten when a status answer says it executes again.
        self.not_executing = set()

    def _new_session(self):
        self.client_id = self._new_client_id()
        self.next_seq = 1

    # ------------------------------------------------------------------ submitting

    def window_open(self) -> bool:
        oldest = next(iter(self.session_calls), self.next_seq)
        return self.next_seq < oldest + self.k and len(self.session_calls) < self.max_inflight

    def submit(self, payload: bytes, now, idempotency_key: str = None):
        """The request's Call, or None while the window is full: the replicas keep k replies per
        client, so issuing further ahead could evict the reply of a request still outstanding.
        The call is sent at the next flush()."""
        if idempotency_key is not None:
            key = (idempotent_client_id(idempotency_key), 1)
            call = self.calls.get(key)
            if call is not None:
                return call
        else:
            if not self.window_open():
                return None
            key = (self.client_id, self.next_seq)
            self.next_seq += 1
        call = Call(key, payload, now)
        self.calls[key] = call
        if key[0] == self.client_id:
            self.session_calls[key[1]] = call
        self.stats["requests"] += 1
        self.pending.append(call)
        return call

    def flush(self) -> None:
        """Send what was submitted since the last flush, as one batch."""
        calls, self.pending = self.pending, []
        self._send(calls)

    def take(self) -> list:
        """What to send now: Send and Notice values, in order."""
        out, self.outbox = self.outbox, []
        return out

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
        self.outbox.append(Send((leader,) if directed else self.targets, directed, calls))

    def _complete(self, call, reply=None, error=None):
        key = call.key
        self.calls.pop(key, None)
        if key[0] == self.client_id:
            self.session_calls.pop(key[1], None)
            self.on_window_open()
        if not self.calls:
            self.on_drained()
        call._complete(reply, error)

    def fail_all(self, why: str) -> None:
        for call in list(self.calls.values()):
            self._complete(call, error=ClusterUnavailable(why))

    # ------------------------------------------------------------------ replies and errors

    def heard(self, replica, now) -> None:
        self.heard_from[replica] = now
        if self.disconnected:
            self.disconnected.discard(replica)

    def on_reply(self, replica, key, reply, now) -> None:
        call = self.calls.get(key)
        if call is None:
            replies = self.recent.get(key)
            if replies is not None:
                if any(not same_reply(seen, reply, self.comparable) for seen in replies.values()):
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
            if not same_reply(seen, reply, self.comparable):
                self._divergence(key, replica, other)
                diverged = True
            elif other != replica:  # the same replica again (a retransmission's answer) counts once
                matching += 1
        replies[replica] = reply
        if diverged:
            self._tell_minority(key, replies)
        if matching >= self.reply_quorum:
            self.stats["replies"] += 1
            self.on_replied(now - call.first_sent)
            self.recent[key] = replies  # late replies are compared with these
            if len(self.recent) > 4096:
                self.recent.popitem(last=False)
            self._complete(call, reply)

    def _divergence(self, key, replica, other=None):
        self.stats["divergences"] += 1
        log.error("event=divergence client_id=%x seq=%d replica=%s other=%s (replicas returned "
                  "different replies for one request)", key[0], key[1], replica,
                  "first_reply" if other is None else other)

    def _tell_minority(self, key, replies):
        """Once a majority of the voters gave one reply, every replica that gave another is told:
        its app's state is not the others', and it rebuilds it (smrd.replica.executor)."""
        voters = self.membership["voters"] if self.membership else self.replicas
        majority = len(voters) // 2 + 1
        comparable = self.comparable or (lambda reply: reply)
        counts = {}
        for seen in replies.values():
            seen = comparable(seen)
            counts[seen] = counts.get(seen, 0) + 1
        best, count = max(counts.items(), key=lambda item: item[1])
        if count < majority:
            return
        digest = reply_digest(best) + bytes([min(count, 255)])
        for r, seen in replies.items():
            if comparable(seen) == best or (key[0], key[1], r) in self.notified:
                continue
            self.notified[(key[0], key[1], r)] = True
            if len(self.notified) > 4096:
                self.notified.popitem(last=False)
            log.error("event=divergence_minority client_id=%x seq=%d replica=%d majority=%d (told to "
                      "rebuild its app)", key[0], key[1], r, count)
            self.outbox.append(Notice(r, [(key[0], key[1], digest)]))

    def on_error(self, replica, key, status, text, now) -> None:
        if status == NOT_EXECUTING:
            self.on_not_executing(replica, [key], now)
            return
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

    def on_not_executing(self, replica, keys, now) -> None:
        """`replica` orders these requests but will not answer them: ask the others, now."""
        again = [call for key in keys if (call := self.calls.get(key)) is not None
                 and replica not in call.replies]
        if not again:
            return
        if replica not in self.not_executing:
            self._cannot_execute(replica, "it answered a request with NOT_EXECUTING")
        for call in again:
            call.last_sent = now
        self._send(again, everyone=True)

    def _cannot_execute(self, replica, why):
        self.not_executing.add(replica)
        log.warning("event=replica_cannot_execute replica=%d leader=%s reason=%r (new requests go "
                    "to every replica until it executes again)", replica, replica == self.leader, why)

    def _executes(self, replica):
        if replica in self.not_executing:
            self.not_executing.discard(replica)
            log.info("event=replica_executes replica=%d", replica)

    # ------------------------------------------------------------------ status answers

    def on_status(self, replica, status: dict, now) -> None:
        """A replica's answer to a status probe: the membership, its view and leader, whether
        it can execute."""
        try:
            cfg = status.get("membership")
            index, voters, learners = cfg["index"], cfg["voters"], cfg["learners"]
        except (TypeError, KeyError, AttributeError):
            return  # a replica without memberships, or garbage: ignore
        if self.membership is None or index > self.membership["index"]:
            self.membership = {"index": index, "voters": list(voters), "learners": list(learners)}
            self.retarget(now)
        if status.get("can_execute", True):
            self._executes(replica)
        elif replica not in self.not_executing:
            self._cannot_execute(replica, status.get("execution_reason") or "says so")
        self._leader_hint(replica, status)

    def _leader_hint(self, replica, status):
        view, leader, state = status.get("view"), status.get("leader"), status.get("status")
        if type(view) is not int or type(leader) is not int:
            return
        if state == "normal" and leader in self.replicas and leader not in self.disconnected and (
                view > self.leader_view or (view == self.leader_view and self.leader is None)):
            new = leader
        elif replica == self.leader and (state != "normal" or leader != replica):
            new = None  # the one we send to says it is not leading (now): send to everyone
        else:
            return
        self.leader_view = max(self.leader_view, view)
        if new != self.leader:
            log.info("event=gateway_leader leader=%s view=%d", "none" if new is None else new, view)
            self.leader = new
            if new is None:
                self.on_leader_lost()

    def reachable(self, now, among=None) -> int:
        return sum(1 for r, t in self.heard_from.items()
                   if now - t <= REACHABLE_S and (among is None or r in among))

    def retarget(self, now) -> None:
        """Requests go to the members of the known membership, or to every replica of hosts.conf
        while none is known or none of its members answered for REACHABLE_S."""
        cfg = self.membership
        if cfg is None:
            targets = self.replicas
        else:
            members = set(cfg["voters"]) | set(cfg["learners"])
            targets = tuple(r for r in self.replicas if r in members)
            if not targets or self.reachable(now, members) == 0:
                targets = self.replicas  # fall back: nobody we think is a member answers
        if targets != self.targets:
            log.info("event=gateway_targets replicas=%s membership=%s", list(targets),
                     cfg["index"] if cfg else "unknown")
            self.targets = targets

    # ------------------------------------------------------------------ faults and time

    def connection_lost(self, replica, now) -> None:
        """A hint (the connection may come back), but the requests sent to it alone may be lost
        with it: send everything in flight to every target now rather than at retransmit_s.
        Until it is heard from again it is not taken for the leader: the others still name it
        until their view change ends."""
        self.disconnected.add(replica)
        if len(self.disconnected) == len(self.replicas):
            self.leader_view = -1  # all gone: a cluster started anew begins at view 0 again
        if replica != self.leader:
            return
        log.info("event=gateway_leader leader=none view=%d reason='connection to replica %d dropped'",
                 self.leader_view, replica)
        self.leader = None
        self.on_leader_lost()
        calls = list(self.calls.values())
        for call in calls:
            call.last_sent = now
        self._send(calls, everyone=True)

    def tick(self, now) -> None:
        """Deadlines and retransmissions (to every target)."""
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
