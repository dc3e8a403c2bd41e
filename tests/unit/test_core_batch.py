# Batch packing/unpacking and BatchBuilder of smrd._core, on both twins: round trips, zero-copy
# views, every malformation (short, absurd count, truncated entry, trailing bytes), fuzzing that
# only ever yields ProtocolError, and the builder's count/byte limits.
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smrd.errors import ProtocolError

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

u64 = st.integers(0, 2**64 - 1)
entries_st = st.lists(st.tuples(u64, u64, st.binary(max_size=300)), max_size=30)


def as_tuples(batch):
    return [(cid, seq, bytes(payload)) for cid, seq, payload in batch]


# ------------------------------------------------------------------------------------ round trip

@SETTINGS
@given(entries=entries_st, timestamp=u64, flags=st.integers(0, 2**32 - 1),
       wrap=st.sampled_from([bytes, bytearray, memoryview]))
def test_pack_unpack_round_trip(impl, entries, timestamp, flags, wrap):
    packed = impl.pack_batch([(c, s, wrap(p)) for c, s, p in entries], timestamp, flags)
    assert type(packed) is bytes
    assert len(packed) == 16 + sum(20 + len(p) for _, _, p in entries)
    batch = impl.Batch(wrap(packed))
    assert (len(batch), batch.timestamp, batch.flags, batch.nbytes) == (
        len(entries), timestamp, flags, len(packed))
    assert as_tuples(batch) == entries
    for i, (cid, seq, payload) in enumerate(entries):
        assert batch.client_id(i) == cid and batch.seq(i) == seq
        assert bytes(batch.payload(i)) == payload
        got = batch[i]
        assert type(got) is tuple and got[:2] == (cid, seq) and bytes(got[2]) == payload


def test_layout_is_the_documented_one(impl):
    packed = impl.pack_batch([(1, 2, b"ab"), (3, 4, b"")], timestamp=5, flags=6)
    assert packed == (struct.pack("<IIQ", 2, 6, 5) + struct.pack("<QQI", 1, 2, 2) + b"ab"
                      + struct.pack("<QQI", 3, 4, 0))


def test_empty_batch(impl):
    packed = impl.pack_batch([])
    assert packed == bytes(16)
    batch = impl.Batch(packed)
    assert len(batch) == 0 and list(batch) == [] and batch.nbytes == 16


def test_indexing(impl):
    batch = impl.Batch(impl.pack_batch([(1, 10, b"a"), (2, 20, b"b"), (3, 30, b"c")]))
    assert batch[-1][:2] == (3, 30) and batch[-3][:2] == (1, 10)
    assert batch.client_id(-1) == 3 and batch.seq(-2) == 20 and bytes(batch.payload(-3)) == b"a"
    for bad in (3, -4, 2**70, -(2**70)):
        with pytest.raises(IndexError, match="batch index out of range"):
            batch[bad]
        with pytest.raises(IndexError):
            batch.client_id(bad)
        with pytest.raises(IndexError):
            batch.payload(bad)
    with pytest.raises(TypeError):
        batch["0"]
    # Iterators are independent and restartable.
    it1, it2 = iter(batch), iter(batch)
    assert next(it1)[0] == 1 and next(it1)[0] == 2 and next(it2)[0] == 1
    assert [e[0] for e in batch] == [1, 2, 3] == [e[0] for e in batch]


def test_payloads_are_zero_copy_views(impl):
    packed = impl.pack_batch([(1, 1, b"hello"), (2, 2, b"world")])
    batch = impl.Batch(packed)
    view = batch.payload(1)
    assert isinstance(view, memoryview) and view.obj is packed and view.readonly
    assert view.format == "B" and view.nbytes == 5 and view.tobytes() == b"world"
    assert view[1:3].tobytes() == b"or" and view == b"world" and hash(view) == hash(b"world")
    del packed, batch
    assert view.tobytes() == b"world"  # the view keeps its source alive


def test_pack_accepts_any_iterable_and_buffer(impl):
    gen = ((i, i + 1, bytearray(b"x" * i)) for i in range(3))
    expected = impl.pack_batch([(0, 1, b""), (1, 2, b"x"), (2, 3, b"xx")])
    assert impl.pack_batch(gen) == expected
    assert impl.pack_batch(((0, 1, b""), [1, 2, memoryview(b"x")], (2, 3, b"xx"))) == expected


def test_pack_rejects_bad_entries(impl):
    with pytest.raises(OverflowError):
        impl.pack_batch([(2**64, 1, b"")])
    with pytest.raises(OverflowError):
        impl.pack_batch([(1, -1, b"")])
    with pytest.raises(OverflowError):
        impl.pack_batch([(1, 1, b"")], timestamp=-1)
    with pytest.raises(OverflowError):
        impl.pack_batch([(1, 1, b"")], flags=2**32)
    with pytest.raises(ValueError):
        impl.pack_batch([(1, 1)])
    with pytest.raises(TypeError):
        impl.pack_batch([(1, 1, "text")])
    with pytest.raises(TypeError):
        impl.pack_batch([5])


# ---------------------------------------------------------------------------------- malformation

def test_short(impl):
    for size in (0, 1, 15):
        with pytest.raises(ProtocolError, match=rf"^short batch: {size} bytes, the header alone needs 16$"):
            impl.Batch(bytes(size))


def test_absurd_count_is_refused_before_allocating(impl):
    for count in (1, 2**31, 2**32 - 1):
        with pytest.raises(ProtocolError, match=rf"^absurd batch count {count} for a 16-byte batch$"):
            impl.Batch(struct.pack("<IIQ", count, 0, 0))
    # 3 entries need at least 60 bytes after the header; 59 is a lie.
    with pytest.raises(ProtocolError, match=r"^absurd batch count 3 for a 75-byte batch$"):
        impl.Batch(struct.pack("<IIQ", 3, 0, 0) + bytes(59))


def test_truncated_entry_header(impl):
    blob = struct.pack("<IIQ", 2, 0, 0) + struct.pack("<QQI", 1, 1, 30) + bytes(30) + bytes(10)
    with pytest.raises(ProtocolError, match=r"^truncated entry 1: header needs 20 bytes, 10 remain$"):
        impl.Batch(blob)


def test_truncated_entry_payload(impl):
    packed = impl.pack_batch([(1, 1, b"abc"), (2, 2, b"defgh")])
    with pytest.raises(ProtocolError, match=r"^truncated entry 1: says 5 payload bytes, 4 remain$"):
        impl.Batch(packed[:-1])
    huge = bytearray(impl.pack_batch([(1, 1, b"abc")]))
    huge[16 + 16:16 + 20] = (0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match=r"^truncated entry 0: says 4294967295 payload bytes, 3 remain$"):
        impl.Batch(bytes(huge))


def test_trailing_bytes(impl):
    packed = impl.pack_batch([(1, 1, b"abc")])
    with pytest.raises(ProtocolError, match=r"^trailing bytes: 2 after 1 entries$"):
        impl.Batch(packed + b"zz")


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(impl, blob):
    try:
        batch = impl.Batch(blob)
    except ProtocolError:
        return
    assert len(as_tuples(batch)) == len(batch)


@SETTINGS
@given(entries=entries_st, data=st.data())
def test_mutated_batches_only_raise_protocol_error(impl, mutate, entries, data):
    bad = mutate(data, impl.pack_batch(entries, timestamp=7))
    try:
        batch = impl.Batch(bad)
    except ProtocolError as exc:
        assert str(exc)
        return
    # Survivors are self-consistent: repacking them gives the same bytes.
    assert impl.pack_batch(as_tuples(batch), batch.timestamp, batch.flags) == bad


# ---------------------------------------------------------------------------------- BatchBuilder

def test_builder_count_limit(impl):
    builder = impl.BatchBuilder(max_count=3, max_bytes=10**6)
    assert [builder.add(i, i, b"x") for i in range(5)] == [True, True, True, False, False]
    assert builder.count == 3
    batch = impl.Batch(builder.build(timestamp=9, flags=1))
    assert [e[0] for e in batch] == [0, 1, 2] and batch.timestamp == 9 and batch.flags == 1


def test_builder_byte_limit_counts_packed_size(impl):
    # 16 header + 2 * (20 + 10) = 76 bytes exactly fits; one byte less does not.
    builder = impl.BatchBuilder(max_count=100, max_bytes=76)
    assert builder.nbytes == 16
    assert builder.add(1, 1, b"a" * 10) and builder.nbytes == 46
    assert builder.add(2, 2, b"b" * 10) and builder.nbytes == 76
    assert not builder.add(3, 3, b"")
    assert builder.count == 2 and builder.nbytes == 76
    small = impl.BatchBuilder(max_count=100, max_bytes=75)
    assert small.add(1, 1, b"a" * 10) and not small.add(2, 2, b"b" * 10)


def test_builder_first_oversize_entry_travels_alone(impl):
    builder = impl.BatchBuilder(max_count=10, max_bytes=64)
    assert builder.add(1, 1, b"x" * 1000)  # empty builder: always accepted
    assert not builder.add(2, 2, b"")
    assert builder.count == 1 and builder.nbytes == 16 + 20 + 1000
    assert as_tuples(impl.Batch(builder.build())) == [(1, 1, b"x" * 1000)]
    assert builder.add(2, 2, b"")  # and after build() it is empty again


def test_builder_build_empties_it_and_matches_pack_batch(impl):
    builder = impl.BatchBuilder(8, 4096)
    entries = [(i, 100 + i, bytes([i]) * i) for i in range(6)]
    for entry in entries:
        assert builder.add(*entry)
    assert builder.nbytes == len(impl.pack_batch(entries))
    assert builder.build(timestamp=3, flags=2) == impl.pack_batch(entries, 3, 2)
    assert (builder.count, builder.nbytes) == (0, 16)
    assert builder.build() == impl.pack_batch([])
    assert builder.add(1, 1, b"again") and builder.count == 1


def test_builder_copies_payloads(impl):
    buf = bytearray(b"abc")
    builder = impl.BatchBuilder(4, 1000)
    builder.add(1, 1, buf)
    buf[0] = ord("z")
    builder.add(2, 2, memoryview(buf))
    assert as_tuples(impl.Batch(builder.build())) == [(1, 1, b"abc"), (2, 2, b"zbc")]


def test_builder_rejects_bad_arguments(impl):
    for max_count, max_bytes in [(0, 100), (-1, 100), (2**32, 100), (1, 0)]:
        with pytest.raises(ValueError):
            impl.BatchBuilder(max_count, max_bytes)
    builder = impl.BatchBuilder(4, 1000)
    with pytest.raises(OverflowError):
        builder.add(-1, 1, b"")
    with pytest.raises(OverflowError):
        builder.add(1, 2**64, b"")
    with pytest.raises(TypeError):
        builder.add(1, 1, "text")
    assert builder.count == 0 and builder.nbytes == 16
    with pytest.raises(OverflowError):
        builder.build(timestamp=-1)


@SETTINGS
@given(max_count=st.integers(1, 10), max_bytes=st.integers(1, 400),
       sizes=st.lists(st.integers(0, 120), max_size=30))
def test_builder_never_exceeds_limits_except_alone(impl, max_count, max_bytes, sizes):
    builder = impl.BatchBuilder(max_count, max_bytes)
    accepted = []
    for i, size in enumerate(sizes):
        before = builder.nbytes
        ok = builder.add(i, i, b"p" * size)
        fits = builder.count <= max_count and before + 20 + size <= max_bytes
        if accepted and not ok:
            assert len(accepted) == max_count or before + 20 + size > max_bytes
        if ok:
            accepted.append((i, i, b"p" * size))
            assert len(accepted) == 1 or fits
        assert builder.nbytes == 16 + sum(20 + len(p) for _, _, p in accepted)
    assert as_tuples(impl.Batch(builder.build())) == accepted


def test_pack_survives_entries_that_change_while_packing(impl):
    """A client_id whose __index__ empties the entry list must not crash the packer (the
    compiled twin walks the list twice with raw pointers): any clean outcome is fine."""
    entries = []

    class Sneaky:
        def __index__(self):
            entries.clear()
            return 1

        __int__ = __index__  # the compiled twin's conversion calls __int__

    entries.extend([(2, 2, b"b" * 100), (Sneaky(), 1, b"a" * 100), (3, 3, b"c" * 100)])
    try:
        packed = impl.pack_batch(entries)
    except (RuntimeError, ValueError, TypeError, OverflowError):
        return
    impl.Batch(packed)  # whatever came out is a well-formed batch


def test_pack_keeps_payloads_alive_while_copying(impl):
    """A client_id that empties the list on its second conversion (the compiled twin's copy
    pass) must not leave the packer reading a freed payload."""
    entries = []
    calls = []

    class LateSneaky:
        def __index__(self):
            calls.append(1)
            if len(calls) >= 2:
                entries.clear()
            return 5

        __int__ = __index__

    payload = bytes(range(200))
    entries.append((LateSneaky(), 6, payload[:150] + b"!"))  # only the tuple holds this bytes
    try:
        packed = impl.pack_batch(entries)
    except (RuntimeError, ValueError, TypeError, OverflowError):
        return
    assert [(c, s, bytes(p)) for c, s, p in impl.Batch(packed)] == [(5, 6, payload[:150] + b"!")]
