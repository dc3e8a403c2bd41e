"""The app adapter: a replica's connection to its local, unmodified app at 127.0.0.1:PORT
(the app contract: docs/app-contract.md; wire rules: docs/framing.md).

Owns: the TCP connection(s) to the app, framing requests out and replies in, the reply
time-out, reconnecting with back-off, the app's readiness as the replica reports it, and close
mode's worker thread (its exchanges run there; see "close mode's worker thread" below).
Rules, most important first:
  1. Never reorder. Requests reach the app in the order given, replies come back in that order;
     close mode writes a request only once the reply before it is complete, because the app
     serves connections concurrently (the next connection may be open by then, with nothing
     written on it).
  2. Never skip, never invent. execute() returns only when every request has the app's own
     reply. It may retry only what the app cannot have seen: a connect that failed, or requests
     not yet written. A request that was written and then lost its reply (drop, time-out, app
     error) may or may not have run: the adapter raises AppError naming it and never resends
     it, because exactly-once belongs to the replica (it rebuilds the app from the log).
  3. Never guess what the app holds. Whether the app restarted (and lost its state) is the
     replica's call; the adapter reports connection trouble (on_state_change, stats) and no more.
Never: log above debug (the replica logs the state changes it is told about), sleep without a
bound, leave a connection in use after an exchange ended abnormally (its late replies would
be taken for the next requests' replies), or call on_state_change or touch stats from the
worker thread (the replica's callback touches asyncio objects).
"""
import asyncio
import logging
import os
import queue
import socket
import threading
import weakref
from typing import Callable, List, Optional, Sequence

from ..core import CloseLink, CloseRun
from ..errors import SmrdError
from ..framing import MODES, FramingError, encode, make_decoder, reply_hints
from ..framing.close import too_large

log = logging.getLogger(__name__)

# smrd.core picks the compiled twin or the pure-Python one; these two are not in its public
# list (nothing but this adapter may use them: they do I/O), hence through its choice directly.

# Back-off between attempts to reach an app that refuses or does not accept connections: 20 ms
# growing by half each time to 1 s, no jitter (one replica talks to one local app; there is no
# herd to spread). An app starting beside its replica (a pod starts its containers at once) is
# found within half its start-up time; the cap keeps a restarted app in use within 1 s while
# costing a down app one connect a second.
# Until the app has answered once it is most likely still starting: retry at most every 100 ms.
BACKOFF_INITIAL_S = 0.02
BACKOFF_MAX_S = 1.0
BACKOFF_FIRST_MAX_S = 0.1
BACKOFF_GROWTH = 1.5

StateCallback = Callable[[bool, str], None]

_sleep = asyncio.sleep  # the back-off's only clock; tests replace it to check the delays exactly


class AppError(SmrdError):
    """execute() could not get every reply; how far it got is exact.

    ``replies_so_far``: the app's replies to ``requests[:len(replies_so_far)]``; those ran.
    ``executed_unknown``: indexes of the requests that were written to the app but whose replies
    did not arrive complete; the app may or may not have executed them. Always the contiguous run
    starting at ``len(replies_so_far)``.
    ``not_written``: indexes of the remaining requests; the app never received them.
    """

    def __init__(self, reason: str, executed_unknown: Sequence[int] = (),
                 replies_so_far: Sequence[bytes] = (), not_written: Sequence[int] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.executed_unknown = list(executed_unknown)
        self.replies_so_far = list(replies_so_far)
        self.not_written = list(not_written)

    def __str__(self) -> str:
        unknown = self.executed_unknown
        span = (f"requests {unknown[0]}..{unknown[-1]} may or may not have run" if unknown
                else "no request in doubt")
        return f"{self.reason} ({len(self.replies_so_far)} replies received, {span})"


class AppConnectionLost(AppError):
    """The connection dropped, or the app stopped answering within timeout_s, after requests
    were written: those in ``executed_unknown`` are in doubt."""


class AppUnverified(AppError):
    """Raised by on_connect: the connection cannot be trusted (nothing can tell which process
    accepted it). Nothing was written on it: execute() drops it and tries again with back-off,
    as after a connect that failed."""


class AppProtocolError(AppError):
    """The app broke the framing contract: a reply over max_reply_bytes, bytes the mode cannot
    parse, or more replies than requests. The connection is closed; requests in
    ``executed_unknown`` are in doubt as with AppConnectionLost."""


class _Connection(asyncio.Protocol):
    """One TCP connection to the app. Bytes go straight from data_received into the mode's
    decoder: no StreamReader copy, and reading never pauses while a pipelined window is written,
    so an app blocked writing replies can never deadlock against us blocked writing requests."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.transport: Optional[asyncio.Transport] = None
        self.replies: List[bytes] = []  # the current execute()'s list: decoded replies land here
        self.outstanding = 0            # requests written whose replies are not decoded yet
        self.ended = False              # no further byte will come (EOF or connection lost)
        self.lost_reason = ""           # why it ended while replies were still owed
        # An HTTP reply asked to close (Connection: close, HTTP/1.0 without keep-alive) before
        # any EOF. Only then are the requests after it known not to have run; the decoder's
        # ``finished`` alone also turns true at any EOF, when they are in doubt.
        self.closed_by_reply = False
        self.protocol_error: Optional[str] = None
        self._waiter: Optional[asyncio.Future] = None

    @property
    def usable(self) -> bool:
        return (not self.ended and self.protocol_error is None and not self.decoder.finished
                and self.transport is not None and not self.transport.is_closing())

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.protocol_error is not None:
            return
        if self.outstanding == 0 and not self.decoder.finished:
            # A reply to no request: the app answered something twice or out of turn; whatever
            # we would pair it with next would be the wrong request's reply.
            self._fail("the app sent bytes while no request was outstanding")
            return
        try:
            replies = self.decoder.feed(data)
        except FramingError as exc:
            self._fail(f"bad reply from the app: {exc}")
            return
        if replies:
            if len(replies) > self.outstanding:
                self._fail(f"the app sent {len(replies)} replies to {self.outstanding} requests")
                return
            self.replies += replies
            self.outstanding -= len(replies)
            if self.decoder.finished:
                self.closed_by_reply = True
            self._wake()
        if self.decoder.error is not None:  # deferred behind the good replies just taken
            self._fail(f"bad reply from the app: {self.decoder.error}")

    def eof_received(self) -> bool:
        if self.protocol_error is None:
            try:
                replies = self.decoder.eof()
            except FramingError as exc:
                # EOF inside a reply is a drop, not a malformed reply: the app (or its host) went
                # away mid-answer, like any other lost connection.
                self.lost_reason = f"the app closed the connection mid-reply ({exc})"
            else:
                if len(replies) > self.outstanding:
                    self._fail(
                        f"the app sent {len(replies)} replies to {self.outstanding} requests")
                else:
                    self.replies += replies
                    self.outstanding -= len(replies)
        self.ended = True
        if not self.lost_reason:
            self.lost_reason = "the app closed the connection"
        self._wake()
        return False  # close our side too: nothing more can be exchanged on this connection

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.ended:
            self.ended = True
            self.lost_reason = (f"connection to the app lost: {exc}" if exc is not None
                                else "the app closed the connection")
        self._wake()

    def _fail(self, reason: str) -> None:
        self.protocol_error = reason
        if self.transport is not None:
            self.transport.abort()  # unsynchronisable: never read another byte from it
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(self, timeout: float) -> None:
        """Until replies arrive, the connection ends or fails, or timeout seconds pass."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # never linger: a late reply must not reach anyone


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(False)


# -- close mode's worker thread ----------------------------------------------------------------
#
# Close mode runs its exchanges in one worker thread per adapter, a whole execute() call per hop
# to it, and within the hop in smrd.core's CloseLink: compiled code that holds no GIL from one
# connection to the next (smrd/_core_close.pxi; smrd/_core_py.py is its pure-Python twin). Driven
# by the event loop a connection cost about twice the kernel's own work for it again in Python,
# and in Python in the thread still about as much again, much of it taking the GIL back after
# every system call while the event loop ran. The hop between threads (two wake-ups) is paid once
# per call, not per request. A bare thread fed by a SimpleQueue, not a ThreadPoolExecutor: its
# futures, locks and conditions made each hop cost about twice as much. The thread decides
# nothing: CloseLink reports what happened in a CloseRun and the event loop acts on it (state
# callbacks, stats, the back-off sleeps, the errors), so those stay on the loop and the back-off
# stays cancellable.
#
# Within a hop, while the app works on one request the next request's connection is opened
# (CLOSE_CONNECT_AHEAD): the app may accept it meanwhile but receives nothing on it until the
# reply before is complete, when it is verified (on_connect, below) like any other, checked for
# an app that closed it meanwhile, and only then written. One that is not used is reset, never
# closed with a FIN: the app would read that as the empty request.

CLOSE_CONNECT_AHEAD = True
# on_connect may vouch for the listening sockets it found; for this long CloseLink verifies the
# connections after it with the kernel's exact listener lookup against those (a hash lookup,
# ~3 µs) instead of calling on_connect (a dump of every listener, ~30 µs, and the GIL). Any other
# answer goes back to on_connect at once; the bound only caps how long a change the lookup cannot
# see (a second listener elsewhere on the port) goes unnoticed: at most this, within one hop.
CLOSE_RECHECK_S = 0.05


def _worker_loop(jobs: "queue.SimpleQueue") -> None:
    """The worker thread: runs jobs in order and hands each outcome to its event loop."""
    while True:
        job = jobs.get()
        if job is None:
            return
        loop, future, func, args = job
        job = None
        try:
            outcome = (func(*args), None)
        except BaseException as exc:  # a bug: it belongs to the awaiting coroutine
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting
        loop = future = func = args = outcome = None


def _settle(future: asyncio.Future, outcome) -> None:
    if not future.done():  # cancelled: the caller stopped waiting
        result, exc = outcome
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


def _addresses(host: str, port: int):
    """Addresses to try, or why there are none. A numeric host needs no lookup; a name is looked
    up once per hop (getaddrinfo costs tens of microseconds even for a literal)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return [(family, (host, port))]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return exc.strerror or str(exc)
    found = [(family, sockaddr) for family, _, _, _, sockaddr in infos
             if family in (socket.AF_INET, socket.AF_INET6)]
    return found[:8] or f"no IPv4 or IPv6 address for {host}"


def _why(detail) -> str:
    """An errno from CloseLink as Python words it (OSError.strerror), or its own words."""
    return os.strerror(detail) if isinstance(detail, int) else str(detail)


class AppAdapter:
    """Executes requests on the local app, in order, and returns its replies.

    ``execute`` is not reentrant: the caller owns the order, so a second concurrent call is a bug
    and raises RuntimeError. ``timeout_s`` bounds a connect and the wait for the next reply (not
    a whole window: a pipelined app must answer something every timeout_s; in close mode, the
    writing of a request and its whole reply). ``ready`` is True while the app answered the last
    attempt; ``on_state_change(ready, reason)`` is called once per change (the first outcome
    counts as one). ``close()`` during an execute() in close mode lets the exchange under way
    finish, writes nothing more, and that execute() raises RuntimeError.
    """

    def __init__(self, host: str, port: int, mode: str, timeout_s: float = 5.0,
                 max_reply_bytes: int = 64 << 20, pipeline: int = 64,
                 on_state_change: Optional[StateCallback] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown framing mode {mode!r}; expected one of {MODES}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        if pipeline < 1:
            raise ValueError(f"pipeline must be at least 1, not {pipeline!r}")
        make_decoder(mode, max_reply_bytes, "response")  # validates max_reply_bytes
        self.host = host
        self.port = port
        self.mode = mode
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self.pipeline = pipeline
        self.on_state_change = on_state_change
        # Called after every new connection, before anything is written on it; the replica uses
        # it to check that the app is still the process it has been feeding. What it raises
        # comes out of execute() as it is (AppUnverified: the connection is dropped and tried
        # again with back-off). In close mode it runs in the worker thread: it must not touch the
        # event loop or anything the loop may change meanwhile; and it may return the inodes of
        # the listening sockets it found good, which lets the connections after it within the
        # same call be verified against those by the kernel's exact listener lookup for up to
        # CLOSE_RECHECK_S instead of calling it (any other answer calls it again).
        self.on_connect: Optional[Callable[[], Optional[frozenset]]] = None
        self.stats = {"requests": 0, "connections": 0, "reconnects": 0, "retries": 0,
                      "timeouts": 0, "errors": 0}
        self._state: Optional[bool] = None  # None until the first attempt has an outcome
        self._conn: Optional[_Connection] = None
        self._busy = False
        self._closed = False
        self._jobs: Optional[queue.SimpleQueue] = None  # close mode's worker thread takes these
        self._run: Optional[CloseRun] = None  # the latest hop to it
        self._link = None  # close mode: the worker thread's CloseLink, kept between hops

    @property
    def ready(self) -> bool:
        return self._state is True

    async def execute(self, requests: Sequence[bytes]) -> List[bytes]:
        """The app's replies to ``requests``, in order. Retries (with back-off) while the app is
        down; raises AppConnectionLost / AppProtocolError when a written request lost its reply.
        Raises FramingError, before writing anything, for a request the mode cannot carry (a
        newline in line mode, not an HTTP request in http mode): that is the caller's bug."""
        if self._closed:
            raise RuntimeError("AppAdapter.execute() after close()")
        if self._busy:
            raise RuntimeError("AppAdapter.execute() is not reentrant: the caller owns the order")
        if not requests:
            return []
        mode = self.mode
        encoded = [encode(mode, r) for r in requests]
        methods = reply_hints(mode, requests)  # http: methods; resp: replies per request
        self._busy = True
        try:
            if mode == "close":
                replies = await self._execute_close(encoded)
            else:
                replies = await self._execute_persistent(encoded, methods)
        finally:
            self._busy = False
        self.stats["requests"] += len(replies)
        return replies

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self._run is not None:
            self._run.stop = True  # the worker ends the exchange it is in, within timeout_s
        if self._jobs is not None:
            self._jobs.put(None)  # then it ends

    async def __aenter__(self) -> "AppAdapter":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- persistent modes: line, length, http ---------------------------------------------------

    async def _execute_persistent(self, encoded: List[bytes], methods) -> List[bytes]:
        n = len(encoded)
        replies: List[bytes] = []
        while len(replies) < n:
            conn = self._conn
            if conn is None or not conn.usable:
                if conn is not None:
                    if conn.protocol_error is not None and conn.outstanding == 0 and not replies:
                        # Bytes arrived while idle: the app broke the contract between calls.
                        # Nothing of this call was written, so the caller may simply retry.
                        self._conn = None
                        self._fail_state(conn.protocol_error)
                        raise self._error(AppProtocolError, conn.protocol_error, encoded, [], 0)
                    # Ended with nothing owed (closed while idle, or after an HTTP response that
                    # closes): nothing is in doubt, a new connection carries on.
                    self.stats["reconnects"] += 1
                    self._conn = None
                conn = self._conn = await self._connect()
                if self.on_connect is not None:
                    try:
                        self.on_connect()  # may raise (the app restarted): nothing written yet
                    except AppUnverified as exc:
                        self._conn = None
                        conn.close()
                        await self._unverified(str(exc))
                        continue
            try:
                await self._exchange(conn, encoded, methods, replies)
            except BaseException:
                # Replies still owed on this connection would arrive later and be taken for the
                # next call's replies: the connection dies with the exchange (also on cancel).
                if self._conn is conn:
                    self._conn = None
                conn.close()
                raise
        return replies

    async def _exchange(self, conn: _Connection, encoded: List[bytes], methods,
                        replies: List[bytes]) -> None:
        """Runs requests from len(replies) on over conn, appending replies, until all are answered
        or the connection ends with nothing owed (the caller reconnects). Raises when requests
        are in doubt."""
        n = len(encoded)
        pipeline = self.pipeline
        # Refill the window only once half of it is free: one write of many requests instead of
        # a write per reply (a window of 1 still works: it refills when nothing is outstanding).
        refill_at = pipeline // 2
        conn.replies = replies
        written = len(replies)
        transport = conn.transport
        while True:
            answered = len(replies)
            if conn.protocol_error is not None:
                self._fail_state(conn.protocol_error)
                raise self._error(AppProtocolError, conn.protocol_error, encoded, replies, written)
            if conn.closed_by_reply:
                # An HTTP response that closes the connection. RFC 9112 §9.6: the server must not
                # process any request received after it, so what followed on this connection was
                # not executed and goes again on a new one. (A response delimited by the close
                # itself gives no such promise: requests pipelined behind it are in doubt, so an
                # app that answers that way needs pipeline=1.)
                conn.outstanding = 0
                conn.close()
                return
            if conn.ended:
                if written > answered:
                    self._fail_state(conn.lost_reason)
                    raise self._error(AppConnectionLost, conn.lost_reason, encoded, replies,
                                      written)
                return
            if answered == n:
                return
            if written < n and written - answered <= refill_at:
                end = min(n, answered + pipeline)
                if methods is not None:
                    expect = conn.decoder.expect
                    for method in methods[written:end]:
                        expect(method)  # a response to HEAD has no body; a MULTI block, N
                conn.outstanding += end - written
                transport.write(b"".join(encoded[written:end]) if end - written > 1
                                else encoded[written])
                written = end
            await conn.wait(self.timeout_s)
            if len(replies) > answered:
                if self._state is not True:
                    self._set_state(True, "the app answered")
            elif not conn.ended and conn.protocol_error is None and not conn.closed_by_reply:
                self.stats["timeouts"] += 1
                reason = f"no reply from the app within {self.timeout_s:g} s"
                self._fail_state(reason)
                raise self._error(AppConnectionLost, reason, encoded, replies, written)

    # -- close mode: one connection per request, strictly one at a time -------------------------

    async def _execute_close(self, encoded: List[bytes]) -> List[bytes]:
        loop = asyncio.get_running_loop()
        jobs = self._jobs
        if jobs is None:
            jobs = self._jobs = queue.SimpleQueue()
            # A daemon: exiting never waits for an app that does not answer (an exchange under
            # way is abandoned then, as in a crash).
            threading.Thread(target=_worker_loop, args=(jobs,), name="smrd-app-close",
                             daemon=True).start()
            weakref.finalize(self, jobs.put, None)  # the thread ends with an adapter not closed
        replies: List[bytes] = []
        delay = BACKOFF_INITIAL_S
        host, port = self.host, self.port
        while True:
            if self._closed:  # close() during a back-off: the worker is gone
                raise RuntimeError("AppAdapter.close() during execute()")
            run = self._run = CloseRun()
            before = len(replies)
            done = loop.create_future()
            # One worker, so a hop still finishing the exchange it was in when its caller was
            # cancelled is over before this one starts: never two requests at once.
            jobs.put((loop, done, self._close_hop, (encoded, replies, run)))
            try:
                await done
            except BaseException:
                run.stop = True  # cancelled: the thread writes nothing more
                raise
            finally:
                self.stats["connections"] += run.connections
                if len(replies) > before and self._state is not True:
                    self._set_state(True, "the app answered")
            failed = None
            if run.raised is not None:
                exc, run.raised = run.raised, None
                if not isinstance(exc, AppUnverified):
                    raise exc  # on_connect's, as it raised it: nothing written on that connection
                failed = str(exc)  # as a failed connect: retried with back-off
            if run.timed_out:
                self.stats["timeouts"] += 1
            if run.lost is not None:
                kind, detail = run.lost
                if kind == "timeout":
                    cls = AppConnectionLost
                    reason = f"no reply from the app within {self.timeout_s:g} s"
                elif kind == "too-large":
                    cls = AppProtocolError
                    reason = f"bad reply from the app: {too_large(self.max_reply_bytes, detail)}"
                elif isinstance(detail, int):
                    cls = AppConnectionLost
                    reason = f"connection to the app lost: {OSError(detail, os.strerror(detail))}"
                else:
                    cls, reason = AppConnectionLost, f"connection to the app lost: {detail}"
                self._fail_state(reason)
                raise self._error(cls, reason, encoded, replies, len(replies) + 1)
            if run.failed is not None:
                kind, detail = run.failed
                if kind == "connect-timeout":
                    failed = f"connect to {host}:{port} timed out after {self.timeout_s:g} s"
                elif kind == "closed":
                    # Accepted and closed before we wrote a byte: nothing can have run.
                    failed = f"{host}:{port} closed the connection at once"
                else:
                    failed = f"cannot connect to {host}:{port}: {_why(detail)}"
            if failed is None:
                if len(replies) < len(encoded):  # stopped by close()
                    raise RuntimeError("AppAdapter.close() during execute()")
                return replies
            if len(replies) > before:
                delay = BACKOFF_INITIAL_S  # the first failed connect of a new request
            self._fail_state(failed, count=False)
            self.stats["retries"] += 1
            log.debug("app not reachable (%s); retrying in %.2f s", failed, delay)
            await _sleep(delay)
            cap = BACKOFF_MAX_S if self.stats["connections"] else BACKOFF_FIRST_MAX_S
            delay = min(delay * BACKOFF_GROWTH, cap)

    def _close_hop(self, encoded: List[bytes], replies: List[bytes], run) -> None:
        """Worker thread: exchanges from request len(replies) on (CloseLink.exchange). Reads the
        adapter's settings, writes nothing of it but the link it keeps for the next hop."""
        addresses = _addresses(self.host, self.port)
        if isinstance(addresses, str):
            run.failed = ("connect", addresses)
            return
        link = self._link
        if link is None or link.addresses != addresses:
            link = self._link = CloseLink(addresses, self.timeout_s, self.max_reply_bytes,
                                          CLOSE_RECHECK_S, CLOSE_CONNECT_AHEAD)
        link.exchange(encoded, replies, run, self.on_connect)

    # -- connecting, state, errors ----------------------------------------------------------------

    async def _connect(self) -> _Connection:
        """Persistent modes: a fresh connection, retrying with back-off for as long as it takes
        (or until the caller cancels). Safe to retry: nothing has been written on a connection
        that failed here."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_INITIAL_S
        while True:
            conn = _Connection(make_decoder(self.mode, self.max_reply_bytes, "response"))
            try:
                async with asyncio.timeout(self.timeout_s):  # no extra task, unlike wait_for
                    await loop.create_connection(lambda: conn, self.host, self.port)
            except TimeoutError:
                self.stats["timeouts"] += 1
                reason = f"connect to {self.host}:{self.port} timed out after {self.timeout_s:g} s"
            except OSError as exc:
                reason = f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            else:
                self.stats["connections"] += 1
                if conn.usable:
                    return conn
                # Accepted and closed before we wrote a byte: nothing can have run.
                conn.close()
                reason = f"{self.host}:{self.port} closed the connection at once"
            self._fail_state(reason, count=False)
            self.stats["retries"] += 1
            log.debug("app not reachable (%s); retrying in %.2f s", reason, delay)
            await _sleep(delay)
            cap = BACKOFF_MAX_S if self.stats["connections"] else BACKOFF_FIRST_MAX_S
            delay = min(delay * BACKOFF_GROWTH, cap)

    async def _unverified(self, reason: str) -> None:
        # One back-off step: the app that accepted is going away, a new one is not up yet.
        self._fail_state(reason, count=False)
        self.stats["retries"] += 1
        log.debug("app connection not verified (%s); retrying in %.2f s", reason, BACKOFF_INITIAL_S)
        await _sleep(BACKOFF_INITIAL_S)

    def _set_state(self, ready: bool, reason: str) -> None:
        if self._state is ready:
            return
        self._state = ready
        log.debug("app %s:%d %s: %s", self.host, self.port, "ready" if ready else "not ready",
                  reason)
        if self.on_state_change is not None:
            try:
                self.on_state_change(ready, reason)
            except Exception:  # a broken observer must not break execution
                log.exception("on_state_change callback failed")

    def _fail_state(self, reason: str, count: bool = True) -> None:
        if count:
            self.stats["errors"] += 1
        self._set_state(False, reason)

    @staticmethod
    def _error(cls, reason: str, encoded: List[bytes], replies: List[bytes],
               written: int) -> AppError:
        answered = len(replies)
        return cls(reason, executed_unknown=range(answered, written),
                   replies_so_far=list(replies), not_written=range(written, len(encoded)))
