"""http mode: HTTP/1.1 with keep-alive and pipelining, parsed strictly and re-emitted canonically.

Owns: finding where each request/response ends (Content-Length, chunked, no body, or connection
close for responses), refusing what cannot be replicated safely, and turning every accepted
message into one canonical byte string. Rules:
  1. The canonical form depends only on the message, never on how its bytes were split: it is
     what every replica feeds its app and what the gateway votes on, so it must be a pure
     function of the parsed message.
  2. It is self-contained: no transfer coding, no hop-by-hop headers, "HTTP/1.1", and a
     Content-Length (appended after the other headers) whenever the message has a body.
  3. Never buffer more than max_size body bytes, MAX_HEADER_BYTES of header block (and the same
     for trailers), or MAX_CHUNK_LINE for one chunk-size line; never raise anything but
     FramingError on bad bytes.
It never interprets bodies, target URIs or any end-to-end header beyond those listed above.
"""
import re
from collections import deque
from typing import Deque, FrozenSet, Iterable, List, Optional, Tuple, Union

from .base import Buffer, Decoder
from .errors import FramingError, MessageTooLarge

MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096
MAX_IDEMPOTENCY_KEY = 255

HOP_BY_HOP: FrozenSet[bytes] = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
# Names a peer may not strip through "Connection: <name>": the request's identity depends on them.
_PROTECTED: FrozenSet[bytes] = frozenset({b"host", b"idempotency-key"})

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(
    rb"HTTP/([0-9])\.([0-9]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):(.*)", re.S)
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)"
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
    rb"[ \t]*")
_IDEM_CHARS = re.compile(rb'[\x21\x23-\x5b\x5d-\x7e]{1,%d}' % MAX_IDEMPOTENCY_KEY)

_CR = 0x0D
_LF = 0x0A

# Parser states. The first four are line-oriented.
_IDLE = 0         # before a start line; blank lines between messages are skipped
_HEAD = 1         # reading header field lines
_CHUNK_SIZE = 2   # reading a chunk-size line
_TRAILER = 3      # reading trailer field lines after the last chunk
_BODY = 4         # reading a Content-Length body
_CHUNK_DATA = 5   # reading chunk data
_CHUNK_END = 6    # expecting the CRLF after chunk data
_UNTIL_CLOSE = 7  # response body delimited by the connection closing
_LINE_STATES = (_IDLE, _HEAD, _CHUNK_SIZE, _TRAILER)

_CHUNKED = -1
_CLOSE_DELIMITED = -2

Field = Tuple[bytes, bytes]


class HttpDecoder(Decoder):
    mode = "http"

    def __init__(self, max_size: int, role: str) -> None:
        super().__init__(max_size, role)
        self._buf = bytearray()
        self._scan = 0  # bytes at the start of _buf known to hold no newline
        self._expected: Deque[bool] = deque()  # per announced request: was it HEAD?
        self._reset()

    def _reset(self) -> None:
        self._state = _IDLE
        self._line_bytes = 0  # header block (or trailer block) bytes consumed so far
        self._start: tuple = ()
        self._fields: List[Field] = []
        self._body = bytearray()
        self._remaining = 0
        self._prefix = b""
        self._add_length = False
        self._close_after = False

    def expect(self, method: Union[str, bytes]) -> None:
        self._expected.append(method in ("HEAD", b"HEAD"))

    # -- byte level -------------------------------------------------------------------------

    def _feed(self, data: Buffer, out: List[bytes]) -> None:
        buf = self._buf
        buf += data
        end = len(buf)
        pos = 0
        search = self._scan
        while pos < end and not self.finished:
            state = self._state
            if state < _BODY:
                nl = buf.find(b"\n", search)
                if nl < 0:
                    self._check_partial_line(end - pos)
                    break
                line = bytes(buf[pos:nl])
                consumed = nl + 1 - pos
                pos = search = nl + 1
                if line[-1:] == b"\r":
                    line = line[:-1]
                self._on_line(line, consumed, out)
            elif state == _BODY or state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                self._body += buf[pos:pos + take]
                pos = search = pos + take
                self._remaining -= take
                if self._remaining == 0:
                    if state == _BODY:
                        self._complete(out)
                    else:
                        self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if buf[pos] == _LF:
                    pos += 1
                elif buf[pos] == _CR and pos + 1 < end and buf[pos + 1] == _LF:
                    pos += 2
                elif buf[pos] == _CR and pos + 1 == end:
                    break
                else:
                    raise FramingError("chunk data is not followed by CRLF")
                search = pos
                self._state = _CHUNK_SIZE
            else:  # _UNTIL_CLOSE
                n = end - pos
                if len(self._body) + n > self.max_size:
                    raise MessageTooLarge(
                        f"close-delimited response body exceeds the limit of {self.max_size} "
                        f"bytes (at least {len(self._body) + n} bytes)")
                self._body += buf[pos:end]
                pos = search = end
        if self.finished:
            # A message asked for the connection to close: what follows is never read.
            buf.clear()
            self._scan = 0
            return
        if pos:
            del buf[:pos]
        self._scan = len(buf) if self._state in _LINE_STATES else 0

    def _check_partial_line(self, n: int) -> None:
        state = self._state
        if state == _CHUNK_SIZE:
            if n > MAX_CHUNK_LINE:
                raise FramingError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
        elif self._line_bytes + n > MAX_HEADER_BYTES:
            what = "trailer block" if state == _TRAILER else "header block"
            raise MessageTooLarge(
                f"{what} exceeds the limit of {MAX_HEADER_BYTES} bytes", 431)

    def _on_line(self, line: bytes, consumed: int, out: List[bytes]) -> None:
        state = self._state
        if state == _CHUNK_SIZE:
            if consumed > MAX_CHUNK_LINE:
                raise FramingError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
            self._on_chunk_size(line, out)
            return
        self._line_bytes += consumed
        if self._line_bytes > MAX_HEADER_BYTES:
            what = "trailer block" if state == _TRAILER else "header block"
            raise MessageTooLarge(
                f"{what} exceeds the limit of {MAX_HEADER_BYTES} bytes", 431)
        if state == _IDLE:
            if line:  # RFC 9112 §2.2: blank lines before a start line are skipped
                self._start = (parse_request_line(line) if self.role == "request"
                               else _parse_status_line(line))
                self._state = _HEAD
        elif state == _HEAD:
            if line:
                self._fields.append(parse_field(line))
            elif self.role == "request":
                self._on_request_head(out)
            else:
                self._on_response_head(out)
        elif line:  # _TRAILER
            # Trailer fields are checked, then dropped: the canonical message is de-chunked and a
            # recipient that removes the chunked coding may discard trailers (RFC 9112 §7.1.2).
            parse_field(line)
        else:
            self._complete(out)

    def _on_chunk_size(self, line: bytes, out: List[bytes]) -> None:
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            raise FramingError("malformed chunk-size line")
        digits = m.group(1).lstrip(b"0") or b"0"
        size = int(digits, 16) if len(digits) <= 16 else 1 << 64
        if size == 0:
            self._state = _TRAILER
            self._line_bytes = 0
            return
        total = len(self._body) + size
        if total > self.max_size:
            raise MessageTooLarge(
                f"chunked body exceeds the limit of {self.max_size} bytes "
                f"(at least {total} bytes announced)")
        self._remaining = size
        self._state = _CHUNK_DATA

    def _eof(self, out: List[bytes]) -> None:
        state = self._state
        if state == _UNTIL_CLOSE:
            self._complete(out)
        elif state != _IDLE or self._buf:
            where = {
                _IDLE: "in the start line", _HEAD: "in the header block",
                _BODY: f"in the body ({len(self._body)} of "
                       f"{len(self._body) + self._remaining} bytes)",
            }.get(state, "in a chunked body")
            raise FramingError(f"connection closed mid-message ({where})")

    def _complete(self, out: List[bytes]) -> None:
        body = bytes(self._body)
        length = b"Content-Length: %d\r\n" % len(body) if self._add_length else b""
        out.append(b"".join((self._prefix, length, b"\r\n", body)))
        close = self._close_after
        self._reset()
        if close:
            self.wants_close = True
            self.finished = True

    def _start_body(self, framing: Optional[int], out: List[bytes]) -> None:
        if framing is None or framing == 0:
            self._complete(out)
        elif framing == _CHUNKED:
            self._state = _CHUNK_SIZE
        elif framing == _CLOSE_DELIMITED:
            self._state = _UNTIL_CLOSE
        else:
            self._remaining = framing
            self._state = _BODY

    # -- message level ----------------------------------------------------------------------

    def _on_request_head(self, out: List[bytes]) -> None:
        method, target, minor = self._start
        fields = self._fields
        conn = _list_tokens(fields, b"connection")
        te = _values(fields, b"transfer-encoding")
        lengths = _values(fields, b"content-length")
        hosts = _values(fields, b"host")
        idem = _values(fields, b"idempotency-key")
        expect = _list_tokens(fields, b"expect")

        if _values(fields, b"upgrade"):
            raise FramingError(
                "protocol upgrade is not supported: a switched connection cannot be replicated",
                501)
        if len(hosts) > 1 or (minor >= 1 and not hosts):
            raise FramingError("an HTTP/1.1 request needs exactly one Host header")
        if len(idem) > 1:
            raise FramingError("more than one Idempotency-Key header")
        if idem:
            parse_idempotency_value(idem[0])
        framing: Optional[int] = None
        if te:
            if minor == 0:
                raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
            if lengths:
                raise FramingError("both Content-Length and Transfer-Encoding in one request")
            if _tokens(te) != [b"chunked"]:
                raise FramingError("unsupported transfer coding (only chunked is)", 501)
            framing = _CHUNKED
        elif lengths:
            framing = _content_length(lengths, self.max_size)
        drop = HOP_BY_HOP | (frozenset(conn) - _PROTECTED) | {b"content-length"}
        if expect:
            # Answering "100 Continue" would make the decoder write mid-request, and on a
            # pipelined connection a 100 sent before earlier requests are answered would be read
            # as an interim response to one of those. A 417 from the header block alone is
            # simple and safe: the body is not sent yet, and the client resends without Expect.
            if minor == 0 and set(expect) == {b"100-continue"}:
                drop |= {b"expect"}  # RFC 9110 §10.1.1: ignored in HTTP/1.0 requests
            else:
                raise FramingError(
                    "Expect is not supported: resend the request without an Expect header", 417)
        self._prefix = b"".join([method, b" ", target, b" HTTP/1.1\r\n",
                                 *_emit(fields, drop)])
        self._add_length = framing is not None
        self._close_after = b"close" in conn or (minor == 0 and b"keep-alive" not in conn)
        self._start_body(framing, out)

    def _on_response_head(self, out: List[bytes]) -> None:
        status, reason, minor = self._start
        fields = self._fields
        if status < 200:
            if status == 101:
                raise FramingError("the app switched protocols (101), which smrd never asks for",
                                   502)
            # Interim responses (100, 103 ...) are dropped: the final response follows.
            self._reset()
            return
        head = self._expected.popleft() if self._expected else False
        conn = _list_tokens(fields, b"connection")
        te = _values(fields, b"transfer-encoding")
        lengths = _values(fields, b"content-length")
        close_after = b"close" in conn or (minor == 0 and b"keep-alive" not in conn)
        framing: Optional[int] = None
        if head or status in (204, 304):
            pass  # no body whatever the headers say (RFC 9112 §6.3); Content-Length is kept
        elif te:
            if minor == 0:
                raise FramingError("Transfer-Encoding in an HTTP/1.0 response")
            if _tokens(te) != [b"chunked"]:
                raise FramingError("unsupported transfer coding in response (only chunked is)",
                                   502)
            framing = _CHUNKED
        elif lengths:
            framing = _content_length(lengths, self.max_size)
        else:
            framing = _CLOSE_DELIMITED
            close_after = True
        drop = HOP_BY_HOP | (frozenset(conn) - _PROTECTED)
        if framing is not None:
            drop |= {b"content-length"}
        self._prefix = b"".join([b"HTTP/1.1 %d " % status, reason, b"\r\n",
                                 *_emit(fields, drop)])
        self._add_length = framing is not None
        self._close_after = close_after
        self._start_body(framing, out)


# -- field helpers (pure functions) ----------------------------------------------------------

def parse_request_line(line: bytes) -> tuple:
    """(method, target, minor version) of an HTTP/1.x request line (without its CRLF), or
    FramingError. The one request-line grammar of smrd (the metrics server uses it too)."""
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise FramingError("malformed request line")
    method, target, major, minor = m.groups()
    if major != b"1":
        raise FramingError("unsupported HTTP version (only HTTP/1.x is)", 505)
    if method == b"CONNECT":
        raise FramingError("CONNECT is not supported: a tunnel cannot be replicated", 501)
    return method, target, int(minor)


def _parse_status_line(line: bytes) -> tuple:
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        raise FramingError("malformed status line", 502)
    major, minor, status, reason = m.groups()
    if major != b"1":
        raise FramingError("unsupported HTTP version in response (only HTTP/1.x is)", 502)
    return int(status), reason or b"", int(minor)


def parse_field(line: bytes) -> Field:
    """(name, value) of a header field line (without its CRLF), or FramingError."""
    if line[:1] in (b" ", b"\t"):
        raise FramingError("obsolete line folding in a header field")
    m = _FIELD.fullmatch(line)
    if m is None:
        raise FramingError("malformed header field line")
    value = m.group(2).strip(b" \t")
    if _BAD_VALUE.search(value):
        raise FramingError("control character in a header field value")
    return m.group(1), value


def _values(fields: List[Field], lname: bytes) -> List[bytes]:
    return [v for n, v in fields if n.lower() == lname]


def _tokens(values: Iterable[bytes]) -> List[bytes]:
    # Comma-separated lists may hold empty elements (RFC 9110 §5.6.1); they carry nothing.
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t").lower()
            if item:
                out.append(item)
    return out


def _list_tokens(fields: List[Field], lname: bytes) -> List[bytes]:
    return _tokens(_values(fields, lname))


def _content_length(values: List[bytes], max_size: int) -> int:
    # Repeated or comma-listed identical values are one length (RFC 9112 §6.3); anything else is
    # the ambiguity request smuggling lives on.
    length = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit():
                raise FramingError("invalid Content-Length")
            digits = item.lstrip(b"0") or b"0"
            n = int(digits) if len(digits) <= 19 else 1 << 64
            if length is not None and n != length:
                raise FramingError("conflicting Content-Length values")
            length = n
    assert length is not None
    if length > max_size:
        raise MessageTooLarge(
            f"Content-Length {length} exceeds the limit of {max_size} bytes")
    return length


def _emit(fields: List[Field], drop: FrozenSet[bytes]) -> List[bytes]:
    parts = []
    for name, value in fields:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    return parts


def parse_idempotency_value(value: bytes) -> str:
    """The key carried by an ``Idempotency-Key`` field value, or FramingError.

    Accepts a bare value or one double-quoted string (the IETF draft's structured-field form):
    1 to 255 visible ASCII characters other than ``"`` and ``\\``.
    """
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        value = value[1:-1]
    if _IDEM_CHARS.fullmatch(value) is None:
        raise FramingError(
            f"invalid Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters "
            "other than '\"' and '\\' expected")
    return value.decode("ascii")


def _canonical_fields(message: Buffer) -> Tuple[bytes, List[bytes]]:
    message = bytes(message)
    end = message.find(b"\r\n\r\n")
    if end < 0:
        raise FramingError("not a canonical HTTP message (no end of header block)")
    lines = message[:end].split(b"\r\n")
    return lines[0], lines[1:]


def idempotency_key(message: Buffer) -> Optional[str]:
    """The Idempotency-Key of a canonical request (as the decoder emits it), or None."""
    _, lines = _canonical_fields(message)
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() == b"idempotency-key":
            return parse_idempotency_value(value.strip(b" \t"))
    return None


def http_request_method(message: Buffer) -> str:
    """The method of a canonical request, e.g. to pass to a response decoder's ``expect``."""
    if isinstance(message, memoryview):
        message = bytes(message)
    sp = message.find(b" ", 0, MAX_HEADER_BYTES)
    if sp <= 0 or _TOKEN_RE.fullmatch(message, 0, sp) is None:
        raise FramingError("not an HTTP request (no method)")
    return bytes(message[:sp]).decode("ascii")


def encode(message: Buffer) -> bytes:
    # Canonical messages are complete HTTP/1.1 messages already.
    return bytes(message)
