"""A client for the hashmap grammar (smrd/apps/hashmap.py), spoken either to the app itself or to an
smrd gateway in front of it: a CLI plus a small importable API (KVClient, AsyncKVClient) that the
end-to-end tests record histories with. It owns request building, reply parsing and the retry
rule. It must never retry a request that may already have reached the server unless it is
read-only or the caller opted in (a second PUT/REMOVE could run twice), and it must never turn a
lost reply into a made-up answer: callers get KVNoReply and must treat the request as "maybe
done". Like the app, it imports nothing from smrd.

Retry rule (CLI): a failure before any byte was sent (connection refused, connect timeout) is
always retried, up to --retries. A failure after the request may have been sent (no reply in
time, reset, early close) is retried only for the read-only commands GET, SIZE, SCAN and SNAPSHOT,
or for any command with --retry-writes. Between attempts the client backs off exponentially.
"""
import argparse
import asyncio
import random
import select
import socket
import sys
import threading
import time
from typing import Dict, Optional, Sequence, Tuple, Union

FRAMINGS = ("line", "close")
READ_ONLY_COMMANDS = frozenset({"GET", "SIZE", "SCAN", "SNAPSHOT"})
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
READ_CHUNK = 64 * 1024
REPLY_TOO_LARGE = b"ERR request too large"  # the app closes a line connection after sending it

Text = Union[str, bytes]


class KVError(Exception):
    """Base of the client's errors."""


class KVUnavailable(KVError):
    """No connection could be made: the request was certainly not sent."""


class KVNoReply(KVError):
    """The request may have been sent but no reply came (timeout, reset, closed early): it may or
    may not have taken effect."""


class KVReplyError(KVError):
    """The server answered `ERR ...`; the request was understood as invalid."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply.decode("utf-8", "replace"))
        self.reply = reply


class KVProtocolError(KVError):
    """A reply that does not fit the grammar for the request that was sent."""


# -- request building and reply parsing: shared by both clients, no I/O ---------------------------

def _token(value: Text, what: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if data.split() != [data]:
        raise ValueError(f"{what} must be a non-empty token without whitespace, got {value!r}")
    return data


def _text(data: bytes) -> str:
    # surrogateescape: any byte string a server holds round-trips through str unchanged.
    return data.decode("utf-8", "surrogateescape")


def _check_error(reply: bytes) -> None:
    if reply == b"ERR" or reply.startswith(b"ERR "):
        raise KVReplyError(reply)


def parse_ok(reply: bytes) -> None:
    _check_error(reply)
    if reply != b"OK":
        raise KVProtocolError(f"expected OK, got {reply[:80]!r}")


def parse_get(reply: bytes) -> Optional[str]:
    _check_error(reply)
    if reply == b"NOT_FOUND":
        return None
    if reply.startswith(b"VALUE ") and len(reply) > 6:
        return _text(reply[6:])
    raise KVProtocolError(f"expected VALUE or NOT_FOUND, got {reply[:80]!r}")


def parse_remove(reply: bytes) -> bool:
    _check_error(reply)
    if reply == b"OK":
        return True
    if reply == b"NOT_FOUND":
        return False
    raise KVProtocolError(f"expected OK or NOT_FOUND, got {reply[:80]!r}")


def history_output(request: str, reply: bytes):
    """What a linearizability history (smrd.testing.linearizability) records as the output of a
    completed PUT, GET or REMOVE: the value read, whether a key was removed, or None."""
    if request.startswith("GET"):
        return parse_get(reply)
    if request.startswith("REMOVE"):
        return parse_remove(reply)
    return None


def parse_size(reply: bytes) -> int:
    _check_error(reply)
    tokens = reply.split()
    if len(tokens) == 2 and tokens[0] == b"SIZE" and tokens[1].isdigit():
        return int(tokens[1])
    raise KVProtocolError(f"expected SIZE <n>, got {reply[:80]!r}")


def parse_scan(reply: bytes) -> Dict[str, str]:
    """Both layouts (one line, or one item per line) split the same way on whitespace."""
    _check_error(reply)
    tokens = reply.split()
    if len(tokens) < 2 or tokens[0] != b"SCAN" or not tokens[1].isdigit():
        raise KVProtocolError(f"expected SCAN <n> ..., got {reply[:80]!r}")
    count = int(tokens[1])
    items = tokens[2:]
    if len(items) != 2 * count:
        raise KVProtocolError(f"SCAN announced {count} items but carried {len(items) / 2:g}")
    return {_text(items[i]): _text(items[i + 1]) for i in range(0, len(items), 2)}


def parse_snapshot(reply: bytes) -> str:
    _check_error(reply)
    tokens = reply.split()
    if len(tokens) == 2 and tokens[0] == b"SNAPSHOT":
        return tokens[1].decode("ascii")
    raise KVProtocolError(f"expected SNAPSHOT <base64>, got {reply[:80]!r}")


def _encode_request(request: Text) -> bytes:
    data = request.encode("utf-8", "surrogateescape") if isinstance(request, str) else bytes(request)
    if b"\n" in data or b"\r" in data:
        raise ValueError("a request must be a single line")
    return data


def _strip_terminator(data: bytes) -> bytes:
    if data.endswith(b"\n"):
        data = data[:-1]
    if data.endswith(b"\r"):
        data = data[:-1]
    return data


class _Commands:
    """The typed commands, written once over an abstract `request(bytes) -> bytes`."""

    def _call(self, request: bytes, parse):
        raise NotImplementedError

    def put(self, key: Text, value: Text):
        return self._call(b"PUT " + _token(key, "key") + b" " + _token(value, "value"), parse_ok)

    def get(self, key: Text):
        return self._call(b"GET " + _token(key, "key"), parse_get)

    def remove(self, key: Text):
        return self._call(b"REMOVE " + _token(key, "key"), parse_remove)

    def size(self):
        return self._call(b"SIZE", parse_size)

    def scan(self):
        return self._call(b"SCAN", parse_scan)

    def snapshot(self):
        return self._call(b"SNAPSHOT", parse_snapshot)

    def restore(self, snapshot: Text):
        return self._call(b"RESTORE " + _token(snapshot, "snapshot"), parse_ok)


# -- blocking client ------------------------------------------------------------------------------

class KVClient(_Commands):
    """Blocking client. `line` framing keeps one connection open (reopened after any failure,
    since a late reply would otherwise answer the next request); `close` framing opens one per
    request. Each request has `timeout` seconds in all. One request at a time: a lock serializes
    callers, so share one across threads only if that is what you want; use one per thread for
    concurrency.

    put() -> None, get() -> str | None, remove() -> bool (it existed), size() -> int,
    scan() -> {key: value}, snapshot() -> base64 str, restore(b64) -> None, request(raw) -> bytes.
    Raises KVUnavailable, KVNoReply, KVReplyError, KVProtocolError."""

    def __init__(self, host: str, port: int, framing: str = "line", timeout: float = DEFAULT_TIMEOUT):
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        self.host, self.port, self.framing, self.timeout = host, port, framing, timeout
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _call(self, request: bytes, parse):
        return parse(self.request(request))

    def request(self, request: Text) -> bytes:
        """Send one raw request line; return the reply without its terminator."""
        data = _encode_request(request)
        with self._lock:
            deadline = time.monotonic() + self.timeout
            if self.framing == "close":
                return self._request_close(data, deadline)
            return self._request_line(data, deadline)

    def _connect(self, deadline: float) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=max(deadline - time.monotonic(), 0.001))
        except OSError as exc:
            raise KVUnavailable(f"cannot connect to {self.host}:{self.port}: {_reason(exc)}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _request_close(self, data: bytes, deadline: float) -> bytes:
        sock = self._connect(deadline)
        try:
            _send_all(sock, data + b"\n", deadline)
            sock.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while True:
                chunk = _recv(sock, deadline)
                if not chunk:
                    break
                reply += chunk
        except (OSError, TimeoutError) as exc:
            raise KVNoReply(f"no reply from {self.host}:{self.port}: {_reason(exc)}") from exc
        finally:
            sock.close()
        if not reply:
            raise KVNoReply(f"no reply from {self.host}:{self.port}: connection closed")
        return _strip_terminator(bytes(reply))

    def _request_line(self, data: bytes, deadline: float) -> bytes:
        if self._sock is not None and _is_stale(self._sock):
            self.close()  # the server dropped an idle connection: nothing of ours was in flight
        if self._sock is None:
            self._sock = self._connect(deadline)
        sock = self._sock
        try:
            _send_all(sock, data + b"\n", deadline)
            reply = bytearray()
            while not reply.endswith(b"\n"):
                chunk = _recv(sock, deadline)
                if not chunk:
                    raise ConnectionError("connection closed before the reply")
                if b"\n" in chunk[:-1]:
                    raise KVProtocolError("unexpected bytes after a reply")
                reply += chunk
        except (OSError, TimeoutError) as exc:
            self.close()
            raise KVNoReply(f"no reply from {self.host}:{self.port}: {_reason(exc)}") from exc
        except KVProtocolError:
            self.close()
            raise
        reply = _strip_terminator(bytes(reply))
        if reply == REPLY_TOO_LARGE:
            self.close()  # the server closes after this reply; do not race it with a new request
        return reply


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        sock.settimeout(_remaining(deadline))
        sent = sock.send(view)
        view = view[sent:]


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(_remaining(deadline))
    return sock.recv(READ_CHUNK)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out")
    return remaining


def _is_stale(sock: socket.socket) -> bool:
    """True if an idle line connection cannot carry a request: the server closed it, or sent bytes
    nobody asked for (they would be taken for the next reply)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- asyncio client -------------------------------------------------------------------------------

class AsyncKVClient(_Commands):
    """The same API as KVClient with `await`: `await client.put("a", "1")`. One request at a time
    per client (an asyncio.Lock serializes callers); use one client per concurrent task."""

    def __init__(self, host: str, port: int, framing: str = "line", timeout: float = DEFAULT_TIMEOUT):
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        self.host, self.port, self.framing, self.timeout = host, port, framing, timeout
        self._streams: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        self._lock: Optional[asyncio.Lock] = None

    async def __aenter__(self) -> "AsyncKVClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _call(self, request: bytes, parse):
        return parse(await self.request(request))

    async def request(self, request: Text) -> bytes:
        data = _encode_request(request)
        if self._lock is None:
            self._lock = asyncio.Lock()  # created here so that it binds to the running loop
        async with self._lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            if self.framing == "close":
                return await self._request_close(data, deadline)
            return await self._request_line(data, deadline)

    async def _connect(self, deadline: float):
        try:
            return await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                          _async_remaining(deadline))
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            raise KVUnavailable(f"cannot connect to {self.host}:{self.port}: {_reason(exc)}") from exc

    async def _request_close(self, data: bytes, deadline: float) -> bytes:
        reader, writer = await self._connect(deadline)
        try:
            writer.write(data + b"\n")
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), _async_remaining(deadline))
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            raise KVNoReply(f"no reply from {self.host}:{self.port}: {_reason(exc)}") from exc
        finally:
            writer.close()
        if not reply:
            raise KVNoReply(f"no reply from {self.host}:{self.port}: connection closed")
        return _strip_terminator(reply)

    async def _request_line(self, data: bytes, deadline: float) -> bytes:
        if self._streams is not None and self._streams[0].at_eof():
            await self.close()
        if self._streams is None:
            self._streams = await self._connect(deadline)
        reader, writer = self._streams
        try:
            writer.write(data + b"\n")
            await asyncio.wait_for(writer.drain(), _async_remaining(deadline))
            # readuntil's default 64 KiB limit would refuse big values; read chunks instead.
            reply = bytearray()
            while not reply.endswith(b"\n"):
                chunk = await asyncio.wait_for(reader.read(READ_CHUNK), _async_remaining(deadline))
                if not chunk:
                    raise ConnectionError("connection closed before the reply")
                if b"\n" in chunk[:-1]:
                    raise KVProtocolError("unexpected bytes after a reply")
                reply += chunk
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            await self.close()
            raise KVNoReply(f"no reply from {self.host}:{self.port}: {_reason(exc)}") from exc
        except KVProtocolError:
            await self.close()
            raise
        reply = _strip_terminator(bytes(reply))
        if reply == REPLY_TOO_LARGE:
            await self.close()  # the server closes after this reply; do not race it
        return reply


def _async_remaining(deadline: float) -> float:
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise TimeoutError("timed out")
    return remaining


# -- CLI ------------------------------------------------------------------------------------------

def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvclient",
        description="Send one command to the hashmap app (or an smrd gateway in front of it) and "
                    "print the reply. Exit status: 0 reply printed, 1 no reply (after retries), "
                    "2 bad arguments, 3 the server answered ERR.",
        epilog="Retries: failures before the request was sent (refused, connect timeout) are always "
               "retried; failures after it may have been sent are retried only for GET, SIZE, SCAN "
               "and SNAPSHOT, unless --retry-writes is given (a retried PUT/REMOVE may run twice).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="server address (default %(default)s)")
    parser.add_argument("--port", type=_port, default=7000, help="server port (default %(default)s)")
    parser.add_argument("--framing", choices=FRAMINGS, default="line",
                        help="the server's framing mode (default %(default)s)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="seconds for each attempt (default %(default)s)")
    parser.add_argument("--retries", type=_non_negative_int, default=DEFAULT_RETRIES, metavar="N",
                        help="attempts after the first one (default %(default)s)")
    parser.add_argument("--retry-writes", action="store_true",
                        help="also retry PUT/REMOVE/RESTORE when the request may have reached "
                             "the server")
    parser.add_argument("command", nargs="+", metavar="COMMAND",
                        help="the command and its arguments, e.g. PUT a 1, GET a, SIZE")
    return parser


def _print_reply(reply: bytes) -> None:
    # Bytes as they came: a value need not be valid in the terminal's encoding.
    stdout = getattr(sys.stdout, "buffer", None)
    if stdout is None:
        print(reply.decode("utf-8", "replace"))
        return
    sys.stdout.flush()
    stdout.write(reply + b"\n")
    stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    request = " ".join(args.command)
    if "\n" in request or "\r" in request:
        parser.error("the command must not contain newlines")
    retry_after_send = args.retry_writes or args.command[0] in READ_ONLY_COMMANDS
    client = KVClient(args.host, args.port, args.framing, args.timeout)
    attempt = 0
    try:
        while True:
            try:
                reply = client.request(request)
                break
            except KVUnavailable as exc:
                error: KVError = exc
            except KVNoReply as exc:
                error = exc
                if not retry_after_send:
                    print(f"kvclient: error: {exc} (not retried: it may have been executed; "
                          f"see --retry-writes)", file=sys.stderr)
                    return 1
            except KVProtocolError as exc:
                print(f"kvclient: error: {exc}", file=sys.stderr)
                return 1
            if attempt >= args.retries:
                print(f"kvclient: error: {error} (after {attempt + 1} attempts)", file=sys.stderr)
                return 1
            time.sleep(min(BACKOFF_FIRST * 2 ** attempt, BACKOFF_MAX) * random.uniform(0.5, 1.0))
            attempt += 1
    finally:
        client.close()
    _print_reply(reply)
    return 3 if reply == b"ERR" or reply.startswith(b"ERR ") else 0


if __name__ == "__main__":
    sys.exit(main())
