"""The demo app: an in-memory key-value map served over plain TCP. It stands for "any app" that smrd
makes fault-tolerant, so it must never import anything from smrd and must know nothing of
replication (it also runs as a bare file: `python hashmap.py`). It owns the map and the wire
grammar below. It must never let anything but the request bytes and their order decide a reply or
the state: no clocks, no randomness, no iteration over unordered containers in replies, no error
text that depends on the process (smrd compares replies across replicas byte for byte).

Grammar (one request = one command; tokens are maximal runs of bytes that are not ASCII
whitespace, separated by any whitespace; the command word is exact upper case):
  PUT <key> <value>   -> OK
  GET <key>           -> VALUE <value> | NOT_FOUND
  REMOVE <key>        -> OK (it existed) | NOT_FOUND
  SIZE                -> SIZE <n>
  SCAN                -> SCAN <n> then <key> <value> per key in ascending byte order
                         (line framing: all on the one reply line; close framing: one per line)
  SNAPSHOT            -> SNAPSHOT <base64 of the canonical serialization of the whole map>
  RESTORE <base64>    -> OK (the map is replaced) | ERR bad snapshot: ...
  RESTORE SNAPSHOT <base64> (SNAPSHOT's reply verbatim: smrd's restore_request "RESTORE {state}")
  anything else       -> ERR <reason>
Keys and values are at most MAX_TOKEN_BYTES each. SNAPSHOT and RESTORE are the optional snapshot
hooks of docs/app-contract.md: an app without them still works under smrd (it replays the log instead).

Framing: `line` = persistent connection, one request per "\n"-terminated line ("\r\n" accepted),
replies in order, pipelining allowed; `close` = one connection per request, the request is every
byte before the client half-closes, the reply is followed by a "\n" and the server closes.
"""
import argparse
import asyncio
import base64
import binascii
import logging
import signal
import struct
import sys
import zlib
from typing import Dict, List, Optional, Set

log = logging.getLogger("hashmap")

FRAMINGS = ("line", "close")
DEFAULT_MAX_REQUEST = 4 * 1024 * 1024
MAX_TOKEN_BYTES = 1024 * 1024
READ_CHUNK = 64 * 1024
# After refusing an oversized request we keep reading (and discarding) for a moment before
# closing: closing a socket with unread input sends a RST, which can destroy the ERR reply
# before the client reads it.
LINGER_SECONDS = 1.0

SNAPSHOT_MAGIC = b"HMAP"
SNAPSHOT_VERSION = 1
_U32 = struct.Struct(">I")
_SNAPSHOT_HEADER = struct.Struct(">4sBI")  # magic, version, entry count

REPLY_OK = b"OK"
REPLY_NOT_FOUND = b"NOT_FOUND"
REPLY_TOO_LARGE = b"ERR request too large"


class BadSnapshot(ValueError):
    pass


def serialize(entries: Dict[bytes, bytes]) -> bytes:
    """The canonical form: keys ascending, so equal maps always give equal bytes (replicas compare
    snapshot hashes). Ends with a CRC-32 so a damaged snapshot is refused instead of restored."""
    parts = [_SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(entries))]
    for key in sorted(entries):
        value = entries[key]
        parts += [_U32.pack(len(key)), key, _U32.pack(len(value)), value]
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def deserialize(blob: bytes) -> Dict[bytes, bytes]:
    """Inverse of serialize(); accepts only the canonical form (anything else raises BadSnapshot),
    so that a restored map always satisfies the grammar's rules for keys and values."""
    if len(blob) < _SNAPSHOT_HEADER.size + _U32.size:
        raise BadSnapshot("truncated")
    body, (checksum,) = blob[:-_U32.size], _U32.unpack_from(blob, len(blob) - _U32.size)
    if zlib.crc32(body) != checksum:
        raise BadSnapshot("checksum mismatch")
    magic, version, count = _SNAPSHOT_HEADER.unpack_from(body, 0)
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_VERSION:
        raise BadSnapshot("unknown format")
    entries: Dict[bytes, bytes] = {}
    offset = _SNAPSHOT_HEADER.size
    previous_key: Optional[bytes] = None
    for _ in range(count):
        key, offset = _read_token(body, offset)
        value, offset = _read_token(body, offset)
        if previous_key is not None and key <= previous_key:
            raise BadSnapshot("keys not in ascending order")
        entries[key] = value
        previous_key = key
    if offset != len(body):
        raise BadSnapshot("trailing bytes")
    return entries


def _read_token(body: bytes, offset: int):
    if offset + _U32.size > len(body):
        raise BadSnapshot("truncated")
    (length,) = _U32.unpack_from(body, offset)
    offset += _U32.size
    if length == 0 or length > MAX_TOKEN_BYTES or offset + length > len(body):
        raise BadSnapshot("bad length")
    token = body[offset:offset + length]
    if len(token.split()) != 1:
        raise BadSnapshot("whitespace in a key or value")
    return token, offset + length


class HashMap:
    """The state machine: execute() maps one request to one reply and is the only thing that
    touches the map. It is synchronous, so concurrent connections can never interleave inside a
    request."""

    def __init__(self) -> None:
        self.entries: Dict[bytes, bytes] = {}

    def execute(self, request: bytes, multiline: bool = False) -> bytes:
        """The reply without its terminator. `multiline` lays SCAN out one item per line (close
        framing); in line framing every reply must stay on one line."""
        tokens = request.split()
        if not tokens:
            return b"ERR empty request"
        command, args = tokens[0], tokens[1:]
        if command == b"PUT":
            if len(args) != 2:
                return b"ERR usage: PUT <key> <value>"
            if len(args[0]) > MAX_TOKEN_BYTES:
                return b"ERR key too large"
            if len(args[1]) > MAX_TOKEN_BYTES:
                return b"ERR value too large"
            self.entries[args[0]] = args[1]
            return REPLY_OK
        if command == b"GET":
            if len(args) != 1:
                return b"ERR usage: GET <key>"
            value = self.entries.get(args[0])
            return REPLY_NOT_FOUND if value is None else b"VALUE " + value
        if command == b"REMOVE":
            if len(args) != 1:
                return b"ERR usage: REMOVE <key>"
            return REPLY_OK if self.entries.pop(args[0], None) is not None else REPLY_NOT_FOUND
        if command == b"SIZE":
            if args:
                return b"ERR usage: SIZE"
            return b"SIZE %d" % len(self.entries)
        if command == b"SCAN":
            if args:
                return b"ERR usage: SCAN"
            return self._scan(multiline)
        if command == b"SNAPSHOT":
            if args:
                return b"ERR usage: SNAPSHOT"
            return b"SNAPSHOT " + base64.b64encode(serialize(self.entries))
        if command == b"RESTORE":
            if len(args) == 2 and args[0] == b"SNAPSHOT":
                args = args[1:]
            if len(args) != 1:
                return b"ERR usage: RESTORE <base64>"
            try:
                blob = base64.b64decode(args[0], validate=True)
                self.entries = deserialize(blob)
            except binascii.Error:
                return b"ERR bad snapshot: not base64"
            except BadSnapshot as exc:
                return b"ERR bad snapshot: " + str(exc).encode("ascii")
            return REPLY_OK
        return b"ERR unknown command"

    def _scan(self, multiline: bool) -> bytes:
        separator = b"\n" if multiline else b" "
        parts: List[bytes] = [b"SCAN %d" % len(self.entries)]
        for key in sorted(self.entries):
            parts.append(key + b" " + self.entries[key])
        return separator.join(parts)


class HashMapServer:
    """The TCP shell around HashMap for one framing mode."""

    def __init__(self, framing: str, max_request: int) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}")
        self.framing = framing
        self.max_request = max_request
        self.state = HashMap()
        self.connections: Set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            if self.framing == "line":
                await self._serve_lines(reader, writer)
            else:
                await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            # Only serve() cancels us, at shutdown. Ending normally instead of re-raising: on
            # Python 3.11 the stream callback calls task.exception() on a cancelled task and logs
            # a spurious traceback.
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    def _execute(self, request: bytes, multiline: bool) -> bytes:
        try:
            return self.state.execute(request, multiline)
        except Exception:  # a bug must not take the service down; the text stays deterministic
            log.exception("internal error on a request")
            return b"ERR internal error"

    async def _serve_lines(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        scanned = 0  # bytes of buffer already known to hold no "\n": big lines are searched once
        while True:
            replies: List[bytes] = []
            while True:
                end = buffer.find(b"\n", scanned)
                if end < 0:
                    scanned = len(buffer)
                    break
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                scanned = 0
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > self.max_request:
                    replies.append(REPLY_TOO_LARGE + b"\n")
                    await self._refuse(reader, writer, replies)
                    return
                replies.append(self._execute(line, multiline=False) + b"\n")
            # A line without its "\n" can only end a valid request if it is within the limit plus
            # a possible "\r"; anything longer is refused before we buffer more of it.
            if len(buffer) > self.max_request + 1:
                replies.append(REPLY_TOO_LARGE + b"\n")
                await self._refuse(reader, writer, replies)
                return
            if replies:
                writer.write(b"".join(replies))
                await writer.drain()
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                # An unterminated trailing fragment is not a request: it may be a truncated one.
                return
            buffer += chunk

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = bytearray()
        while True:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                break
            request += chunk
            if len(request) > self.max_request:
                await self._refuse(reader, writer, [REPLY_TOO_LARGE + b"\n"])
                return
        writer.write(self._execute(bytes(request), multiline=True) + b"\n")
        await writer.drain()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      replies: List[bytes]) -> None:
        """Send what is owed (earlier pipelined replies, then the refusal), then close without a
        RST: half-close, and swallow the client's input for a bounded time."""
        writer.write(b"".join(replies))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_SECONDS
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                chunk = await asyncio.wait_for(reader.read(READ_CHUNK), remaining)
            except asyncio.TimeoutError:
                return
            if not chunk:
                return


def _format_address(sockname) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(host: str, port: int, framing: str, max_request: int) -> int:
    app = HashMapServer(framing, max_request)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # the handler only sets a flag
    try:
        server = await asyncio.start_server(app.handle, host, port)
    except OSError as exc:
        print(f"hashmap: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # The one start line; tests and scripts parse it to learn the port when --port 0 was asked.
    print(f"listening {_format_address(server.sockets[0].getsockname())}", flush=True)
    await stop.wait()
    server.close()
    for task in list(app.connections):
        task.cancel()
    if app.connections:
        await asyncio.wait(list(app.connections), timeout=1.0)
    await server.wait_closed()
    return 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hashmap",
        description=(
            "Demo key-value app: a plain, deterministic TCP server (it knows nothing of smrd). "
            "Commands: PUT <key> <value> | GET <key> | REMOVE <key> | SIZE | SCAN | SNAPSHOT | "
            "RESTORE <base64>. On start it prints 'listening HOST:PORT' on stdout; "
            "SIGTERM or SIGINT stops it with exit status 0."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=_port, default=7000,
                        help="TCP port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--framing", choices=FRAMINGS, default="line",
                        help="line: newline-delimited requests on a persistent connection; "
                             "close: one request per connection, ended by the client's half-close "
                             "(default %(default)s)")
    parser.add_argument("--max-request", type=_positive, default=DEFAULT_MAX_REQUEST, metavar="BYTES",
                        help="longest request accepted; a longer one gets 'ERR request too large' "
                             "and the connection is closed (default %(default)s)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="hashmap: %(levelname)s %(message)s")
    return asyncio.run(serve(args.host, args.port, args.framing, args.max_request))


if __name__ == "__main__":
    sys.exit(main())
