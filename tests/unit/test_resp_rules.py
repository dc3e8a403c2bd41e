"""Per-connection state rules of the resp framing (smrd.framing.rules + smrd.framing.resp):
which commands are refused and why, MULTI...EXEC blocks ordered as one request, refused blocks,
and a block's errors spread over one reply per command.

The rules run on a real request decoder's output, as in the gateway; ``submit`` stands for the
gateway's reply_for (it records what would be ordered).
"""
import asyncio

import pytest

from smrd.framing import make_decoder, state_rules
from smrd.framing.resp import REFUSED, classify, encode_command, reply_count
from smrd.framing.rules import CLOSE, GROUP_END, GROUP_START, PASS, REFUSE, Answer, Group


def cmd(*args):
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


class Conn:
    """A client connection's decoder and rules; ``feed`` returns what the gateway would queue:
    ("order", bytes, count) for what is ordered, ("answer", bytes) for what is answered at once."""

    def __init__(self, max_size=1 << 16):
        self.decoder = make_decoder("resp", max_size, "request")
        self.ordered = []
        self.rules = state_rules("resp", self.decoder, self.ordered.append, max_size)

    def feed(self, data):
        out = []
        for item in self.rules.take(self.decoder.feed(data)):
            if type(item) is Answer:
                out.append(("answer", bytes(item)))
            else:
                out.append(("order", bytes(item), item.count if type(item) is Group else 1))
        return out


MULTI_ALONE = (b"-ERR smrd: MULTI must be sent together with its commands and EXEC in one write "
               b"(per-connection state, see docs/app-contract.md)\r\n")


# -- classify --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, rule", sorted((n.decode(), r) for n, r in REFUSED.items()))
def test_every_refused_command_names_its_rule(name, rule):
    for spelled in (name, name.lower()):
        verdict, reason = classify(cmd(spelled, "x", "y"))
        assert verdict == REFUSE
        assert reason.startswith(f"{name} is refused: it ") and f"(rule '{rule}'" in reason
        assert "docs/app-contract.md" in reason


@pytest.mark.parametrize("args, verdict", [
    (("GET", "k"), PASS), (("SET", "k", "v"), PASS), (("set", "k", "v", "NX", "GET"), PASS),
    (("SET", "k", "EX"), PASS),                      # the value "EX", not the option
    (("SET", "k", "v", "KEEPTTL"), PASS),
    (("SET", "k", "v", "ex", "10"), REFUSE), (("SET", "k", "v", "PXAT", "1"), REFUSE),
    (("GETEX", "k"), PASS), (("GETEX", "k", "PERSIST"), PASS), (("GETEX", "k", "EX", "1"), REFUSE),
    (("XADD", "s", "1-1", "f", "v"), PASS), (("XADD", "s", "5-*", "f", "v"), PASS),
    (("XADD", "s", "*", "f", "v"), REFUSE), (("XADD", "s", "NOMKSTREAM", "*", "f", "v"), REFUSE),
    (("XADD", "s", "MAXLEN", "~", "10", "*", "f", "v"), REFUSE),
    (("XADD", "s", "MINID", "0", "LIMIT", "5", "2-0", "f", "v"), PASS), (("XADD", "s"), PASS),
    (("XREAD", "COUNT", "2", "STREAMS", "s", "0"), PASS),
    (("XREAD", "BLOCK", "0", "STREAMS", "s", "$"), REFUSE),
    (("XREAD", "STREAMS", "block", "0"), PASS),     # a stream named "block"
    (("XREADGROUP", "GROUP", "g", "c", "block", "5", "STREAMS", "s", ">"), REFUSE),
    (("RESTORE", "k", "0", "payload"), PASS), (("RESTORE", "k", "100", "payload"), REFUSE),
    (("RESTORE", "k", "0", "payload", "IDLETIME", "5"), REFUSE),
    (("OBJECT", "ENCODING", "k"), PASS), (("OBJECT", "freq", "k"), REFUSE),
    (("MULTI",), GROUP_START), (("exec",), GROUP_END), (("DISCARD",), GROUP_END),
    (("QUIT",), CLOSE), (("PING",), PASS), (("COMMAND", "DOCS"), PASS), (("",), PASS),
])
def test_classify(args, verdict):
    assert classify(cmd(*args))[0] == verdict


# -- blocks ----------------------------------------------------------------------------------

BLOCK = [cmd("MULTI"), cmd("SET", "a", "1"), cmd("INCR", "a"), cmd("EXEC")]


def test_a_block_sent_in_one_write_is_ordered_as_one_request():
    c = Conn()
    out = c.feed(cmd("GET", "x") + b"".join(BLOCK) + cmd("GET", "a"))
    assert out == [("order", cmd("GET", "x"), 1), ("order", b"".join(BLOCK), 4),
                   ("order", cmd("GET", "a"), 1)]
    assert reply_count(out[1][1]) == 4   # what the replicas will expect for it


def test_a_block_split_inside_a_command_waits_for_the_rest():
    wire = b"".join(BLOCK)
    for cut in range(1, len(wire)):
        c = Conn()
        first = c.feed(wire[:cut])
        if c.decoder.partial:
            assert first == []
            assert c.feed(wire[cut:]) == [("order", wire, 4)]


def test_multi_alone_is_refused_and_its_block_aborted():
    c = Conn()
    assert c.feed(cmd("MULTI")) == [("answer", MULTI_ALONE)]
    # What the client sends next, up to EXEC, runs nowhere: as a transaction whose queueing failed.
    (kind, reply), = c.feed(cmd("SET", "a", "1"))
    assert kind == "answer" and reply.startswith(b"-ERR smrd: inside a refused block: MULTI must")
    assert c.feed(cmd("EXEC")) == [
        ("answer", b"-EXECABORT smrd: Transaction discarded because smrd refused it\r\n")]
    assert c.feed(cmd("GET", "a")) == [("order", cmd("GET", "a"), 1)]
    assert c.ordered == []   # the rules order nothing themselves; the gateway submits


def test_discard_ends_a_refused_block_with_ok():
    c = Conn()
    c.feed(cmd("MULTI") + cmd("SET", "a", "1"))
    assert c.feed(cmd("DISCARD")) == [("answer", b"+OK\r\n")]
    assert c.feed(cmd("DISCARD")) == [("order", cmd("DISCARD"), 1)]  # no block: the app answers


def test_a_refused_command_inside_a_block_refuses_the_whole_block():
    c = Conn()
    out = c.feed(cmd("MULTI") + cmd("SET", "a", "1") + cmd("BLPOP", "l", "0") + cmd("INCR", "a") +
                 cmd("EXEC") + cmd("GET", "a"))
    replies = b"".join(r[1] for r in out if r[0] == "answer")
    # One reply per command the client sent: 3 errors, 1 for INCR, then EXECABORT.
    assert replies.count(b"\r\n") == 5
    assert replies.count(b"-ERR smrd: BLPOP is refused") == 3
    assert replies.endswith(b"-EXECABORT smrd: Transaction discarded because smrd refused it\r\n")
    assert out[-1] == ("order", cmd("GET", "a"), 1)


def test_a_block_over_the_size_limit_is_refused():
    c = Conn(max_size=100)
    out = c.feed(cmd("MULTI") + cmd("SET", "a", "x" * 40) + cmd("SET", "b", "y" * 40) + cmd("EXEC"))
    replies = b"".join(r[1] for r in out)
    assert [r[0] for r in out] == ["answer"] * len(out)
    assert replies.count(b"-ERR smrd: the block exceeds the limit of 100 bytes") == 3
    assert replies.endswith(b"-EXECABORT smrd: Transaction discarded because smrd refused it\r\n")


def test_nested_multi_goes_to_the_app_inside_the_block():
    c = Conn()
    wire = cmd("MULTI") + cmd("MULTI") + cmd("EXEC")
    assert c.feed(wire) == [("order", wire, 3)]


def test_exec_without_multi_goes_to_the_app():
    assert Conn().feed(cmd("EXEC")) == [("order", cmd("EXEC"), 1)]


def test_refused_commands_outside_blocks_are_answered_not_ordered():
    c = Conn()
    out = c.feed(cmd("SET", "a", "1") + cmd("SELECT", "1") + cmd("GET", "a"))
    assert out[0] == ("order", cmd("SET", "a", "1"), 1) and out[2] == ("order", cmd("GET", "a"), 1)
    assert out[1][0] == "answer" and out[1][1].startswith(b"-ERR smrd: SELECT is refused: it keeps")


def test_quit_answers_ok_and_stops_reading():
    c = Conn()
    out = c.feed(cmd("GET", "a") + cmd("QUIT") + cmd("SET", "b", "2"))
    assert out == [("order", cmd("GET", "a"), 1), ("answer", b"+OK\r\n")]
    assert c.decoder.finished
    assert c.decoder.feed(cmd("SET", "c", "3")) == []   # dropped unread


def test_quit_inside_a_block_refuses_it():
    out = Conn().feed(cmd("MULTI") + cmd("QUIT") + cmd("EXEC"))
    assert all(kind == "answer" for kind, *_ in out)
    assert b"".join(r[1] for r in out).count(b"\r\n") == 3


def test_eof_with_an_open_block_refuses_it():
    # The gateway calls take() with what eof() gives (a half command at EOF is a framing error).
    c = Conn()
    out = c.rules.take(c.decoder.feed(cmd("MULTI")) + c.decoder.eof())
    assert out == [MULTI_ALONE]


# -- a block's reply, or its error spread over its commands ----------------------------------

def test_reply_for_spreads_a_blocks_error_over_its_commands():
    async def main():
        loop = asyncio.get_running_loop()
        futures = []

        def submit(payload):
            futures.append(loop.create_future())
            return futures[-1]

        c = Conn()
        c.rules.submit = submit
        items = c.rules.take(c.decoder.feed(b"".join(BLOCK) * 3 + cmd("GET", "a") + cmd("PING")))
        replies = [c.rules.reply_for(i) for i in items]
        futures[0].set_result(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:1\r\n")
        futures[1].set_exception(RuntimeError("cluster unavailable: no reply within 5 s"))
        futures[2].cancel()
        futures[3].set_exception(RuntimeError("cluster unavailable"))
        await asyncio.wait_for(asyncio.gather(*replies[:3]), 5)
        assert replies[0].result() == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:1\r\n"
        assert replies[1].result() == (
            b"-ERR smrd: cluster unavailable: no reply within 5 s\r\n" * 4)
        assert replies[2].result() == b"-ERR smrd: gateway shutting down\r\n" * 4
        assert replies[3] is futures[3]   # a single request: the gateway's own error path
        assert isinstance(replies[4], asyncio.Future)

    asyncio.run(main())


def test_reply_for_a_block_refused_by_the_gateway_spreads_too():
    c = Conn()
    c.rules.submit = lambda payload: b"-ERR smrd: no\r\n"
    (item,) = c.rules.take(c.decoder.feed(b"".join(BLOCK)))
    assert c.rules.reply_for(item) == b"-ERR smrd: no\r\n" * 4


def test_other_modes_have_no_rules():
    for mode in ("close", "line", "length", "http"):
        assert state_rules(mode, make_decoder(mode, 10), lambda r: r, 10) is None
