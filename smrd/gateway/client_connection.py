"""One outside client's TCP connection to the gateway: as an asyncio Protocol (ClientConnection),
and in close framing on bare non-blocking sockets (CloseServer, at the end: why there).

Owns: decoding the client's requests, handing each to the gateway, and writing the replies back
in request order (pipelined clients rely on it), each as soon as it and every reply before it
are ready; ending the connection the way its framing says (close mode: the reply, then a
half-close; after a malformed request: an error reply, then a half-close, and the close once
the client closes or LINGER_S passes); back-pressure (a client that does not read its replies,
or has MAX_PIPELINED requests unanswered, stops being read).
Never: orders or retries anything (the gateway does), or writes a reply out of order.

Why a Protocol and not streams: this is the gateway's per-request path. A StreamReader, a
writer task per connection and an awaited drain per reply cost about a third of the gateway's
CPU per request; here a request is one data_received call and a reply one done-callback.
"""
import asyncio
import logging
import socket
from collections import deque

from ..framing import FramingError, MessageTooLarge, encode, error_reply, make_decoder, state_rules
from ..framing.close import too_large
from ..ops import trace

log = logging.getLogger(__name__)

# How long a connection we have finished answering waits for the client to close its side.
LINGER_S = 2.0
# Requests one connection may have unanswered before we stop reading it: a client pipelining
# without bound must not grow the gateway's memory (the gateway's own window bounds only what is
# in flight to the replicas, not what waits for it).
MAX_PIPELINED = 1024


class ClientConnection(asyncio.Protocol):
    """One per accepted connection; the gateway's server creates them (``Gateway.run``)."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.mode = gateway.mode
        self.decoder = make_decoder(self.mode, gateway.settings.max_request_bytes, "request")
        # The framing's per-connection state rules (resp: MULTI blocks, refused commands), applied
        # before anything is ordered; None in modes without any (smrd.framing.rules).
        self.rules = state_rules(self.mode, self.decoder, gateway.reply_for,
                                 gateway.settings.max_request_bytes)
        self.transport = None
        # Replies in request order: bytes, or what completes with the reply (the gateway's
        # future-like Call, or a Task).
        self.pending = deque()
        self.ending = False       # no further request is read; close once pending is written
        self.closed = False
        self.peer_done = False    # the client half-closed (EOF received)
        self._write_paused = False
        self._pipeline_full = False
        self._linger = None       # the timer that closes a half-closed connection

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport):
        self.transport = transport
        self.gateway.stats["connections"] += 1

    def data_received(self, data):
        if self.ending:
            return
        decoder = self.decoder
        try:
            requests = decoder.feed(data)
        except FramingError as e:
            self._malformed(e)
            return
        self._take(requests)
        if not self.ending:
            if decoder.error is not None:
                self._malformed(decoder.error)  # deferred behind the good requests above
            elif decoder.finished:
                self._end()

    def eof_received(self):
        self.peer_done = True
        if self._linger is not None:
            self.transport.close()  # we were only waiting for the client to finish
            return True
        if not self.ending:
            try:
                self._take(self.decoder.eof())
            except FramingError as e:
                self._malformed(e)
                return True
            self._end()
        return True  # keep our side open: replies still owed are written before we close

    def connection_lost(self, exc):
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        self.pending.clear()  # nobody to answer; the requests themselves complete regardless

    def pause_writing(self):
        # The client does not read its replies: stop reading its requests until it does.
        self._write_paused = True
        if not self.ending and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self):
        self._write_paused = False
        if (not self.ending or self._linger is not None) and not self.closed and not self._pipeline_full:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ requests in

    def _take(self, requests):
        gateway = self.gateway
        reply_for = gateway.reply_for
        if self.rules is not None:
            requests, reply_for = self.rules.take(requests), self.rules.reply_for
        for request in requests:
            if gateway.stopping.is_set():
                # Draining: what is in flight is answered, nothing new is taken. This request
                # was never ordered, so the client may safely send it to another gateway.
                self._end()
                break
            item = reply_for(request)
            self.pending.append(item)
            if not isinstance(item, bytes):
                item.add_done_callback(self._reply_ready)
            if self.mode == "close" or self.decoder.wants_close:
                self._end()
                break
        if len(self.pending) >= MAX_PIPELINED and not self.ending and not self._pipeline_full:
            self._pipeline_full = True
            self.transport.pause_reading()  # resumed by _write_ready once half are answered
        head = self.pending[0] if self.pending else None
        if head is not None and (isinstance(head, bytes) or head.done()):
            self._write_ready()  # else the head's done-callback writes, when it completes

    def _malformed(self, e):
        what = "request too large" if isinstance(e, MessageTooLarge) else "malformed request"
        self.gateway.stats["errors"] += 1
        self.pending.append(error_reply(self.mode, f"{what}: {e}", status=getattr(e, "status", 400),
                                        close=True))
        self._end()
        self._write_ready()

    def _end(self):
        if not self.ending:
            self.ending = True
            if not self.closed:
                self.transport.pause_reading()
            self._write_ready()

    # ------------------------------------------------------------------ replies out

    def _reply_ready(self, _future):
        self._write_ready()

    def _write_ready(self):
        if self.closed:
            return
        pending = self.pending
        transport = self.transport
        mode = self.mode
        out = []
        while pending:
            head = pending[0]
            if isinstance(head, bytes):
                reply = head
            elif not head.done():
                break
            elif head.cancelled():
                reply = error_reply(mode, "gateway shutting down", status=503)
            else:
                e = head.exception()
                if e is None:
                    reply = head.result()
                else:
                    reply = error_reply(mode, str(e), status=503)
            pending.popleft()
            if trace.ON and not isinstance(head, bytes):
                trace.stamp("gw_write", getattr(head, "key", None))
            try:
                out.append(encode(mode, reply))
            except FramingError as e:
                # A reply this framing cannot carry (a newline in line mode): the stream cannot
                # go on in order, so the connection ends here.
                log.debug("client connection ended: reply cannot be framed: %s", e)
                pending.clear()
                self.ending = True
                break
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._pipeline_full and len(pending) <= MAX_PIPELINED // 2:
            self._pipeline_full = False
            if not self.ending and not self._write_paused:
                transport.resume_reading()
        if self.ending and not pending and self._linger is None:
            self._finish()

    def _finish(self):
        # Everything owed is written. Half-close, so the client reads all of it and then EOF,
        # and close once the client closes too. A client still sending (a request cut off as too
        # large, or pipelined past an error) is read and ignored meanwhile: closing with its
        # bytes unread would send a reset, which can destroy the replies before it reads them.
        transport = self.transport
        if self.peer_done or not transport.can_write_eof():
            transport.close()
            self.closed = True
            return
        transport.write_eof()
        transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, transport.close)


# ------------------------------------------------------------------ close framing's server
#
# In close framing every request is a whole connection's life, and on asyncio's transports that
# life (a Task per accept, a transport and this protocol, selector registrations, TCP_NODELAY, a
# loop turn to close) cost about 65 µs of CPU per request where bare non-blocking sockets need
# about 25 (one process each, 64 closed-loop clients, side by side). CloseServer serves close
# framing that way, with ClientConnection's behaviour for it: a connection is a socket and a
# _CloseClient; it is read at once when accepted (a client has usually sent its request and
# half-closed by then, so most connections never enter the selector), answered with one send
# once the reply is there, and closed. The Gateway starts it instead of a Protocol server in
# close framing (serve_close).

ACCEPTS_PER_TURN = 64  # connections taken per readiness of the listener: the loop has other work
RECV_BYTES = 1 << 16


async def serve_close(gateway, host, port) -> "CloseServer":
    """Listen on host:port as loop.create_server does (every address it resolves to, SO_REUSEADDR,
    IPv6 sockets IPv6-only, a backlog of 100) and serve close framing there."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    socks, seen = [], set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address "
                                       f"{address!r}: {e.strerror}") from None
            sock.listen(100)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return CloseServer(gateway, loop, socks)


class CloseServer:
    """Serves close framing on listening sockets; ``close()`` stops listening (connections under
    way are still answered), as asyncio's Server does."""

    def __init__(self, gateway, loop, socks):
        self.gateway = gateway
        self.loop = loop
        self.sockets = socks
        self.max_request = gateway.settings.max_request_bytes
        for sock in socks:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self):
        socks, self.sockets = self.sockets, []
        for sock in socks:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, listener):
        stats = self.gateway.stats
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors or memory, or a client gone before it was taken: the next
                # readiness tries again (asyncio's server logs these and carries on too).
                log.debug("accept failed: %s", e)
                return
            stats["connections"] += 1
            sock.setblocking(False)
            _CloseClient(self, sock).read()


class _CloseClient:
    """One close-framing connection: its request, then its reply (ClientConnection's contract)."""

    __slots__ = ("server", "sock", "buf", "reading", "lingering", "call", "out")

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.buf = bytearray()
        self.reading = False     # registered with the selector for reading
        self.lingering = None    # after a refusal: the timer that closes it
        self.call = None         # what completes with the reply
        self.out = None          # what is left to send, while the client is not reading

    def read(self):
        sock, buf = self.sock, self.buf
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                if not self.reading:
                    self.reading = True
                    self.server.loop.add_reader(sock.fileno(), self.read)
                return
            except OSError:
                self._close()  # reset by the client: nobody to answer
                return
            if not data:
                break
            if self.lingering is not None:
                continue  # what the client still sends after a refusal is read and dropped
            if len(buf) + len(data) > self.server.max_request:
                self._refuse(too_large(self.server.max_request, len(buf) + len(data)))
                continue
            buf += data
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(sock.fileno())
        if self.lingering is not None:
            self._close()  # the client finished: the refusal was read
            return
        gateway = self.server.gateway
        if not buf or gateway.stopping.is_set():
            # Connected and closed without a byte (a health probe): no request. Draining: this
            # request was never ordered, so the client may safely send it to another gateway.
            self._close()
            return
        item = gateway.reply_for(bytes(buf))
        self.buf = None
        if isinstance(item, bytes):
            self._send(encode("close", item))
        elif item.done():
            self._reply_ready(item)
        else:
            self.call = item
            item.add_done_callback(self._reply_ready)

    def _reply_ready(self, head):
        self.call = None
        if head.cancelled():
            reply = error_reply("close", "gateway shutting down", status=503)
        else:
            e = head.exception()
            reply = head.result() if e is None else error_reply("close", str(e), status=503)
        if trace.ON:
            trace.stamp("gw_write", getattr(head, "key", None))
        self._send(encode("close", reply))

    def _send(self, data):
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close()  # the client went away
            return
        if sent == len(data):
            self._close()  # the reply, then the FIN: the client has half-closed already
            return
        self.out = memoryview(data)[sent:]
        self.server.loop.add_writer(self.sock.fileno(), self._send_rest)

    def _send_rest(self):
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = None
        if sent is not None and sent < len(self.out):
            self.out = self.out[sent:]
            return
        self.server.loop.remove_writer(self.sock.fileno())
        self.out = None
        self._close()

    def _refuse(self, e):
        # As ClientConnection._malformed: an error reply, a half-close, and the close once the
        # client closes too or LINGER_S passes; closing with its bytes unread would send a reset,
        # which can destroy the reply before it is read.
        self.server.gateway.stats["errors"] += 1
        self.buf = None
        reply = error_reply("close", f"request too large: {e}", status=e.status, close=True)
        try:
            self.sock.send(reply)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.lingering = self.server.loop.call_later(LINGER_S, self._close)

    def _close(self):
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.sock.fileno())
        if self.lingering is not None:
            self.lingering.cancel()
        self.sock.close()
