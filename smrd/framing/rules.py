"""Per-connection state rules: what a framing says about requests that depend on the state of
the connection they arrive on.

A replica feeds every client's requests to its app over ONE connection, interleaved in the
decided order. A request that changes or reads that connection's state (Redis MULTI, SELECT,
SUBSCRIBE ...) would leak into other clients' requests, so the gateway applies these rules to
each client connection's decoded requests before anything is ordered. A mode's rules classify
each request as:

  PASS         order it as it is;
  REFUSE       answer it at once with the mode's error reply (naming the rule); never ordered;
  GROUP_START  it opens a block (MULTI) that is ordered as ONE request together with the
               requests after it up to the GROUP_END (EXEC/DISCARD), if the client sent them
               all before it needs a reply; otherwise the whole block is refused;
  GROUP_END    it closes an open block;
  CLOSE        answer it at once with the given reply and end the connection (QUIT).

Owns: that state machine, generic over modes (smrd.framing.resp supplies the classification and
the replies). Never: I/O, clocks, or waiting for bytes that may never come: a block still open
when the client has sent no partial request after it is refused at once, because the client may
be waiting for the reply to its MULTI and nothing else would ever arrive.
"""
import asyncio
from typing import Callable, List, Optional, Tuple

PASS, REFUSE, GROUP_START, GROUP_END, CLOSE = "pass", "refuse", "group-start", "group-end", "close"


class Answer(bytes):
    """A reply the rules give at once (a refusal): never ordered. It is ``bytes``, so a client
    connection queues it like any ready reply."""


class Group(bytes):
    """A block of requests ordered as one request (their bytes concatenated); ``count`` is how
    many requests, hence how many replies the app sends for it."""

    count = 1


class StateRules:
    """One per client connection. ``take(messages)`` turns the decoder's messages into what to
    order or answer, in order: plain messages (order them), ``Group``s (order them, one request)
    and ``Answer``s (reply with them). ``reply_for(item)`` gives what the connection queues for
    one of those: the Answer itself, or what ``submit`` returns (a Group's failure is spread over
    one error reply per request in it, so the client still gets as many replies as it sent
    requests).

    ``decoder`` is the connection's request decoder: its ``partial`` tells whether bytes of a
    further request are already buffered (then the client is still sending, and an open block
    may still be completed) and the rules set its ``finished`` for CLOSE.
    """

    def __init__(self, decoder, submit: Callable, max_size: int) -> None:
        self.decoder = decoder
        self.submit = submit
        self.max_size = max_size
        self._held: Optional[List[bytes]] = None  # the open block's requests, GROUP_START first
        self._held_size = 0
        self._aborted: Optional[str] = None  # why the rest of a refused block is refused

    # The mode's part ------------------------------------------------------------------------
    def classify(self, message: bytes) -> Tuple[str, object]:
        """-> (verdict, detail): detail is the reason for REFUSE, the reply for CLOSE, and for
        GROUP_END the reply it gets when its block was refused."""
        raise NotImplementedError

    def refusal(self, reason: str) -> bytes:
        """The reply to one refused request."""
        raise NotImplementedError

    # The machine ---------------------------------------------------------------------------
    def take(self, messages: List[bytes]) -> list:
        out: list = []
        for i, message in enumerate(messages):
            verdict, detail = self.classify(message)
            if self._aborted is not None:
                # Inside a refused block: nothing runs until its end, as in a transaction whose
                # queueing failed; the end gets the mode's "aborted" reply.
                if verdict == GROUP_END:
                    out.append(Answer(detail))
                    self._aborted = None
                else:
                    out.append(Answer(self.refusal(
                        f"inside a refused block: {self._aborted}")))
                continue
            if self._held is not None:
                if verdict == GROUP_END:
                    self._held.append(message)
                    out.append(self._group())
                elif verdict in (REFUSE, CLOSE):
                    reason = (detail if verdict == REFUSE
                              else "a request that ends the connection inside a block")
                    self._refuse_held(out, reason, message)
                elif self._held_size + len(message) > self.max_size:
                    self._refuse_held(out, f"the block exceeds the limit of {self.max_size} "
                                      "bytes for one request", message)
                else:
                    self._held.append(message)
                    self._held_size += len(message)
                continue
            if verdict == PASS or verdict == GROUP_END:
                out.append(message)  # an end without a block: the app answers it (an error)
            elif verdict == REFUSE:
                out.append(Answer(self.refusal(detail)))
            elif verdict == GROUP_START:
                self._held, self._held_size = [message], len(message)
            else:  # CLOSE: answer, and read nothing more from this connection
                out.append(Answer(detail))
                # finished, not wants_close: the connection still queues every reply taken here
                # (those before this one, and this one), then ends, as after an HTTP
                # "Connection: close" request.
                self.decoder.finished = True
                return out
        if self._held is not None and not self.decoder.partial:
            # No byte of a further request has arrived: the client may be waiting for the reply
            # to what it sent, which a held block never gets. Refuse the block now.
            held, self._held = self._held, None
            reason = self.incomplete_reason()
            out.append(Answer(self.refusal(reason) * len(held)))
            self._aborted = reason
        return out

    def incomplete_reason(self) -> str:
        return "a block must be sent whole, in one write"

    def _group(self) -> Group:
        held, self._held = self._held, None
        group = Group(b"".join(held))
        group.count = len(held)
        return group

    def _refuse_held(self, out: list, reason: str, message: bytes) -> None:
        # The open block and the request that broke it are refused; so is the rest of the block,
        # up to its end, which the client is still going to send.
        held, self._held = self._held, None
        out.append(Answer(self.refusal(reason) * (len(held) + 1)))
        self._aborted = reason

    def reply_for(self, item):
        if type(item) is Answer:
            return item
        call = self.submit(bytes(item))
        if type(item) is not Group:
            return call
        if isinstance(call, bytes):  # refused by the gateway itself: one error per request
            return self._spread(call, item.count)
        # A Group's error (cluster unavailable, gateway stopping) must still give the client one
        # reply per request it sent, or it would pair later replies with the wrong requests.
        future = asyncio.get_running_loop().create_future()
        count = item.count

        def done(call):
            if future.done():
                return
            if call.cancelled():
                future.set_result(self._spread(self.refusal("gateway shutting down"), count))
            elif call.exception() is not None:
                future.set_result(self._spread(self.refusal(str(call.exception())), count))
            else:
                future.set_result(call.result())

        call.add_done_callback(done)
        return future

    def _spread(self, reply: bytes, count: int) -> bytes:
        # An error reply that stands for a whole block: one copy per request in it (a reply that
        # already is the block's replies, from the app, never gets here).
        return reply * count
