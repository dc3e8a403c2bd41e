# Closed-loop client threads that record a history for the linearizability checker: the part
# every load of the e2e tests shares (threads, progress, errors). Each test's load says only how
# one client sends one operation, in its app's protocol (_client).
import threading

import pytest

from smrd.testing.linearizability import History


class ClosedLoop:
    """Client threads 0..clients-1 run self._client(c) until finish(); an operation whose
    reply is in hand is _completed(op, output); one with no usable answer is _failed(reason) and
    stays open in the history (it may or may not have run)."""

    def __init__(self, clients, history=None):
        self.history = history if history is not None else History()
        self.stop = threading.Event()
        self.done = 0
        self.errors = 0
        self.reasons = []
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True)
                        for c in range(clients)]

    def _client(self, c):
        raise NotImplementedError

    def _completed(self, op, output):
        self.history.complete(op, output)
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def _failed(self, reason):
        with self.cond:
            self.errors += 1
            self.reasons.append(str(reason))

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def wait_progress(self, ops, timeout=60):
        """Block until `ops` more operations have completed (the cluster made progress)."""
        with self.cond:
            target = self.done + ops
            if not self.cond.wait_for(lambda: self.done >= target, timeout):
                pytest.fail(f"no progress: {self.done}/{target} ops after {timeout} s; "
                            f"last errors {self.reasons[-3:]}")

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
