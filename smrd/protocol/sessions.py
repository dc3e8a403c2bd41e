# Exactly-once execution: which decided requests run on the app and which are answered from the
# reply cache. Every decision here is a function of the decided order alone (request ids and the
# leader's batch timestamps), so all replicas make the same ones. Never reads a clock.
from .. import core

# Outcome of begin(); also the reply status codes a gateway sees in REPLY_ERRORS.
EXECUTE = 0          # run it on the app, then finish() with the reply
DUPLICATE = 1        # executed before: the cached reply is the answer
TOO_OLD = 2          # executed before but its reply was evicted (seq <= the client's floor)
UNKNOWN_SESSION = 3  # no session for this client and seq is beyond a new session's window

ERROR_TEXT = {
    TOO_OLD: b"request too old: its reply was evicted from the reply cache",
    UNKNOWN_SESSION: b"unknown or expired client session: retry with a new client id",
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

    def finish(self, client_id: int, seq: int, reply: bytes) -> None:
        # Timestamp 0 leaves last-active as begin() set it: drivers may finish a batch after
        # later batches began, and expiry must not depend on how they grouped the work.
        self.cache.put(client_id, seq, reply, 0)

    def reply(self, client_id: int, seq: int):
        return self.cache.get(client_id, seq)


def execute_batch(sessions: Sessions, value, app) -> list:
    """Run one decided batch through the exactly-once table and a synchronous app.

    Returns (client_id, seq, status, reply) per request: status EXECUTE or DUPLICATE carry the
    app's reply; TOO_OLD and UNKNOWN_SESSION carry ERROR_TEXT. The daemon's server does the same
    with an asynchronous app; this form serves the simulator and tests.
    """
    batch = core.Batch(value)
    sessions.advance(batch.timestamp)
    out = []
    for client_id, seq, payload in batch:
        status = sessions.begin(client_id, seq)
        if status == EXECUTE:
            reply = app(bytes(payload))
            sessions.finish(client_id, seq, reply)
        elif status == DUPLICATE:
            reply = sessions.reply(client_id, seq)
        else:
            reply = ERROR_TEXT[status]
        out.append((client_id, seq, status, reply))
    return out
