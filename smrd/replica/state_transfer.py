"""State transfer between replicas: serving stored checkpoints to peers and fetching one when the
protocol core says the log this replica needs was truncated (Ready.transfer).

Owns: the STATE_* messages (smrd/protocol/messages.py), choosing a checkpoint that f+1 peers
report with the same digest, fetching it in chunks (a window of requests, another peer when one
stops answering) into a part file, verifying it by hash while streaming (memory stays bounded by
the window, whatever the state's size), rate-limiting what this replica serves so that serving
never stalls ordering, and progress (log lines and the numbers behind the metrics).
Never: touches the protocol core or the app (the server installs what this hands it), keeps a
whole checkpoint in memory, or accepts bytes whose hash no peer vouched for. f+1 peers must
agree, except when for LONE_AFTER queries in a row fewer than f+1 peers hold any checkpoint
new enough and none of them contradicts another (two replicas behind at once, the others'
logs already truncated): waiting for a vouching quorum that cannot exist would leave both
replicas unable to execute for good, and a crash-faulty peer's checkpoint is the decided prefix.
"""
import asyncio
import logging
import os
import time
from collections import Counter

from .checkpoints import CheckpointError
from ..protocol import messages as m

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 10
WINDOW = 4                 # chunk requests in flight
QUERY_WAIT_S = 1.0         # how long to collect STATE_INFO answers
CHUNK_TIMEOUT_S = 3.0      # no chunk for this long: ask another peer
ATTEMPTS = 10              # queries before giving up (the core then asks again)
LONE_AFTER = 3             # queries in a row without f+1 holders before fewer may do (above)
PROGRESS_EVERY_S = 1.0


class StateTransfer:
    def __init__(self, replica_id, peers, need, store, send, rate_bytes_s, on_installed, on_failed):
        self.id = replica_id
        self.peers = tuple(peers)
        self.need = need                  # matching reports required (f + 1)
        self.store = store
        self.send = send                  # send(peer, message)
        self.rate = float(rate_bytes_s)
        self.on_installed = on_installed  # (instance, digest, size, sessions_blob, app_state)
        self.on_failed = on_failed        # (reason)
        self.task = None
        self.nonce = 0
        self.answers = {}
        self.short = 0                    # queries in a row where fewer than f+1 held one (LONE_AFTER)
        self.answered = asyncio.Event()
        self.chunks = asyncio.Queue()
        self.next_free = 0.0              # serving: when the link is free again (token bucket)
        # Progress, for status and metrics.
        self.instance = 0
        self.size = 0
        self.received = 0
        self.started = 0.0
        self.completed = 0
        self.served_bytes = 0

    # ------------------------------------------------------------------------------ serving

    def on_message(self, sender, msg) -> None:
        t = type(msg)
        if t is m.StateQuery:
            self.send(sender, m.StateInfo(msg.nonce, tuple(self.store.info())))
        elif t is m.StateChunkRequest:
            self._serve_chunk(sender, msg)
        elif t is m.StateInfo:
            if msg.nonce == self.nonce and self.task is not None:
                self.answers[sender] = msg.checkpoints
                if len(self.answers) >= len(self.peers):
                    self.answered.set()
        elif t is m.StateChunk:
            if self.task is not None and msg.instance == self.instance:
                self.chunks.put_nowait((sender, msg))

    def _serve_chunk(self, sender, msg) -> None:
        length = min(msg.length, CHUNK_BYTES)
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now, self.next_free)
        self.next_free = at + length / self.rate
        if at <= now:
            self._send_chunk(sender, msg.instance, msg.offset, length)
        else:
            loop.call_later(at - now, self._send_chunk, sender, msg.instance, msg.offset, length)

    def _send_chunk(self, sender, instance, offset, length) -> None:
        total, data = self.store.read_chunk(instance, offset, length)
        self.served_bytes += len(data)
        self.send(sender, m.StateChunk(instance, offset, total, data))

    # ------------------------------------------------------------------------------ fetching

    @property
    def active(self) -> bool:
        return self.task is not None

    def start(self, hint_peer: int, min_instance: int) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(hint_peer, min_instance))

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self, hint_peer, min_instance):
        self.short = 0
        try:
            for attempt in range(1, ATTEMPTS + 1):
                chosen = await self._choose(min_instance)
                if chosen is None:
                    await asyncio.sleep(QUERY_WAIT_S * min(attempt, 5))  # back-off between polls
                    continue
                instance, digest, reporters = chosen
                if hint_peer in reporters:  # the peer that told us is known to be up
                    reporters.remove(hint_peer)
                    reporters.insert(0, hint_peer)
                try:
                    result = await self._fetch(instance, digest, reporters)
                except CheckpointError as e:
                    log.warning("event=state_transfer_retry reason=%r", str(e))
                    continue
                if result is not None:
                    self.completed += 1
                    self.on_installed(*result)
                    return
            self.on_failed(f"no checkpoint >= {min_instance} could be fetched after {ATTEMPTS} attempts")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave the core waiting for a transfer that died
            log.exception("state transfer failed")
            self.on_failed(f"state transfer failed: {e}")
        finally:
            self.task = None

    async def _choose(self, min_instance):
        """The newest checkpoint >= min_instance that f+1 peers report with the same digest."""
        self.nonce += 1
        self.answers = {}
        self.answered.clear()
        for p in self.peers:
            self.send(p, m.StateQuery(self.nonce))
        try:
            await asyncio.wait_for(self.answered.wait(), QUERY_WAIT_S)
        except asyncio.TimeoutError:
            pass
        votes = Counter()
        holders = {}
        for peer, checkpoints in self.answers.items():
            for instance, size, digest in checkpoints:
                if instance >= min_instance:
                    votes[(instance, digest)] += 1
                    holders.setdefault((instance, digest), []).append(peer)
        agreed = [key for key, count in votes.items() if count >= self.need]
        reports = {p: [c[0] for c in cs] for p, cs in self.answers.items()}
        if agreed:
            self.short = 0
            instance, digest = max(agreed)
            return instance, digest, holders[(instance, digest)]
        digests = {}
        for instance, digest in votes:
            digests.setdefault(instance, set()).add(digest)
        contradicted = any(len(d) > 1 for d in digests.values())
        self.short = self.short + 1 if votes and not contradicted else 0
        if self.short >= LONE_AFTER:
            instance, digest = max(votes)
            log.warning("event=state_transfer_single_source instance=%d peers=%s reports=%s (for "
                        "%d queries no checkpoint >= %d was held by %d peers, and none contradicts "
                        "another: fetching from fewer, verified by the digest they report)",
                        instance, holders[(instance, digest)], reports, self.short, min_instance,
                        self.need)
            return instance, digest, holders[(instance, digest)]
        log.info("event=state_transfer_waiting need=%d reports=%s (no checkpoint >= %d that %d "
                 "peers agree on yet%s)", self.need, reports, min_instance, self.need,
                 "; two report different digests for one instance" if contradicted else "")
        return None

    async def _fetch(self, instance, digest, reporters):
        store = self.store
        self.instance, self.received, self.size = instance, 0, 0
        self.started = time.monotonic()
        self.chunks = asyncio.Queue()
        part = store.part_path(instance)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for peer in reporters:
                done = await self._fetch_from(peer, instance, fd)
                if done:
                    break
                log.warning("event=state_transfer_peer_silent peer=%d instance=%d: trying another peer",
                            peer, instance)
            else:
                raise CheckpointError(f"no peer delivered checkpoint {instance}")
        finally:
            os.close(fd)
        size = await asyncio.to_thread(store.import_part, instance, digest)
        sessions_blob, app_state = await asyncio.to_thread(store.read, instance, digest)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        log.info("event=state_transfer_done instance=%d bytes=%d seconds=%.2f rate_mb_s=%.1f "
                 "(verified sha256 %s… against %d peers)", instance, size, elapsed,
                 size / elapsed / 1e6, digest.hex()[:16], self.need)
        return instance, digest, size, sessions_blob, app_state

    async def _fetch_from(self, peer, instance, fd) -> bool:
        """Fetch the whole file from one peer (restarting at 0: peers' files may differ in size
        even when their content is the same). False if the peer stopped answering."""
        self.received = 0
        total = None
        next_offset = 0
        outstanding = set()
        got = set()
        last_progress = time.monotonic()

        def ask(offset):
            outstanding.add(offset)
            self.send(peer, m.StateChunkRequest(instance, offset, CHUNK_BYTES))

        ask(0)
        while True:
            try:
                sender, chunk = await asyncio.wait_for(self.chunks.get(), CHUNK_TIMEOUT_S)
            except asyncio.TimeoutError:
                return False
            if sender != peer or chunk.offset in got or chunk.offset not in outstanding:
                continue
            if chunk.total == 0:
                return False  # the peer deleted that checkpoint meanwhile
            if total is None:
                total = self.size = chunk.total
                next_offset = CHUNK_BYTES
            elif chunk.total != total:
                return False
            outstanding.discard(chunk.offset)
            got.add(chunk.offset)
            os.pwrite(fd, chunk.data, chunk.offset)
            self.received += len(chunk.data)
            if self.received >= total:
                return True
            while len(outstanding) < WINDOW and next_offset < total:
                ask(next_offset)
                next_offset += CHUNK_BYTES
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                rate = self.received / max(now - self.started, 1e-6)
                log.info("event=state_transfer_progress instance=%d bytes=%d of %d (%.0f%%) "
                         "rate_mb_s=%.1f from=%d", instance, self.received, total,
                         100.0 * self.received / total, rate / 1e6, peer)

    def describe(self) -> dict:
        return {"transfer_active": self.task is not None, "transfer_instance": self.instance,
                "transfer_bytes": self.received, "transfer_size": self.size,
                "transfers_completed": self.completed, "transfer_served_bytes": self.served_bytes}
