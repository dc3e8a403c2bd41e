"""Exactly-once execution: which decided requests run on the app and which are answered from the
reply cache. Every decision here is a function of the decided order alone (request ids and the
leader's batch timestamps), so all replicas make the same ones. Never reads a clock.
"""
import struct

from .. import core
from .membership import SYSTEM_CLIENT, Membership

# Outcome of begin(); also the reply status codes a gateway sees in REPLY_ERRORS.
EXECUTE = 0          # run it on the app, then finish() with the reply
DUPLICATE = 1        # executed before: the cached reply is the answer
TOO_OLD = 2          # executed before but its reply was evicted (seq <= the client's floor)
UNKNOWN_SESSION = 3  # no session for this client and seq is beyond a new session's window
SYSTEM = 4           # a membership change: the protocol core executes it, never the app; the
                     # plan's payload is the change, then (after the core applied it) its answer
NOT_EXECUTING = 5    # (REPLY_ERRORS only) this replica orders the request but cannot execute it
                     # now (its app is down or being rebuilt): the gateway asks the others

ERROR_TEXT = {
    TOO_OLD: b"request too old: its reply was evicted from the reply cache",
    UNKNOWN_SESSION: b"unknown or expired client session: retry with a new client id",
    NOT_EXECUTING: b"this replica cannot execute now: ask the others",
}


class Sessions:
    """The per-client reply cache (last k replies) plus session expiry by batch timestamps."""

    def __init__(self, k: int, ttl_ms: int):
        if ttl_ms < 1:
            raise ValueError("session ttl must be >= 1 ms")
        self.k = k
        self.ttl_ms = ttl_ms
        self.cache = core.ReplyCache(k)
        self.clock_ms = 0          # the newest batch timestamp applied
        self._next_expiry_ms = 0
        self.expired = 0
        # Duplicates planned while their original had not run yet: they take its reply when it
        # comes, even if k newer seqs evict it from the cache in between (plans run ahead of
        # execution; the answer must not depend on how far ahead).
        self._awaiting = {}
        self._late = {}
        # The replica group's membership is replicated state too: it travels in checkpoints with
        # the table. None until the protocol core sets the bootstrap membership.
        self.membership = None

    def advance(self, timestamp_ms: int) -> None:
        """Called with each applied batch's timestamp, in decided order."""
        if timestamp_ms <= self.clock_ms:
            return
        self.clock_ms = timestamp_ms
        if timestamp_ms >= self._next_expiry_ms:
            # Sweeping every client costs O(clients); a tenth of the ttl keeps it rare while
            # overstaying by at most 10%.
            if timestamp_ms > self.ttl_ms:
                self.expired += self.cache.expire(timestamp_ms - self.ttl_ms)
            self._next_expiry_ms = timestamp_ms + max(1, self.ttl_ms // 10)

    def classify(self, client_id: int, seq: int) -> int:
        """What begin() would answer, without recording anything."""
        cache = self.cache
        if client_id not in cache:
            # A new session starts at seq 1 with at most k in flight; a larger seq from an
            # unknown client is a session that expired, so executing it could run it twice.
            return EXECUTE if seq <= self.k else UNKNOWN_SESSION
        status = cache.check(client_id, seq)
        if status == core.NEW:
            return EXECUTE
        if status == core.DUPLICATE:
            return DUPLICATE
        return TOO_OLD

    def begin(self, client_id: int, seq: int) -> int:
        status = self.classify(client_id, seq)
        if status == EXECUTE:
            self.cache.put(client_id, seq, None, self.clock_ms)
            if self.cache.check(client_id, seq) != core.DUPLICATE:
                # It fell out of the window at once: k newer seqs already ran. The client broke
                # the rule "at most k seqs between its oldest outstanding and its newest".
                return TOO_OLD
        return status

    def await_reply(self, client_id: int, seq: int) -> None:
        key = (client_id, seq)
        self._awaiting[key] = self._awaiting.get(key, 0) + 1

    def take_reply(self, client_id: int, seq: int):
        """The reply for a duplicate planned with await_reply (after its original finished)."""
        key = (client_id, seq)
        left = self._awaiting.get(key, 0) - 1
        if left > 0:
            self._awaiting[key] = left
            return self._late.get(key) or self.cache.get(client_id, seq)
        self._awaiting.pop(key, None)
        reply = self._late.pop(key, None)
        return reply if reply is not None else self.cache.get(client_id, seq)

    def finish(self, client_id: int, seq: int, reply: bytes) -> None:
        if self._awaiting and (client_id, seq) in self._awaiting:
            self._late[(client_id, seq)] = reply
        # Timestamp 0 leaves last-active as begin() set it: drivers may finish a batch after
        # later batches began, and expiry must not depend on how they grouped the work.
        cache = self.cache
        if cache.check(client_id, seq) == core.DUPLICATE:
            cache.put(client_id, seq, reply, 0)
        # else: k newer seqs of this client were planned since, evicting this one; its reply
        # still goes out now, but a later retransmission gets TOO_OLD.

    def reply(self, client_id: int, seq: int):
        return self.cache.get(client_id, seq)

    # -------------------------------------------------------------------- checkpoints

    def capture(self) -> "SessionsImage":
        """The table as it stands, for a checkpoint at the instance just planned. Requests of
        that instance (and earlier ones still executing) have no reply yet: the driver fills them
        in as it executes them (SessionsImage.fill), before it encodes the image."""
        cache = self.cache
        clients = []
        missing = {}
        for cid in cache.clients():
            entries = [list(e) for e in cache.entries(cid)]
            for e in entries:
                if e[1] is None:
                    missing[(cid, e[0])] = e
            clients.append((cid, cache.floor(cid), cache.last_active(cid), entries))
        return SessionsImage(self.clock_ms, self._next_expiry_ms, clients, missing, self.membership)

    @classmethod
    def restore(cls, k: int, ttl_ms: int, blob) -> "Sessions":
        """The table encoded by SessionsImage.encode(); ValueError if the bytes are not one."""
        sessions = cls(k, ttl_ms)
        try:
            clock, next_expiry, count = _IMAGE_HEAD.unpack_from(blob, 0)
            off = _IMAGE_HEAD.size
            cache = sessions.cache
            for _ in range(count):
                cid, floor, last_active, n = _IMAGE_CLIENT.unpack_from(blob, off)
                off += _IMAGE_CLIENT.size
                entries = []
                for _ in range(n):
                    seq, length = _IMAGE_ENTRY.unpack_from(blob, off)
                    off += _IMAGE_ENTRY.size
                    entries.append((seq, bytes(blob[off:off + length])))
                    off += length
                    if off > len(blob):
                        raise ValueError("truncated reply")
                cache.restore_client(cid, floor, last_active, entries)
        except struct.error as exc:
            raise ValueError(f"not a session table image: {exc}") from None
        if off < len(blob):
            # Images written before membership changes existed end after the clients.
            if blob[off:off + 1] != _MEMBERSHIP_TAG or off + 5 > len(blob):
                raise ValueError(f"session table image has {len(blob) - off} trailing bytes")
            (length,) = struct.unpack_from("<I", blob, off + 1)
            off += 5
            if off + length != len(blob):
                raise ValueError("session table image: membership length does not match")
            sessions.membership = Membership.decode(blob[off:off + length])
        sessions.clock_ms, sessions._next_expiry_ms = clock, next_expiry
        return sessions


_IMAGE_HEAD = struct.Struct("<QQI")     # clock_ms, next expiry sweep, clients
_IMAGE_CLIENT = struct.Struct("<QQqI")  # client id, floor, last active, entries
_IMAGE_ENTRY = struct.Struct("<QI")     # seq, reply length (the reply follows)
_MEMBERSHIP_TAG = b"M"                  # then u32 length and Membership.encode()


class SessionsImage:
    """A captured session table: deterministic bytes once every reply is filled in, so that
    replicas that executed the same prefix produce byte-identical checkpoints."""
    __slots__ = ("clock_ms", "next_expiry_ms", "clients", "missing", "membership")

    def __init__(self, clock_ms, next_expiry_ms, clients, missing, membership=None):
        self.clock_ms = clock_ms
        self.next_expiry_ms = next_expiry_ms
        self.clients = clients
        self.missing = missing      # (client_id, seq) -> [seq, None] entry awaiting its reply
        self.membership = membership

    def fill(self, client_id: int, seq: int, reply: bytes) -> None:
        entry = self.missing.pop((client_id, seq), None)
        if entry is not None:
            entry[1] = reply

    def encode(self) -> bytes:
        if self.missing:
            raise ValueError(f"{len(self.missing)} replies of the checkpoint were never filled in")
        parts = [_IMAGE_HEAD.pack(self.clock_ms, self.next_expiry_ms, len(self.clients))]
        for cid, floor, last_active, entries in self.clients:
            parts.append(_IMAGE_CLIENT.pack(cid, floor, last_active, len(entries)))
            for seq, reply in entries:
                parts.append(_IMAGE_ENTRY.pack(seq, len(reply)))
                parts.append(reply)
        if self.membership is not None:
            blob = self.membership.encode()
            parts.append(_MEMBERSHIP_TAG + struct.pack("<I", len(blob)) + blob)
        return b"".join(parts)


def plan_batch(sessions: Sessions, value) -> list:
    """Decide, in decided order, what each request of a batch gets: (client_id, seq, status,
    payload). The protocol core calls this the moment it hands the batch over, so the table is
    always current with the core's applied point (a request that arrives while the batch is still
    being executed is recognised as a duplicate, not queued again)."""
    batch = core.Batch(value)
    sessions.advance(batch.timestamp)
    cache = sessions.cache
    check, put = cache.check, cache.put
    k, clock = sessions.k, sessions.clock_ms
    new, duplicate = core.NEW, core.DUPLICATE
    plan = []
    for client_id, seq, payload in batch:
        if client_id == SYSTEM_CLIENT:
            plan.append((client_id, seq, SYSTEM, payload))  # the core executes it and fills in
            continue                                          # its answer (Replica._apply_change)
        # Sessions.begin(), inlined: this loop runs for every request at every replica.
        if client_id in cache:
            found = check(client_id, seq)
            status = EXECUTE if found == new else DUPLICATE if found == duplicate else TOO_OLD
        else:
            status = EXECUTE if seq <= k else UNKNOWN_SESSION
        if status == EXECUTE:
            put(client_id, seq, None, clock)
            if check(client_id, seq) != duplicate:
                status = TOO_OLD  # fell out of the window at once (see Sessions.begin)
        elif status == DUPLICATE:
            # A duplicate carries its answer in the plan (payload is not needed): the cached
            # reply now, or None = take it from the original when that has run.
            payload = sessions.cache.get(client_id, seq)
            if payload is None:
                sessions.await_reply(client_id, seq)
        plan.append((client_id, seq, status, payload))
    return plan


def run_plan(sessions: Sessions, plan, app) -> list:
    """Execute a plan on a synchronous app, in order: (client_id, seq, status, reply) per request.
    EXECUTE and DUPLICATE carry the app's reply; TOO_OLD and UNKNOWN_SESSION carry ERROR_TEXT.
    The daemon's server does the same with an asynchronous app; this form serves the simulator."""
    out = []
    for client_id, seq, status, payload in plan:
        if status == EXECUTE:
            reply = app(bytes(payload))
            sessions.finish(client_id, seq, reply)
        elif status == DUPLICATE:
            reply = payload if payload is not None else sessions.take_reply(client_id, seq)
        elif status == SYSTEM:
            reply = payload
        else:
            reply = ERROR_TEXT[status]
        out.append((client_id, seq, status, reply))
    return out


def execute_batch(sessions: Sessions, value, app) -> list:
    """plan_batch then run_plan: one decided batch through the table and a synchronous app."""
    return run_plan(sessions, plan_batch(sessions, value), app)
