# Every protocol message survives the wire codec, and malformed frames are refused with
# ProtocolError (never another exception): what a replica port receives from a stranger.
import random

import pytest
from hypothesis import given, settings, strategies as st

from smrd import core
from smrd.errors import ProtocolError
from smrd.protocol import messages as m

u64 = st.integers(0, (1 << 64) - 1)
small = st.integers(0, 1 << 40)
batch = st.lists(st.tuples(u64, u64, st.binary(max_size=40)), max_size=5).map(core.pack_batch)
sender = st.integers(0, 63)

MESSAGES = st.one_of(
    st.builds(m.Requests, batch, st.booleans()), batch.map(m.Forward), batch.map(m.Replies),
    batch.map(m.ReplyErrors),
    st.builds(m.Propose, small, small, batch, small),
    st.builds(m.Accepted, small, small, st.integers(1, 1000)),
    st.builds(m.Commit, small, small),
    st.builds(m.Ack, small, small),
    st.builds(m.StartViewChange, small),
    st.builds(m.DoViewChange, small, small, st.lists(st.tuples(small, u64, batch), max_size=4).map(tuple)),
    st.builds(m.StartView, small, small, st.lists(st.tuples(small, batch), max_size=4).map(tuple)),
    st.builds(m.CatchupRequest, small, small),
    st.builds(m.CatchupReply, small, small, st.lists(st.tuples(small, batch), max_size=4).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(sender, MESSAGES)
def test_every_message_round_trips(who, msg):
    frame = m.encode(who, msg)
    assert m.decode(frame) == (who, msg)


@settings(max_examples=300, deadline=None)
@given(sender, MESSAGES, st.randoms(use_true_random=False))
def test_mutated_frames_raise_only_protocol_error(who, msg, rnd):
    frame = bytearray(m.encode(who, msg))
    kind = rnd.randrange(3)
    if kind == 0 and frame:
        frame[rnd.randrange(len(frame))] ^= 1 << rnd.randrange(8)
    elif kind == 1:
        del frame[rnd.randrange(len(frame)):]
    else:
        frame += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    try:
        m.decode(bytes(frame))
    except ProtocolError:
        pass


def test_a_frame_with_a_valid_checksum_but_bad_body_is_refused():
    # The checksum protects against corruption, not against a peer that sends nonsense.
    bad = [
        core.encode_frame(m.PROPOSE, 1, 1, 1, b"short"),
        core.encode_frame(m.PROPOSE, 1, 1, 1, bytes(8) + b"not a batch"),
        core.encode_frame(m.ACCEPTED, 1, 1, 1, b"\x00\x00\x00\x00"),
        core.encode_frame(m.COMMIT, 1, 1, 1, b"unexpected"),
        core.encode_frame(m.START_VIEW, 1, 1, 1, b"\xff" * 20),
        core.encode_frame(99, 1, 1, 1, b""),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError):
            m.decode(frame)


def test_random_garbage_is_refused():
    rnd = random.Random(7)
    for _ in range(2000):
        data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(64)))
        with pytest.raises(ProtocolError):
            m.decode(data)
