"""smrd.framing: the four framing modes, both roles, their bounds, and the asyncio helpers.

The central property: how bytes are split into reads never changes the decoded messages (nor
whether, after them, an error comes). The http tests also pin the canonical form, since replicas
feed it to their apps and the gateway votes on it.
"""
import asyncio
import random
from http import HTTPStatus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smrd.errors import SmrdError
from smrd.framing import (
    ENVELOPE_PREFIX, ERROR_PREFIX, MAX_HEADER_BYTES, MODES, FramingError, MessageReader,
    MessageTooLarge, add_idempotency, encode, error_reply, http_error_response,
    http_request_method, make_decoder, split_idempotency, write_message,
)

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- helpers ---------------------------------------------------------------------------------

def run_decoder(mode, chunks, max_size=1 << 20, role="request", expects=()):
    """Feed chunks then EOF -> (messages, error class or None, decoder)."""
    dec = make_decoder(mode, max_size, role)
    for method in expects:
        dec.expect(method)
    out = []
    try:
        for chunk in chunks:
            out += dec.feed(chunk)
        out += dec.eof()
    except FramingError as exc:
        return out, type(exc), dec
    return out, None, dec


def split_at(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in points:
        pieces.append(data[prev:p])
        prev = p
    pieces.append(data[prev:])
    return pieces


def one_by_one(data):
    return [data[i:i + 1] for i in range(len(data))]


def decode(mode, data, **kw):
    msgs, err, _ = run_decoder(mode, [data], **kw)
    assert err is None
    return msgs


# -- general contract ------------------------------------------------------------------------

def test_modes_and_errors():
    assert MODES == ("close", "line", "length", "http", "resp")
    assert issubclass(FramingError, ValueError) and issubclass(FramingError, SmrdError)
    assert issubclass(MessageTooLarge, FramingError)
    with pytest.raises(ValueError):
        make_decoder("json", 10)
    with pytest.raises(ValueError):
        make_decoder("line", 10, "server")
    with pytest.raises(ValueError):
        make_decoder("line", -1)
    with pytest.raises(ValueError):
        encode("json", b"x")


@pytest.mark.parametrize("mode", ["line", "length", "http"])
def test_error_after_good_messages_is_deferred_and_sticky(mode):
    good = {"line": b"a\n", "length": b"\0\0\0\1a",
            "http": b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"}[mode]
    bad = {"line": b"x" * 20, "length": b"\0\0\1\0", "http": b"BAD LINE\r\n"}[mode]
    dec = make_decoder(mode, 8)
    assert len(dec.feed(good + bad)) == 1
    with pytest.raises(FramingError):
        dec.feed(b"")
    with pytest.raises(FramingError):
        dec.eof()


@pytest.mark.parametrize("mode", MODES)
def test_accepts_bytearray_and_memoryview(mode):
    wire = encode(mode, {"http": b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
                         "resp": b"*1\r\n$3\r\nabc\r\n"}.get(mode, b"abc"))
    for chunk in (bytearray(wire), memoryview(wire)):
        dec = make_decoder(mode, 100)
        assert len(dec.feed(chunk) + dec.eof()) == 1


def test_feed_after_eof_is_refused():
    dec = make_decoder("line", 10)
    assert dec.eof() == []
    assert dec.eof() == []
    with pytest.raises(FramingError):
        dec.feed(b"x\n")


# -- raw modes -------------------------------------------------------------------------------

line_msgs = st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=8)
any_msgs = st.lists(st.binary(max_size=40), max_size=8)


@FAST
@given(msgs=line_msgs, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_line_round_trip_any_split(msgs, cuts):
    wire = b"".join(encode("line", m) for m in msgs)
    assert decode("line", wire) == msgs
    assert run_decoder("line", split_at(wire, cuts))[0] == msgs
    assert run_decoder("line", one_by_one(wire))[0] == msgs


@FAST
@given(msgs=any_msgs, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_length_round_trip_any_split(msgs, cuts):
    wire = b"".join(encode("length", m) for m in msgs)
    assert decode("length", wire) == msgs
    assert run_decoder("length", split_at(wire, cuts))[0] == msgs
    assert run_decoder("length", one_by_one(wire))[0] == msgs


@FAST
@given(msg=st.binary(min_size=1, max_size=200), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_close_round_trip_any_split(msg, cuts):
    assert run_decoder("close", split_at(encode("close", msg), cuts)) [:2] == ([msg], None)


def test_line_details():
    assert decode("line", b"a\r\nb\n\nc\r\r\n") == [b"a", b"b", b"", b"c\r"]
    assert encode("line", b"abc") == b"abc\n"
    # A message that itself ends in "\r" survives: the writer adds "\r\n", the reader strips one.
    assert encode("line", b"abc\r") == b"abc\r\r\n"
    assert decode("line", encode("line", b"abc\r")) == [b"abc\r"]
    with pytest.raises(FramingError):
        encode("line", b"a\nb")
    msgs, err, _ = run_decoder("line", [b"ok\npartial"])
    assert msgs == [b"ok"] and err is FramingError


def test_length_details():
    assert encode("length", b"") == b"\0\0\0\0"
    assert encode("length", b"abc") == b"\0\0\0\3abc"
    msgs, err, _ = run_decoder("length", [b"\0\0\0\3ab"])
    assert msgs == [] and err is FramingError
    msgs, err, _ = run_decoder("length", [b"\0\0"])
    assert err is FramingError


def test_close_details():
    assert decode("close", b"") == []                      # a probe is not a request
    assert decode("close", b"", role="response") == [b""]  # an app's empty reply is a reply
    dec = make_decoder("close", 10)
    assert dec.wants_close
    assert dec.feed(b"abc") == [] and dec.eof() == [b"abc"] and dec.finished


def test_pipelined_raw():
    assert make_decoder("line", 10).feed(b"a\nbb\nccc\n") == [b"a", b"bb", b"ccc"]
    wire = b"".join(encode("length", m) for m in [b"a", b"", b"ccc"])
    assert make_decoder("length", 10).feed(wire) == [b"a", b"", b"ccc"]


@pytest.mark.parametrize("mode", ["close", "line", "length"])
def test_raw_size_limits(mode):
    limit = 100
    ok, big = b"x" * limit, b"x" * (limit + 1)
    assert run_decoder(mode, [encode(mode, ok)], max_size=limit)[:2] == ([ok], None)
    assert run_decoder(mode, [encode(mode, big)], max_size=limit)[1] is MessageTooLarge
    assert run_decoder(mode, one_by_one(encode(mode, big)), max_size=limit)[1] is MessageTooLarge


def test_line_with_cr_at_exact_limit():
    assert decode("line", b"x" * 10 + b"\r\n", max_size=10) == [b"x" * 10]
    assert run_decoder("line", [b"x" * 10 + b"\r\r\n"], max_size=10)[1] is MessageTooLarge


def test_too_large_detected_before_the_message_arrives():
    with pytest.raises(MessageTooLarge):
        make_decoder("length", 100).feed(b"\0\0\0\x65")   # 101 announced, nothing sent yet
    dec = make_decoder("line", 100)
    assert dec.feed(b"x" * 100 + b"\r") == []              # may still become a 100-byte line
    with pytest.raises(MessageTooLarge):
        dec.feed(b"y")                                     # no newline, 102 bytes: too long
    with pytest.raises(MessageTooLarge):
        make_decoder("close", 100).feed(b"x" * 101)
    with pytest.raises(MessageTooLarge):
        make_decoder("http", 100).feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n")


# -- http: requests --------------------------------------------------------------------------

def req(*lines, body=b""):
    return "".join(line + "\r\n" for line in lines).encode() + b"\r\n" + body


def test_http_content_length_request():
    wire = req("POST /p?q=1 HTTP/1.1", "Host: example", "content-length: 5", body=b"hello")
    assert decode("http", wire) == [
        b"POST /p?q=1 HTTP/1.1\r\nHost: example\r\nContent-Length: 5\r\n\r\nhello"]


def test_http_no_body_request_gets_no_length():
    assert decode("http", req("GET / HTTP/1.1", "Host: h", "Accept:*/*")) == [
        b"GET / HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"]


def test_http_chunked_with_extensions_and_trailers():
    wire = (b"PUT /k HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"5;name=value;q=\"a b\\\"c\"\r\nhello\r\n"
            b"00006 ; ext\r\n world\r\n"
            b"0;last\r\nX-Sum: 123\r\nX-Other: y\r\n\r\n")
    expected = b"PUT /k HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    assert decode("http", wire) == [expected]
    assert run_decoder("http", one_by_one(wire))[0] == [expected]


def test_http_canonical_drops_hop_by_hop_and_connection_listed_fields():
    wire = req("GET /a HTTP/1.1", "Host: h", "Connection: keep-alive, X-Hop",
               "Keep-Alive: timeout=5", "Proxy-Connection: keep-alive", "TE: trailers",
               "X-Hop: 1", "X-Keep: 2", "Idempotency-Key: k1")
    assert decode("http", wire) == [
        b"GET /a HTTP/1.1\r\nHost: h\r\nX-Keep: 2\r\nIdempotency-Key: k1\r\n\r\n"]
    # "Connection: host" must not strip the request's identity.
    wire = req("GET / HTTP/1.1", "Host: h", "Connection: host, idempotency-key",
               "Idempotency-Key: k")
    assert decode("http", wire) == [b"GET / HTTP/1.1\r\nHost: h\r\nIdempotency-Key: k\r\n\r\n"]


def test_http_canonical_identical_for_equivalent_requests():
    body = b"0123456789" * 7
    variants = [
        req("POST /x HTTP/1.1", "Host: h", "X-A:  1 ", "Content-Length: 70", body=body),
        req("POST /x HTTP/1.1", "Host: h", "Content-Length: 70", "X-A:1", body=body),
        req("POST /x HTTP/1.1", "Host: h", "X-A: 1", "Transfer-Encoding: chunked",
            body=b"a\r\n" + body[:10] + b"\r\n3c;x=y\r\n" + body[10:] + b"\r\n0\r\n\r\n"),
        b"\r\n\r\n" + req("POST /x HTTP/1.1", "Host: h", "Connection: keep-alive", "X-A: 1",
                          "Content-Length: 70, 70", body=body).replace(b"\r\n", b"\n"),
        req("POST /x HTTP/1.0", "Host: h", "X-A: 1", "Content-Length: 70",
            "Connection: Keep-Alive", "Keep-Alive: timeout=3", body=body),
    ]
    canon = {tuple(decode("http", v)) for v in variants}
    assert canon == {(b"POST /x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nContent-Length: 70\r\n\r\n"
                      + body,)}


# Plain alphabets, not from_regex: generation, not decoding, is what costs time here.
_NAME_CHARS = "abcXYZ019-"
_VALUE_CHARS = "ab:;,=/ \"\\~!"
header_names = st.text(_NAME_CHARS, min_size=1, max_size=8).map(lambda s: "X-" + s)
header_values = st.text(_VALUE_CHARS, max_size=12).map(lambda s: s.strip(" "))


@st.composite
def http_requests(draw):
    """-> (wire bytes in a random but valid framing, the canonical bytes expected)."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    target = "/" + draw(st.text("az09/?=&%.-", max_size=15))
    fields = draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=60))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    head = [f"{method} {target} HTTP/1.1", "Host: svc"] + [f"{n}:{v}" for n, v in fields]
    if draw(st.booleans()):
        head.insert(draw(st.integers(1, len(head))), "Connection: keep-alive")
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        head.append("Transfer-Encoding: chunked")
    wire = ("".join(h + eol for h in head) + eol).encode()
    if framing == "length":
        wire += body
    elif framing == "chunked":
        cuts = split_at(body, draw(st.lists(st.integers(0, 1000), max_size=4)))
        for piece in cuts:
            if piece:
                ext = draw(st.sampled_from(["", ";a", ";a=b", ' ; q="x y"']))
                wire += b"%x%s\r\n%s\r\n" % (len(piece), ext.encode(), piece)
        wire += b"0\r\n" + (b"X-Trailer: t\r\n" if draw(st.booleans()) else b"") + b"\r\n"
    canon = f"{method} {target} HTTP/1.1\r\nHost: svc\r\n"
    canon += "".join(f"{n}: {v}\r\n" for n, v in fields)
    if framing != "none":
        canon += f"Content-Length: {len(body)}\r\n"
    return wire, canon.encode() + b"\r\n" + body


@FAST
@given(reqs=st.lists(http_requests(), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 100_000), max_size=12))
def test_http_requests_any_split_give_the_canonical_form(reqs, cuts):
    wire = b"".join(w for w, _ in reqs)
    expected = [c for _, c in reqs]
    assert decode("http", wire) == expected
    assert run_decoder("http", split_at(wire, cuts))[:2] == (expected, None)
    assert run_decoder("http", one_by_one(wire))[:2] == (expected, None)


def test_http_request_size_limits():
    body = b"b" * 100
    ok = req("POST / HTTP/1.1", "Host: h", "Content-Length: 100", body=body)
    assert len(decode("http", ok, max_size=100)) == 1
    big = req("POST / HTTP/1.1", "Host: h", "Content-Length: 101", body=body + b"b")
    assert run_decoder("http", [big], max_size=100)[1] is MessageTooLarge
    chunked_ok = req("POST / HTTP/1.1", "Host: h", "Transfer-Encoding: chunked",
                     body=b"32\r\n" + b"c" * 50 + b"\r\n32\r\n" + b"c" * 50 + b"\r\n0\r\n\r\n")
    assert len(decode("http", chunked_ok, max_size=100)) == 1
    chunked_big = chunked_ok.replace(b"32\r\n" + b"c" * 50 + b"\r\n0", b"33\r\n" + b"c" * 51
                                     + b"\r\n0")
    msgs, err, _ = run_decoder("http", one_by_one(chunked_big), max_size=100)
    assert err is MessageTooLarge
    with pytest.raises(MessageTooLarge) as info:
        make_decoder("http", 100).feed(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n")
    assert info.value.status == 413


def test_http_header_block_limit():
    def head_of(size):
        start = b"GET / HTTP/1.1\r\nHost: h\r\n"
        pad = size - len(start) - len(b"X-Pad: \r\n\r\n")
        return start + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"
    assert len(head_of(MAX_HEADER_BYTES)) == MAX_HEADER_BYTES
    assert len(decode("http", head_of(MAX_HEADER_BYTES))) == 1
    msgs, err, _ = run_decoder("http", [head_of(MAX_HEADER_BYTES + 1)])
    assert err is MessageTooLarge
    with pytest.raises(MessageTooLarge) as info:     # no end of line in sight: refused early
        make_decoder("http", 10).feed(b"GET /" + b"a" * MAX_HEADER_BYTES)
    assert info.value.status == 431


@pytest.mark.parametrize("wire, status", [
    (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx", 417),
    (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x3\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A : 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\r\nHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nIdempotency-Key: a\r\nIdempotency-Key: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nIdempotency-Key: a b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;=x\r\nabc\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
     400),
])
def test_http_rejects(wire, status):
    for chunks in ([wire], one_by_one(wire)):
        msgs, err, dec = run_decoder("http", chunks)
        assert msgs == [] and err is not None
        with pytest.raises(FramingError) as info:
            dec.eof()
        assert info.value.status == status


def test_http_expect_ignored_in_http10():
    wire = req("POST / HTTP/1.0", "Expect: 100-continue", "Content-Length: 1", body=b"x")
    assert decode("http", wire) == [b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"]


def test_http_keep_alive_and_close():
    dec = make_decoder("http", 100)
    wire = (req("GET /1 HTTP/1.1", "Host: h") + req("GET /2 HTTP/1.1", "Host: h",
                                                    "Connection: close")
            + req("GET /3 HTTP/1.1", "Host: h"))
    msgs = dec.feed(wire)
    assert [m.split(b" ")[1] for m in msgs] == [b"/1", b"/2"]
    assert dec.wants_close and dec.finished
    assert dec.feed(b"garbage that is never parsed") == []
    assert dec.eof() == []
    dec = make_decoder("http", 100)
    assert len(dec.feed(req("GET / HTTP/1.0"))) == 1 and dec.wants_close
    dec = make_decoder("http", 100)
    dec.feed(req("GET / HTTP/1.0", "Connection: keep-alive"))
    assert not dec.wants_close and not dec.finished


def test_http_eof_mid_request():
    for partial in [b"GE", b"GET / HTTP/1.1\r\nHost: h\r\n",
                    req("POST / HTTP/1.1", "Host: h", "Content-Length: 5", body=b"ab"),
                    req("POST / HTTP/1.1", "Host: h", "Transfer-Encoding: chunked",
                        body=b"5\r\nhello\r\n")]:
        msgs, err, _ = run_decoder("http", [partial])
        assert msgs == [] and err is FramingError
    assert run_decoder("http", [b"\r\n\r\n"])[:2] == ([], None)


# -- http: responses -------------------------------------------------------------------------

def test_http_responses_with_expected_methods():
    wire = (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX: y\r\n\r\n"                # HEAD
            b"HTTP/1.1 100 Continue\r\n\r\n"                                        # dropped
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
            b"HTTP/1.1 201 \r\nTransfer-Encoding: chunked\r\n\r\n2;x\r\nhi\r\n0\r\nT: 1\r\n\r\n"
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    expected = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX: y\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
        b"HTTP/1.1 201 \r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ]
    methods = ["GET", "HEAD", b"POST", "GET", "POST", "GET"]
    for chunks in ([wire], one_by_one(wire)):
        msgs, err, dec = run_decoder("http", chunks, role="response", expects=methods)
        assert (msgs, err) == (expected, None)
        assert not dec.wants_close


def test_http_response_delimited_by_close():
    wire = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of this"
    for chunks in ([wire], one_by_one(wire)):
        msgs, err, dec = run_decoder("http", chunks, role="response")
        assert msgs == [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11"
                        b"\r\n\r\nall of this"]
        assert err is None and dec.wants_close
    msgs, err, _ = run_decoder("http", [b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11],
                               max_size=10, role="response")
    assert err is MessageTooLarge
    assert run_decoder("http", [b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10], max_size=10,
                       role="response")[1] is None


def test_http_response_close_stops_the_connection():
    dec = make_decoder("http", 100, "response")
    msgs = dec.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nxjunk")
    assert msgs == [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"]
    assert dec.wants_close and dec.finished


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
])
def test_http_bad_responses(wire):
    assert run_decoder("http", [wire], role="response")[1] is FramingError


def test_http_response_size_limit():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 10
    assert len(decode("http", ok, max_size=10, role="response")) == 1
    assert run_decoder("http", [ok.replace(b"10", b"11") + b"x"], max_size=10,
                       role="response")[1] is MessageTooLarge


# -- fuzz: bad bytes only ever raise FramingError --------------------------------------------

VALID_HTTP = [
    b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n"
    b"T: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nIdempotency-Key: \"k\"\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(VALID_HTTP)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        i = draw(st.integers(0, len(data)))
        b = draw(st.sampled_from([0, 9, 10, 13, 32, 34, 44, 48, 58, 59, 70, 127, 255]))
        if op == "insert":
            data[i:i] = bytes([b])
        elif i < len(data):
            if op == "flip":
                data[i] = b
            else:
                del data[i]
    return bytes(data)


@FAST
@given(data=st.one_of(st.binary(max_size=300), mutated()),
       mode=st.sampled_from(MODES), role=st.sampled_from(["request", "response"]),
       cuts=st.lists(st.integers(0, 1000), max_size=6), head=st.booleans())
def test_fuzz_only_framing_errors_and_split_independence(data, mode, role, cuts, head):
    expects = ["HEAD" if head else "GET"] * 3
    whole = run_decoder(mode, [data], max_size=64, role=role, expects=expects)
    split = run_decoder(mode, split_at(data, cuts), max_size=64, role=role, expects=expects)
    assert whole[:2] == split[:2]


# -- idempotency -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["close", "line", "length"])
def test_idempotency_envelope(mode):
    assert split_idempotency(mode, b"SMRD-IDEM abc-1.X_2 PUT k v") == ("abc-1.X_2", b"PUT k v")
    assert split_idempotency(mode, b"SMRD-IDEM k ") == ("k", b"")
    assert split_idempotency(mode, b"PUT k v") == (None, b"PUT k v")
    assert split_idempotency(mode, b"SMRD-IDEMX k v") == (None, b"SMRD-IDEMX k v")
    key = "k" * 128
    assert split_idempotency(mode, add_idempotency(mode, key, b"x")) == (key, b"x")
    for bad in [b"SMRD-IDEM ", b"SMRD-IDEM k", b"SMRD-IDEM  x", b"SMRD-IDEM k/1 x",
                b"SMRD-IDEM " + b"k" * 129 + b" x"]:
        with pytest.raises(FramingError):
            split_idempotency(mode, bad)
    with pytest.raises(ValueError):
        add_idempotency(mode, "bad key", b"x")
    assert ENVELOPE_PREFIX == b"SMRD-IDEM "


def test_idempotency_envelope_survives_framing():
    wire = encode("length", add_idempotency("length", "r-7", b"INC x"))
    (msg,) = decode("length", wire)
    assert split_idempotency("length", msg) == ("r-7", b"INC x")


def test_idempotency_http_header():
    for value, key in [(b"abc", "abc"), (b'"8e03978e-40d5"', "8e03978e-40d5")]:
        (msg,) = decode("http", req("POST / HTTP/1.1", "Host: h",
                                    "idempotency-key: " + value.decode(), "Content-Length: 0"))
        assert split_idempotency("http", msg) == (key, msg)
        assert b"idempotency-key: " + value in msg        # kept in what is replicated
    (msg,) = decode("http", req("GET / HTTP/1.1", "Host: h"))
    assert split_idempotency("http", msg) == (None, msg)
    with pytest.raises(ValueError):
        add_idempotency("http", "k", msg)


def test_http_request_method():
    assert http_request_method(b"HEAD / HTTP/1.1\r\n\r\n") == "HEAD"
    with pytest.raises(FramingError):
        http_request_method(b"\xff\xfe")


# -- error replies ---------------------------------------------------------------------------

def test_error_replies():
    assert error_reply("line", "cluster unavailable") == b"ERR smrd: cluster unavailable"
    assert error_reply("line", "bad\nthing\xe9") == b"ERR smrd: bad thing?"
    assert encode("length", error_reply("length", "x")) == b"\0\0\0\x0bERR smrd: x"
    assert error_reply("close", "x").startswith(ERROR_PREFIX)
    assert len(error_reply("line", "y" * 1000)) == len(ERROR_PREFIX) + 200
    resp = error_reply("http", "no quorum")
    (msg,) = decode("http", resp, role="response")
    assert msg.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert msg.endswith(b"\r\n\r\nsmrd: no quorum\n")


def test_http_error_response_is_well_formed():
    resp = http_error_response(413, None, "too big\n", close=True)
    phrase = HTTPStatus(413).phrase.encode()      # "Content Too Large" from Python 3.13 on
    assert resp == (b"HTTP/1.1 413 " + phrase + b"\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 8\r\n"
                    b"Connection: close\r\n\r\ntoo big\n")
    dec = make_decoder("http", 100, "response")
    assert len(dec.feed(resp)) == 1 and dec.wants_close
    assert http_error_response(400, "Bad\r\nRequest").startswith(b"HTTP/1.1 400 Bad  Request\r\n")
    with pytest.raises(ValueError):
        http_error_response(42)


# -- asyncio helpers over real loopback sockets ----------------------------------------------

def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("mode", ["line", "length", "http"])
def test_streams_persistent_echo(mode):
    """A gateway-like server reads pipelined requests; an app-adapter-like client reads replies."""
    if mode == "http":
        requests = [req(f"POST /{i} HTTP/1.1", "Host: h", f"Content-Length: {i}", body=b"x" * i)
                    for i in range(5)] + [req("HEAD /h HTTP/1.1", "Host: h")]
    else:
        requests = [b"", b"a", b"hello world", bytes(range(10)), b"x" * 200_000]

    def reply_for(message):
        if mode != "http":
            return b"re:" + message
        method = http_request_method(message)
        body = b"" if method == "HEAD" else message.split(b" ")[1]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def handler(reader, writer):
        messages = MessageReader(reader, mode, 1 << 20, "request")
        async for message in messages:
            await write_message(writer, mode, reply_for(message))
        writer.close()

    if mode == "http":
        sent = [make_decoder("http", 1 << 20).feed(r)[0] for r in requests]  # canonical
        wire = b"".join(requests)
    else:
        sent = requests
        wire = b"".join(encode(mode, r) for r in requests)

    async def main():
        server, port = await serve(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(wire)
        await writer.drain()
        replies = MessageReader(reader, mode, 1 << 20, "response")
        got = []
        for message in sent:
            replies.expect(http_request_method(message) if mode == "http" else "")
            got.append(await replies.next())
        writer.write_eof()
        assert await replies.next() is None               # clean EOF between messages
        writer.close()
        server.close()
        await server.wait_closed()
        return got

    got = run(main())
    assert got == [reply_for(m) for m in sent]


def test_streams_close_mode_exchange():
    async def handler(reader, writer):
        messages = MessageReader(reader, "close", 1000, "request")
        request = await messages.next()
        assert await messages.next() is None
        await write_message(writer, "close", b"got " + request)
        writer.close()

    async def main():
        server, port = await serve(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await write_message(writer, "close", b"SET k v")   # half-closes: ends the request
        reply = await MessageReader(reader, "close", 1000, "response").next()
        writer.close()
        server.close()
        await server.wait_closed()
        return reply

    assert run(main()) == b"got SET k v"


def test_streams_errors_surface_as_framing_errors():
    async def main():
        results = asyncio.Queue()

        async def handler(reader, writer):
            messages = MessageReader(reader, "http", 10, "request")
            try:
                while (message := await messages.next()) is not None:
                    await results.put(message)
            except FramingError as exc:
                writer.write(error_reply("http", str(exc), status=exc.status, close=True))
                await writer.drain()
                await results.put(exc)
            writer.close()

        server, port = await serve(handler)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req("GET / HTTP/1.1", "Host: h")
                     + req("POST / HTTP/1.1", "Host: h", "Content-Length: 11"))
        await writer.drain()
        answer = await reader.read()
        first, second = await results.get(), await results.get()
        writer.close()
        server.close()
        await server.wait_closed()
        return first, second, answer

    first, second, answer = run(main())
    assert first == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert isinstance(second, MessageTooLarge)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer


def test_streams_eof_mid_message():
    async def main():
        done = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            try:
                await MessageReader(reader, "length", 100).next()
            except FramingError as exc:
                done.set_result(exc)
            writer.close()

        server, port = await serve(handler)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\0\0\0\x05ab")
        writer.write_eof()
        exc = await done
        writer.close()
        server.close()
        await server.wait_closed()
        return exc

    assert "mid-message" in str(run(main()))


def test_random_splits_seeded():
    """A cheap non-hypothesis check of many pipelined http requests through random splits."""
    rng = random.Random(1234)
    wire = b"".join(req(f"PUT /{i} HTTP/1.1", "Host: h", "Transfer-Encoding: chunked",
                        body=b"%x\r\n%s\r\n0\r\n\r\n" % (i + 1, b"z" * (i + 1)))
                    for i in range(50))
    expected = decode("http", wire)
    assert len(expected) == 50
    for _ in range(20):
        cuts = [rng.randrange(len(wire)) for _ in range(rng.randrange(1, 200))]
        assert run_decoder("http", split_at(wire, cuts))[:2] == (expected, None)
