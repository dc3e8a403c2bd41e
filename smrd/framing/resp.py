"""resp mode: RESP2, Redis's protocol, on a persistent connection (pipelining allowed).

Owns: where a RESP value starts and ends (both roles), its bounds, the canonical form of a
command (what is replicated: an array of bulk strings; inline commands are rewritten into it),
the per-connection state rules of Redis commands (what is refused, and MULTI...EXEC blocks
ordered as one request; see smrd.framing.rules and docs/app-contract.md), and how many replies
the app owes for one replicated request.
Never: I/O, clocks, allocation for a declared length before checking it against the bound, nor
pass to the app a request Redis would parse differently from us (anything not canonical is
refused or rewritten), nor an exception other than FramingError for bad bytes.

Requests (client -> gateway, gateway -> app): an array of bulk strings ("*N\\r\\n" then N times
"$L\\r\\n<L bytes>\\r\\n"), or an inline command (a line, split like redis-server's
sdssplitargs). "*0"/"*-1" and empty inline lines are no command (Redis ignores them, no reply).
Replies (app -> replica): any RESP2 value, arrays nested up to MAX_DEPTH; the replica announces
with expect(n) that its next request is a block of n commands, and then n values form one message.
"""
import re
from collections import deque
from typing import Deque, List, Optional, Tuple

from .base import Buffer, Decoder
from .errors import FramingError, MessageTooLarge
from .replies import _clean
from .rules import CLOSE, GROUP_END, GROUP_START, PASS, REFUSE, StateRules

MAX_DEPTH = 32            # nesting of reply arrays; Redis's own replies nest a few levels
INLINE_MAX = 64 * 1024    # an inline command line, as redis-server's PROTO_INLINE_MAX_SIZE
HEADER_MAX = 32           # "*", "$" and ":" lines: a sign and at most 19 digits
_INT64 = (-(1 << 63), (1 << 63) - 1)

_CR, _LF = 0x0D, 0x0A
_STAR, _DOLLAR, _PLUS, _MINUS, _COLON = b"*$+-:"
# Canonical integers only: no "+", no leading zeros, no "-0". Redis parses lengths with
# string2ll, which refuses exactly those too, so a request we accept is one it parses as we do.
_LEN = re.compile(rb"-1|0|[1-9][0-9]{0,18}")
_INT = re.compile(rb"0|-?[1-9][0-9]{0,18}")
_RESP3 = b"_,#(!=%~|>"


class RespDecoder(Decoder):
    mode = "resp"

    def __init__(self, max_size: int, role: str, max_depth: int = MAX_DEPTH) -> None:
        super().__init__(max_size, role)
        self.max_depth = max_depth
        self._buf = bytearray()  # from the start of the current message
        self._pos = 0            # how far it is parsed
        self._start = 0          # (during a feed) where the current message starts in _buf
        self._scan = 0           # _buf[_pos:_scan] holds no b"\n" (no rescans when fed slowly)
        self._bulk_end = -1      # while a bulk payload is awaited: the index after its CRLF
        self._stack: List[int] = []  # elements still to come in each open array
        self._values = 0         # (replies) values completed in the current message
        self._expect: Deque[int] = deque()  # (replies) values per message, one per request

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete message are buffered: the peer is in the middle of sending."""
        return bool(self._buf)

    def expect(self, count) -> None:
        """Replies: the next request (in write order) is a block of ``count`` commands, so its
        reply is ``count`` values (see reply_count). Anything but a positive int counts as 1."""
        ok = isinstance(count, int) and not isinstance(count, bool) and count > 0
        self._expect.append(count if ok else 1)

    def _feed(self, data: Buffer, out: List[bytes]) -> None:
        buf = self._buf
        buf += data
        try:
            self._parse(buf, out)
        finally:
            start = self._start
            if start:
                del buf[:start]
                self._pos -= start
                self._scan = max(0, self._scan - start)
                if self._bulk_end >= 0:
                    self._bulk_end -= start

    def _parse(self, buf: bytearray, out: List[bytes]) -> None:
        request = self.role == "request"
        limit = self.max_size
        stack = self._stack
        self._start = start = 0
        pos = self._pos
        while True:
            if self._bulk_end >= 0:
                end = self._bulk_end
                if len(buf) < end:
                    break
                if buf[end - 2] != _CR or buf[end - 1] != _LF:
                    raise FramingError("bulk string not followed by CRLF")
                pos = end
                self._bulk_end = -1
            else:
                if pos >= len(buf):
                    break
                nl = buf.find(b"\n", max(pos, self._scan))
                if nl < 0:
                    self._scan = len(buf)
                    self._pos = pos
                    self._check_partial_line(buf, start, pos)
                    break
                kind = buf[pos]
                if request and not stack and kind != _STAR:
                    # Inline command: the line, "\r" before "\n" optional (as redis-server).
                    end = nl - 1 if nl > pos and buf[nl - 1] == _CR else nl
                    if end - pos > INLINE_MAX:
                        raise MessageTooLarge(
                            f"inline command of {end - pos} bytes over {INLINE_MAX} bytes")
                    args = split_inline(bytes(buf[pos:end]))
                    pos = start = self._start = nl + 1
                    if args:
                        message = encode_command(args)
                        if len(message) > limit:
                            raise MessageTooLarge(
                                f"command of {len(message)} bytes exceeds the limit of "
                                f"{limit} bytes")
                        out.append(message)
                    continue
                if nl == pos or buf[nl - 1] != _CR:
                    raise FramingError("RESP line not ended by CRLF")
                a, b = pos + 1, nl - 1  # the line's content, after its type byte
                pos = nl + 1
                if request and kind != _STAR and kind != _DOLLAR:
                    raise FramingError(
                        f"expected '$' (a bulk string) in a command array, got {_show(kind)}")
                if kind == _DOLLAR:
                    n = _number(_LEN, buf, a, b, "bulk length")
                    if n >= 0:
                        if pos - start + n + 2 > limit:
                            raise MessageTooLarge(
                                f"bulk string of {n} bytes: the message would exceed the limit "
                                f"of {limit} bytes")
                        self._bulk_end = pos + n + 2
                        continue
                    if request:
                        raise FramingError("null bulk string in a command")
                elif kind == _STAR:
                    n = _number(_LEN, buf, a, b, "array length")
                    if request:
                        if stack:
                            raise FramingError("nested array in a command")
                        if n <= 0:
                            start = self._start = pos  # no command: Redis ignores it, no reply
                            continue
                    if n > 0:
                        # Each element takes at least 3 bytes ("+\r\n"), a command's 6
                        # ("$0\r\n\r\n"): a count that cannot fit is refused before buffering.
                        smallest = 6 if request else 3
                        if pos - start + n * smallest > limit:
                            raise MessageTooLarge(
                                f"array of {n} elements: the message would exceed the limit of "
                                f"{limit} bytes")
                        if len(stack) >= self.max_depth:
                            raise FramingError(f"arrays nested deeper than {self.max_depth}")
                        stack.append(n)
                        continue
                elif kind == _PLUS or kind == _MINUS:
                    if buf.find(b"\r", a, b) >= 0:
                        raise FramingError("CR inside a simple string or error")
                elif kind == _COLON:
                    v = _number(_INT, buf, a, b, "integer")
                    if not _INT64[0] <= v <= _INT64[1]:
                        raise FramingError("integer out of the signed 64-bit range")
                elif kind in _RESP3:
                    raise FramingError(f"RESP3 type {_show(kind)} (smrd speaks RESP2: HELLO is "
                                       "refused)")
                else:
                    raise FramingError(f"unknown RESP type byte {_show(kind)}")
            # A value ended at pos.
            if pos - start > limit:
                raise MessageTooLarge(f"message exceeds the limit of {limit} bytes")
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            if stack:
                continue
            if not request:
                self._values += 1
                if self._values < (self._expect[0] if self._expect else 1):
                    continue
                self._values = 0
                if self._expect:
                    self._expect.popleft()
            out.append(bytes(buf[start:pos]))
            start = self._start = pos
        self._pos = pos

    def _check_partial_line(self, buf: bytearray, start: int, pos: int) -> None:
        n = len(buf) - pos  # bytes of a line without its "\n" yet
        kind = buf[pos]
        if self.role == "request" and not self._stack and kind != _STAR:
            if n > INLINE_MAX + 1:
                raise MessageTooLarge(f"inline command over {INLINE_MAX} bytes without a newline")
        elif self.role == "response" and (kind == _PLUS or kind == _MINUS):
            if len(buf) - start > self.max_size + 1:
                raise MessageTooLarge(f"message exceeds the limit of {self.max_size} bytes")
        elif n > HEADER_MAX:
            raise FramingError(f"RESP line of over {HEADER_MAX} bytes where a type and a number "
                               "belong")

    def _eof(self, out: List[bytes]) -> None:
        if self._buf or self._stack or self._values:
            raise FramingError(
                f"connection closed mid-message ({len(self._buf)} bytes of an incomplete RESP "
                "value)")


def _show(byte: int) -> str:
    return repr(chr(byte)) if 0x20 <= byte < 0x7F else f"byte 0x{byte:02x}"


def _number(pattern, buf: bytearray, a: int, b: int, what: str) -> int:
    if pattern.fullmatch(buf, a, b) is None:
        raise FramingError(f"malformed {what} {_clean(bytes(buf[a:b]).decode('latin-1'))[:24]!r}")
    return int(buf[a:b])


def encode(message: Buffer) -> bytes:
    """Messages are RESP values already (or blocks of them): written as they are."""
    return bytes(message)


def encode_command(args: List[bytes]) -> bytes:
    """The canonical command: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


_SPACE = frozenset(b" \t\n\v\f\r")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}


def split_inline(line: bytes) -> List[bytes]:
    """An inline command's arguments, as redis-server's sdssplitargs splits them: whitespace
    separates; "double quotes" take \\xHH, \\n, \\r, \\t, \\b, \\a and \\<char> escapes;
    'single quotes' take \\'; a closing quote must be followed by a space or the end."""
    if b"\0" in line:
        raise FramingError("NUL byte in an inline command")
    args: List[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        dq = sq = False
        while True:
            if i >= n:
                if dq or sq:
                    raise FramingError("unbalanced quotes in an inline command")
                break
            c = line[i]
            if dq:
                if (c == 0x5C and i + 3 < n and line[i + 1] == 0x78 and line[i + 2] in _HEX
                        and line[i + 3] in _HEX):
                    cur.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise FramingError("closing quote not followed by a space in an inline "
                                           "command")
                    i += 1
                    break
                else:
                    cur.append(c)
            elif sq:
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise FramingError("closing quote not followed by a space in an inline "
                                           "command")
                    i += 1
                    break
                else:
                    cur.append(c)
            elif c in _SPACE:
                break
            elif c == 0x22:
                dq = True
            elif c == 0x27:
                sq = True
            else:
                cur.append(c)
            i += 1
        args.append(bytes(cur))


def command_args(message: bytes, most: Optional[int] = None) -> List[bytes]:
    """The arguments of a canonical command (as the request decoder gives it), the first
    ``most`` of them when given."""
    nl = message.index(b"\r\n")
    n = int(message[1:nl])
    pos = nl + 2
    args = []
    for _ in range(n if most is None else min(n, most)):
        nl = message.index(b"\r\n", pos)
        size = int(message[pos + 1:nl])
        pos = nl + 2
        args.append(message[pos:pos + size])
        pos += size + 2
    return args


def reply_count(request: bytes) -> int:
    """How many replies the app sends for one replicated request: 1, or for a MULTI block the
    number of commands in it (each gets one: +OK, +QUEUED..., then EXEC's array). A pure function
    of the replicated bytes, so every replica expects the same."""
    if len(request) <= 15 or request[:15].upper() != b"*1\r\n$5\r\nMULTI\r\n":
        return 1
    decoder = RespDecoder(len(request), "request")
    try:
        return max(1, len(decoder.feed(request)))
    except FramingError:  # not from a gateway; the app will say what it thinks of it
        return 1


def error_reply(reason: str) -> bytes:
    """smrd's own error, as a RESP error: ``-ERR smrd: <reason>\\r\\n``."""
    return b"-ERR smrd: " + _clean(reason) + b"\r\n"


# -- per-connection state rules ---------------------------------------------------------------
#
# Why each is refused is in docs/app-contract.md ("resp"); keep the two in step. The rules are
# about the app's ONE connection that carries every client's requests, and about replicas
# executing the same requests to the same state and replies.

_RULES = {
    "connection": ("keeps state on the app's connection, which every client shares",
                   "WATCH UNWATCH SELECT CLIENT HELLO AUTH RESET READONLY READWRITE ASKING "
                   "MONITOR SUBSCRIBE PSUBSCRIBE SSUBSCRIBE UNSUBSCRIBE PUNSUBSCRIBE SUNSUBSCRIBE "
                   "SYNC PSYNC REPLCONF"),
    "blocking": ("would block the app's connection, which every client shares, and time out by "
                 "each replica's clock",
                 "BLPOP BRPOP BRPOPLPUSH BLMOVE BLMPOP BZPOPMIN BZPOPMAX BZMPOP WAIT WAITAOF"),
    "random": ("gives each replica a different random result",
               "RANDOMKEY SPOP SRANDMEMBER HRANDFIELD ZRANDMEMBER LOLWUT"),
    "clock": ("reads each replica's clock (keys would expire at different moments)",
              "TIME LASTSAVE TTL PTTL EXPIRETIME PEXPIRETIME EXPIRE PEXPIRE EXPIREAT PEXPIREAT "
              "SETEX PSETEX HEXPIRE HPEXPIRE HEXPIREAT HPEXPIREAT HTTL HPTTL HEXPIRETIME "
              "HPEXPIRETIME HGETEX HSETEX XCLAIM XAUTOCLAIM XPENDING XINFO"),
    "script": ("runs a script, which may read the clock or random numbers",
               "EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO SCRIPT FUNCTION"),
    "server": ("concerns one server (config, persistence, memory, replication, process), not "
               "the replicated data",
               "INFO DEBUG CONFIG SHUTDOWN SAVE BGSAVE BGREWRITEAOF REPLICAOF SLAVEOF FAILOVER "
               "CLUSTER MODULE ACL LATENCY SLOWLOG MEMORY MIGRATE PFDEBUG PFSELFTEST"),
}
REFUSED = {name.encode(): rule for rule, (_, names) in _RULES.items() for name in names.split()}
_WHY = {rule: why for rule, (why, _) in _RULES.items()}
_EXPIRY_OPTIONS = frozenset((b"EX", b"PX", b"EXAT", b"PXAT"))
_ERR_INCOMPLETE = ("MULTI must be sent together with its commands and EXEC in one write "
                   "(per-connection state, see docs/app-contract.md)")


def _refused(name: bytes, rule: str) -> Tuple[str, str]:
    shown = _clean(name.decode("latin-1"))[:32].decode()
    return REFUSE, f"{shown} is refused: it {_WHY[rule]} (rule '{rule}', see docs/app-contract.md)"


def classify(message: bytes) -> Tuple[str, object]:
    """The state rule for one canonical command: (verdict, detail) as smrd.framing.rules says."""
    (name,) = command_args(message, 1) or (b"",)
    name = name.upper()
    rule = REFUSED.get(name)
    if rule is not None:
        return _refused(name, rule)
    if name == b"MULTI":
        return GROUP_START, None
    if name == b"EXEC":
        return GROUP_END, b"-EXECABORT smrd: Transaction discarded because smrd refused it\r\n"
    if name == b"DISCARD":
        return GROUP_END, b"+OK\r\n"
    if name == b"QUIT":
        return CLOSE, b"+OK\r\n"
    # Options that make an otherwise fine command read the clock, or block.
    if name in (b"SET", b"GETEX", b"XADD", b"XREAD", b"XREADGROUP", b"RESTORE", b"OBJECT"):
        args = [a.upper() for a in command_args(message)]
        if name == b"SET" and _EXPIRY_OPTIONS.intersection(args[3:]):
            return _refused(b"SET with EX/PX/EXAT/PXAT", "clock")
        if name == b"GETEX" and _EXPIRY_OPTIONS.intersection(args[2:]):
            return _refused(b"GETEX with EX/PX/EXAT/PXAT", "clock")
        if name == b"XADD" and _xadd_id(args) == b"*":
            return _refused(b"XADD with ID *", "clock")
        if name in (b"XREAD", b"XREADGROUP"):
            options = args[1:args.index(b"STREAMS")] if b"STREAMS" in args else args[1:]
            if b"BLOCK" in options:
                return _refused(name + b" BLOCK", "blocking")
        if name == b"RESTORE" and ((len(args) > 2 and args[2] != b"0")
                                   or b"IDLETIME" in args[4:] or b"FREQ" in args[4:]):
            return _refused(b"RESTORE with a TTL, IDLETIME or FREQ", "clock")
        if name == b"OBJECT" and len(args) > 1 and args[1] in (b"IDLETIME", b"FREQ"):
            return _refused(b"OBJECT " + args[1], "clock")
    return PASS, None


def _xadd_id(args: List[bytes]) -> Optional[bytes]:
    # XADD key [NOMKSTREAM] [MAXLEN|MINID [=|~] threshold [LIMIT count]] <* | id> field value ...
    i = 2
    try:
        if args[i] == b"NOMKSTREAM":
            i += 1
        if args[i] in (b"MAXLEN", b"MINID"):
            i += 1
            if args[i] in (b"=", b"~"):
                i += 1
            i += 1
            if args[i] == b"LIMIT":
                i += 2
        return args[i]
    except IndexError:
        return None  # too short: the app answers it with a syntax error


class RespRules(StateRules):
    """Redis's per-connection state rules for one client connection (see StateRules)."""

    def classify(self, message: bytes) -> Tuple[str, object]:
        return classify(message)

    def refusal(self, reason: str) -> bytes:
        return error_reply(reason)

    def incomplete_reason(self) -> str:
        return _ERR_INCOMPLETE
