# The two _core twins must be indistinguishable: the same bytes out, the same decode results, the
# same exceptions (type and message) on the same inputs, and the same state after the same
# operation sequences (hypothesis stateful machines drive both side by side).
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from smrd import _core_py as P

C = pytest.importorskip("smrd._core", reason="smrd._core is not built: run `pip install -e .`")

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)
# Mostly valid, sometimes just out of range, so error paths are compared too.
maybe_u64 = st.one_of(u64, st.sampled_from([-1, 2**64]))


def plain(value):
    """Comparable form of a result: memoryviews become bytes, Batches their contents."""
    if isinstance(value, memoryview):
        return ("view", value.tobytes())
    if isinstance(value, (P.Batch, C.Batch)):
        return ("batch", value.timestamp, value.flags, value.nbytes,
                [plain(entry) for entry in value])
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def outcome(fn, *args, **kwargs):
    try:
        return ("ok", plain(fn(*args, **kwargs)))
    except (ValueError, IndexError) as exc:
        # Ours (ProtocolError is a ValueError): the message is part of the contract.
        return ("error", type(exc).__name__, str(exc))
    except Exception as exc:
        # Argument conversion (OverflowError, TypeError): the wording is the runtime's own.
        return ("error", type(exc).__name__)


def same(attr, *args, **kwargs):
    got_c = outcome(getattr(C, attr), *args, **kwargs)
    got_py = outcome(getattr(P, attr), *args, **kwargs)
    assert got_c == got_py, (attr, args, kwargs)
    return got_c


def test_same_api():
    assert sorted(C.__all__) == sorted(P.__all__)
    for name in P.__all__:
        assert hasattr(C, name), name
        if isinstance(getattr(P, name), type):
            public = {m for m in dir(getattr(P, name)) if not m.startswith("_")}
            assert public <= set(dir(getattr(C, name))), (name, public - set(dir(getattr(C, name))))
        elif not callable(getattr(P, name)) and name != "IMPLEMENTATION":
            assert getattr(C, name) == getattr(P, name), name


# ------------------------------------------------------------------------------------- framing

@SETTINGS
@given(mtype=st.integers(-1, 256), sender=st.integers(-1, 0x10000), view=maybe_u64,
       instance=maybe_u64, payload=st.binary(max_size=600), flags=u16)
def test_encode_identical(mtype, sender, view, instance, payload, flags):
    result = same("encode_frame", mtype, sender, view, instance, payload, flags=flags)
    if result[0] == "ok":
        same("decode_frame", result[1])


@SETTINGS
@given(blob=st.binary(max_size=120), max_payload=st.sampled_from([0, 8, 2**26, 2**40]))
def test_decode_random_bytes_identical(blob, max_payload):
    same("decode_frame", blob, max_payload)
    same("decode_frame", b"SM\x01" + blob, max_payload)


@SETTINGS
@given(fields=st.tuples(st.integers(0, 255), u16, u64, u64, st.binary(max_size=100), u16),
       data=st.data())
def test_decode_mutated_frames_identical(mutate, fields, data):
    frame = P.encode_frame(*fields[:5], flags=fields[5])
    bad = mutate(data, frame)
    same("decode_frame", bad)
    same("decode_frame", bytearray(bad))


@SETTINGS
@given(blob=st.binary(max_size=2000), value=st.integers(-(2**33), 2**33))
def test_crc32_identical(blob, value):
    same("crc32", blob, value)


# ------------------------------------------------------------------------------------ batching

entries_st = st.lists(st.tuples(maybe_u64, maybe_u64, st.binary(max_size=80)), max_size=12)


@SETTINGS
@given(entries=entries_st, timestamp=maybe_u64, flags=st.integers(0, 2**32))
def test_pack_identical(entries, timestamp, flags):
    result = same("pack_batch", entries, timestamp, flags)
    if result[0] == "ok":
        same("Batch", result[1])


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_batch_random_bytes_identical(blob):
    same("Batch", blob)
    same("Batch", bytes(4) + blob)  # a small count, so entries get parsed


@SETTINGS
@given(entries=st.lists(st.tuples(u64, u64, st.binary(max_size=50)), max_size=8), data=st.data())
def test_batch_mutations_identical(mutate, entries, data):
    bad = mutate(data, P.pack_batch(entries, 11, 3))
    same("Batch", bad)
    same("Batch", memoryview(bad))


@SETTINGS
@given(max_count=st.integers(1, 6), max_bytes=st.integers(1, 300),
       ops=st.lists(st.one_of(
           st.tuples(st.just("add"), maybe_u64, u64, st.binary(max_size=90)),
           st.tuples(st.just("build"), u64, st.integers(0, 2**32 - 1))), max_size=25))
def test_builder_identical(max_count, max_bytes, ops):
    builders = (C.BatchBuilder(max_count, max_bytes), P.BatchBuilder(max_count, max_bytes))
    for op in ops:
        results = [outcome(getattr(b, op[0]), *op[1:]) for b in builders]
        assert results[0] == results[1], op
        assert [(b.count, b.nbytes) for b in builders] == [(builders[1].count, builders[1].nbytes)] * 2


# -------------------------------------------------------------------- stateful: quorum tracker

class QuorumTwins(RuleBasedStateMachine):
    """Drives both QuorumTrackers with the same votes and compares every answer."""

    def __init__(self):
        super().__init__()
        self.trackers = None

    @precondition(lambda self: self.trackers is None)
    @rule(n=st.integers(1, 9), extra=st.integers(0, 8))
    def create(self, n, extra):
        quorum = min(n, n // 2 + 1 + extra % 2)
        self.trackers = (C.QuorumTracker(n, quorum), P.QuorumTracker(n, quorum))

    def both(self, method, *args):
        results = [outcome(getattr(t, method), *args) for t in self.trackers]
        assert results[0] == results[1], (method, args, results)

    @precondition(lambda self: self.trackers is not None)
    @rule(instance=st.integers(0, 6), view=st.integers(0, 3), replica=st.integers(-1, 9))
    def add(self, instance, view, replica):
        self.both("add", instance, view, replica)

    @precondition(lambda self: self.trackers is not None)
    @rule(instance=st.integers(-1, 8))
    def discard_below(self, instance):
        self.both("discard_below", instance)

    @precondition(lambda self: self.trackers is not None)
    @rule(instance=st.integers(0, 7))
    def query(self, instance):
        for method in ("count", "reached", "view_of", "voters"):
            self.both(method, instance)

    @invariant()
    def same_size(self):
        if self.trackers is not None:
            assert len(self.trackers[0]) == len(self.trackers[1])


class ReplyCacheTwins(RuleBasedStateMachine):
    """Drives both ReplyCaches with the same operations and compares every answer."""

    def __init__(self):
        super().__init__()
        self.caches = None

    @precondition(lambda self: self.caches is None)
    @rule(k=st.integers(1, 4))
    def create(self, k):
        self.caches = (C.ReplyCache(k), P.ReplyCache(k))

    def both(self, method, *args):
        results = [outcome(getattr(c, method), *args) for c in self.caches]
        assert results[0] == results[1], (method, args, results)
        return results[0]

    @precondition(lambda self: self.caches is not None)
    @rule(cid=st.integers(0, 3), seq=st.integers(0, 12), reply=st.one_of(st.none(), st.binary(max_size=4)),
          timestamp=st.integers(0, 50))
    def check_then_put(self, cid, seq, reply, timestamp):
        # What a replica does: only NEW requests are executed and recorded.
        if self.both("check", cid, seq) == ("ok", P.NEW):
            self.both("put", cid, seq, reply, timestamp)

    @precondition(lambda self: self.caches is not None)
    @rule(cid=st.integers(0, 3), seq=st.integers(0, 12), reply=st.binary(max_size=4),
          timestamp=st.integers(0, 50))
    def put_anyway(self, cid, seq, reply, timestamp):
        self.both("put", cid, seq, reply, timestamp)

    @precondition(lambda self: self.caches is not None)
    @rule(older_than=st.integers(0, 60))
    def expire(self, older_than):
        self.both("expire", older_than)

    @precondition(lambda self: self.caches is not None)
    @rule(cid=st.integers(-1, 4), seq=st.integers(-1, 13))
    def query(self, cid, seq):
        for method, args in (("check", (cid, seq)), ("get", (cid, seq)), ("floor", (cid,)),
                             ("last_active", (cid,)), ("__contains__", (cid,))):
            self.both(method, *args)

    @invariant()
    def same_clients(self):
        if self.caches is not None:
            assert self.caches[0].clients() == self.caches[1].clients()
            assert len(self.caches[0]) == len(self.caches[1])


STATEFUL = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestQuorumTwins = QuorumTwins.TestCase
TestQuorumTwins.settings = STATEFUL
TestReplyCacheTwins = ReplyCacheTwins.TestCase
TestReplyCacheTwins.settings = STATEFUL


@SETTINGS
@given(st.integers(0, 255), u16, u64, u64, st.binary(max_size=64), st.binary(max_size=40),
       st.integers(-2, 80), st.booleans())
def test_peek_header_agrees(mtype, sender, view, instance, payload, prefix, offset, corrupt):
    # A frame after some bytes, looked at from various offsets (inside it, past it, before it),
    # sometimes with its magic broken: both twins see the same header, or the same None.
    data = bytearray(prefix + P.encode_frame(mtype, sender, view, instance, payload))
    if corrupt and len(prefix) < len(data):
        data[len(prefix)] ^= 0xFF
    assert outcome(C.peek_header, bytes(data), offset) == outcome(P.peek_header, bytes(data), offset)
    if not corrupt:
        assert P.peek_header(bytes(data), len(prefix)) == (mtype, sender, 0, view, instance, len(payload))
