"""smrd.framing.resp: the RESP2 decoder in both roles, its bounds, inline commands, and how many
replies a replicated request gets. The state rules are in test_resp_rules.py.

The central properties, as for every mode: how bytes are split into reads never changes the
decoded messages (nor whether an error follows them), only FramingError escapes, and what a
decoder buffers stays within its bound.
"""
import random

import pytest

from smrd.framing import FramingError, MessageTooLarge, encode, error_reply, make_decoder
from smrd.framing.resp import (
    HEADER_MAX, INLINE_MAX, MAX_DEPTH, command_args, encode_command, reply_count, split_inline,
)


def cmd(*args):
    return encode_command([a if isinstance(a, bytes) else a.encode() for a in args])


def run(chunks, role="request", max_size=1 << 16, expects=()):
    """Feed chunks then EOF -> (messages, error class or None)."""
    dec = make_decoder("resp", max_size, role)
    for n in expects:
        dec.expect(n)
    out = []
    try:
        for chunk in chunks:
            out += dec.feed(chunk)
        out += dec.eof()
    except FramingError as exc:
        return out, type(exc)
    return out, None


def every_split(data, role="request", **kw):
    """The result of feeding data whole, then split once at every offset, then byte by byte:
    asserts they all agree and returns it."""
    whole = run([data], role, **kw)
    for i in range(len(data) + 1):
        assert run([data[:i], data[i:]], role, **kw) == whole, i
    assert run([data[i:i + 1] for i in range(len(data))], role, **kw) == whole
    return whole


# -- replies: every type ---------------------------------------------------------------------

REPLIES = [
    b"+OK\r\n", b"+\r\n", b"-ERR wrong type\r\n", b"-\r\n", b":0\r\n", b":-42\r\n",
    b":9223372036854775807\r\n", b":-9223372036854775808\r\n",
    b"$0\r\n\r\n", b"$5\r\nhello\r\n", b"$4\r\na\r\nb\r\n", b"$3\r\n\x00\xff\n\r\n", b"$-1\r\n",
    b"*0\r\n", b"*-1\r\n", b"*2\r\n$1\r\na\r\n:1\r\n",
    b"*3\r\n*2\r\n+a\r\n-b\r\n*0\r\n*1\r\n*1\r\n$-1\r\n",
    b"*2\r\n*-1\r\n$-1\r\n",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_every_reply_type_any_split(reply):
    assert every_split(reply, "response") == ([reply], None)


def test_pipelined_replies_come_out_one_by_one_any_split():
    wire = b"".join(REPLIES)
    assert every_split(wire, "response") == (REPLIES, None)


def test_a_block_reply_is_one_message_of_its_announced_count():
    # MULTI, SET, INCR, EXEC: +OK, +QUEUED, +QUEUED, then EXEC's array; then a plain GET's reply.
    block = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:1\r\n"
    wire = block + b"$1\r\n1\r\n"
    assert every_split(wire, "response", expects=(4, 1)) == ([block, b"$1\r\n1\r\n"], None)
    # Not announced: one value per message, as for plain requests.
    assert len(run([wire], "response")[0]) == 5
    # An incomplete block at EOF is a connection closed mid-message.
    assert run([block[:-5]], "response", expects=(4,)) == ([], FramingError)


def test_expect_other_hints_count_as_one():
    dec = make_decoder("resp", 100, "response")
    for hint in ("GET", 0, -3, True, None):
        dec.expect(hint)
    assert dec.feed(b":1\r\n:2\r\n") == [b":1\r\n", b":2\r\n"]


@pytest.mark.parametrize("wire", [
    b"OK\r\n",                      # no type byte
    b"+OK\n",                       # bare LF
    b"+O\rK\r\n",                   # CR inside a simple string
    b":1.5\r\n", b":+1\r\n", b":01\r\n", b":-0\r\n", b":\r\n",
    b":9223372036854775808\r\n",    # over int64
    b"$-2\r\n", b"$01\r\nx\r\n", b"$+1\r\nx\r\n", b"$x\r\n", b"$1\r\nxy\r\n", b"$1\r\nx\n\n",
    b"*-2\r\n", b"*a\r\n", b"*1\r\n!\r\n",
    b"%1\r\n+a\r\n+b\r\n", b"_\r\n", b",1.5\r\n", b"#t\r\n", b">1\r\n+a\r\n",  # RESP3
])
def test_malformed_replies(wire):
    msgs, err = every_split(wire, "response")
    assert msgs == [] and err is FramingError


def test_eof_mid_reply_and_clean_eof():
    for cut in (b"+OK", b"$5\r\nhel", b"*2\r\n:1\r\n", b"$3\r\n"):
        assert run([cut], "response") == ([], FramingError)
    assert run([b":1\r\n"], "response") == ([b":1\r\n"], None)
    assert run([], "response") == ([], None)


def test_error_after_good_replies_is_deferred_and_sticky():
    dec = make_decoder("resp", 100, "response")
    assert dec.feed(b":1\r\n?\r\n") == [b":1\r\n"]
    assert dec.error is not None
    with pytest.raises(FramingError):
        dec.feed(b":2\r\n")
    with pytest.raises(FramingError):
        dec.eof()


# -- replies: bounds -------------------------------------------------------------------------

def test_reply_size_limit_exact_and_over():
    ok = b"$4\r\n" + b"x" * 4 + b"\r\n"       # 10 bytes
    assert run([ok], "response", max_size=10) == ([ok], None)
    assert run([ok], "response", max_size=9)[1] is MessageTooLarge
    simple = b"+" + b"y" * 8 + b"\r\n"        # 11 bytes
    assert every_split(simple, "response", max_size=11) == ([simple], None)
    assert every_split(simple, "response", max_size=10) == ([], MessageTooLarge)
    # A block of several values is bounded as a whole.
    assert run([b":1\r\n:2\r\n"], "response", max_size=7, expects=(2,))[1] is MessageTooLarge


def test_huge_declared_lengths_are_refused_before_buffering():
    for header in (b"$2147483648\r\n", b"$999999999999999999\r\n", b"*1000000000\r\n",
                   b"*3\r\n$1\r\na\r\n$99999999\r\n"):
        dec = make_decoder("resp", 1 << 20, "response")
        with pytest.raises(MessageTooLarge):
            dec.feed(header)
    # Too many digits for any length at all: a malformed header, not an allocation.
    with pytest.raises(FramingError):
        make_decoder("resp", 1 << 20, "response").feed(b"$" + b"9" * 25 + b"\r\n")
    # A header line that never ends is refused once it is longer than any header can be.
    dec = make_decoder("resp", 1 << 20, "response")
    with pytest.raises(FramingError):
        for _ in range(HEADER_MAX + 2):
            dec.feed(b"1" if dec.partial else b"*")


def test_nesting_depth_bound():
    ok = b"*1\r\n" * MAX_DEPTH + b":1\r\n"
    assert run([ok], "response") == ([ok], None)
    deep = b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n"
    assert run([deep], "response") == ([], FramingError)
    # Deep nesting fed slowly fails just the same, and never recurses.
    assert run([deep[i:i + 3] for i in range(0, len(deep), 3)], "response") == ([], FramingError)


def test_slow_feeding_is_not_quadratic_and_buffers_one_message():
    # 200 KB simple string fed 7 bytes at a time: linear (the scan resumes), bounded buffer.
    big = b"+" + b"z" * 200_000 + b"\r\n"
    dec = make_decoder("resp", 300_000, "response")
    out = []
    for i in range(0, len(big), 7):
        out += dec.feed(big[i:i + 7])
        assert len(dec._buf) <= len(big)
    assert out == [big] and not dec.partial


# -- requests --------------------------------------------------------------------------------

def test_commands_any_split_and_pipelined():
    wire = (cmd("SET", "k", "v") + b"*0\r\n" + b"*-1\r\n" + cmd("GET", "k") + cmd("") +
            cmd("SET", "bin", b"\r\n\x00\xff"))
    msgs, err = every_split(wire)
    assert err is None
    assert msgs == [cmd("SET", "k", "v"), cmd("GET", "k"), cmd(""), cmd("SET", "bin", b"\r\n\x00\xff")]
    assert command_args(msgs[3]) == [b"SET", b"bin", b"\r\n\x00\xff"]
    assert command_args(msgs[3], 1) == [b"SET"]


def test_inline_commands_become_canonical_arrays():
    wire = (b"PING\r\n" + b"set k \"a b\\x41\\n\"\n" + b"\r\n" + b"   \t\n" +
            b"get 'it\\'s'\r\n" + b"echo a\"b c\" d\r\n")
    msgs, err = every_split(wire)
    assert err is None
    assert msgs == [cmd("PING"), cmd("set", "k", "a bA\n"), cmd("get", "it's"),
                    cmd("echo", "ab c", "d")]


@pytest.mark.parametrize("line, args", [
    (b"", []), (b"  a  b ", [b"a", b"b"]), (b'"" x', [b"", b"x"]), (b"''", [b""]),
    (b'"\\t\\r\\n\\b\\a\\\\\\"\\q"', [b"\t\r\n\b\a\\\"q"]), (b'"\\x4a\\xzz"', [b"Jxzz"]),
    (b"'a\\nb'", [b"a\\nb"]), (b"a'b c'", [b"ab c"]),
])
def test_split_inline_like_sdssplitargs(line, args):
    assert split_inline(line) == args


@pytest.mark.parametrize("line", [b'"abc', b"'abc", b'"a"b', b"'a'b", b"a\x00b"])
def test_split_inline_refuses_what_redis_refuses(line):
    with pytest.raises(FramingError):
        split_inline(line)


@pytest.mark.parametrize("wire", [
    b"*1\r\n+PING\r\n",             # not a bulk string
    b"*1\r\n:1\r\n",
    b"*2\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n",  # nested array
    b"*1\r\n$-1\r\n",               # null bulk
    b"*-2\r\n", b"*01\r\n$1\r\na\r\n", b"*1\r\n$1\r\nab\r\n", b"*1\n$1\r\na\r\n",
    b"*1\r\n$1\r\na\r\n\x00",       # trailing garbage starts an inline with NUL
    b'SET a "b\r\n',                # unbalanced quotes
])
def test_malformed_commands(wire):
    msgs, err = every_split(wire)
    assert err is FramingError


def test_command_bounds():
    c = cmd("SET", "k", "v" * 10)   # 32 bytes
    assert run([c], max_size=len(c)) == ([c], None)
    assert run([c], max_size=len(c) - 1)[1] is MessageTooLarge
    # A declared count no command of that size could have, and a huge bulk: refused at the header.
    for header in (b"*200000\r\n", b"*2\r\n$3\r\nSET\r\n$1048577\r\n"):
        with pytest.raises(MessageTooLarge):
            make_decoder("resp", 1 << 20).feed(header)
    # Inline: the canonical form is bounded too (it is what is replicated).
    line = b"a " * 10 + b"\r\n"    # 10 args -> 10 * 7 + 5 bytes canonical
    assert run([line], max_size=74)[1] is MessageTooLarge
    assert len(run([line], max_size=75)[0]) == 1
    # An inline line over INLINE_MAX is refused without waiting for its newline.
    dec = make_decoder("resp", 1 << 20)
    with pytest.raises(MessageTooLarge):
        dec.feed(b"x" * (INLINE_MAX + 2))


def test_eof_mid_command():
    assert run([b"*2\r\n$3\r\nGET\r\n"]) == ([], FramingError)
    assert run([b"GET k"]) == ([], FramingError)
    assert run([b"GET k\r\n"]) == ([cmd("GET", "k")], None)


# -- reply counts, encode, error replies -----------------------------------------------------

def test_reply_count():
    block = cmd("MULTI") + cmd("SET", "a", "1") + cmd("INCR", "a") + cmd("EXEC")
    assert reply_count(block) == 4
    assert reply_count(cmd("multi") + cmd("exec")) == 2
    assert reply_count(cmd("GET", "a")) == 1
    assert reply_count(cmd("MULTI")) == 1
    assert reply_count(cmd("MULTI") + b"garbage") == 1  # never raises


def test_encode_and_error_reply():
    assert encode("resp", bytearray(b"+OK\r\n")) == b"+OK\r\n"
    err = error_reply("resp", "bad\r\nthing")
    assert err == b"-ERR smrd: bad  thing\r\n"
    assert run([err], "response") == ([err], None)


# -- fuzz (seeded): only FramingError escapes, split independence, bounded buffers ------------

def _random_value(rng, depth=0):
    kind = rng.randrange(7 if depth < 4 else 5)
    if kind == 0:
        return b"+" + bytes(rng.choice(b"abcOK ") for _ in range(rng.randrange(6))) + b"\r\n"
    if kind == 1:
        return b"-ERR " + b"e" * rng.randrange(4) + b"\r\n"
    if kind == 2:
        return b":%d\r\n" % rng.randrange(-10 ** 6, 10 ** 6)
    if kind == 3:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
        return b"$%d\r\n%s\r\n" % (len(data), data)
    if kind == 4:
        return rng.choice([b"$-1\r\n", b"*-1\r\n", b"*0\r\n"])
    n = rng.randrange(4)
    return b"*%d\r\n" % n + b"".join(_random_value(rng, depth + 1) for _ in range(n))


def _random_command(rng):
    if rng.random() < 0.2:
        return b"SET k " + bytes(rng.choice(b"ab\"' \\x") for _ in range(rng.randrange(8))) + b"\r\n"
    return cmd(*[bytes(rng.randrange(256) for _ in range(rng.randrange(6)))
                 for _ in range(1 + rng.randrange(4))])


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] = rng.choice(b"*$+-:\r\n0-9\x00\xff%_")
        elif op == 1:
            data[i:i] = bytes([rng.randrange(256)])
        elif op == 2 and data:
            del data[min(i, len(data) - 1)]
        elif op == 3:
            data = data[:i]                                   # truncated
        elif op == 4:
            data[i:i] = rng.choice([b"$99999999999\r\n", b"*2147483647\r\n", b"$-7\r\n",
                                    b"*" + b"9" * 40 + b"\r\n"])  # huge lengths
        else:
            data[i:i] = b"*1\r\n" * rng.randrange(20, 200)     # deep nesting
    return bytes(data)


@pytest.mark.parametrize("role", ["request", "response"])
def test_fuzz_seeded(role):
    rng = random.Random(0x5EED + (role == "response"))
    max_size = 256
    for _ in range(3000):
        if role == "request":
            good = b"".join(_random_command(rng) for _ in range(rng.randrange(1, 4)))
        else:
            good = b"".join(_random_value(rng) for _ in range(rng.randrange(1, 4)))
        data = _mutate(rng, good) if rng.random() < 0.8 else good
        if rng.random() < 0.1:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        expects = [rng.randrange(1, 4) for _ in range(3)] if role == "response" else []
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(5)))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]

        results = []
        for chunks in ([data], pieces):
            dec = make_decoder("resp", max_size, role)
            for n in expects:
                dec.expect(n)
            out, err = [], None
            try:
                for chunk in chunks:
                    out += dec.feed(chunk)
                    # Never more than one message's bound plus one header line plus this feed.
                    assert len(dec._buf) <= max_size + HEADER_MAX + len(chunk) + 2
                out += dec.eof()
            except FramingError as exc:
                err = type(exc)
            for msg in out:
                assert len(msg) <= max_size
            results.append((out, err))
        assert results[0] == results[1], data
