# Wire framing and CRC-32 of smrd._core, on both twins: round trips, the exact header layout, every
# malformation named in smrd/_core.pyi, and fuzzing that must only ever yield ProtocolError.
import array
import re
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smrd.errors import ProtocolError

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)
payloads = st.binary(max_size=2048)
as_buffer = st.sampled_from([bytes, bytearray, memoryview])


def frame_fields():
    return st.tuples(u8, u16, u64, u64, payloads, u16)


# ------------------------------------------------------------------------------------ round trip

@SETTINGS
@given(fields=frame_fields(), wrap=as_buffer)
def test_encode_decode_round_trip(impl, fields, wrap):
    mtype, sender, view, instance, payload, flags = fields
    frame = impl.encode_frame(mtype, sender, view, instance, wrap(payload), flags=flags)
    assert type(frame) is bytes
    assert len(frame) == impl.HEADER_SIZE + len(payload)
    got = impl.decode_frame(wrap(frame))
    assert got[:5] == (mtype, sender, flags, view, instance)
    assert isinstance(got[5], memoryview)
    assert bytes(got[5]) == payload


def test_header_layout_is_the_documented_one(impl):
    frame = impl.encode_frame(7, 0x0102, 2**64 - 2, 0x1122334455667788, b"abc", flags=0x0A0B)
    magic, version, mtype, sender, flags, view, instance, length, checksum = struct.unpack_from(
        "<2sBBHHQQII", frame)
    assert (magic, version, mtype, sender, flags) == (b"SM", 1, 7, 0x0102, 0x0A0B)
    assert (view, instance, length) == (2**64 - 2, 0x1122334455667788, 3)
    assert checksum == zlib.crc32(b"abc", zlib.crc32(frame[:28]))
    assert frame[32:] == b"abc"


def test_constants(impl):
    assert (impl.VERSION, impl.HEADER_SIZE, impl.BATCH_HEADER_SIZE, impl.ENTRY_HEADER_SIZE) == (
        1, 32, 16, 20)
    assert impl.DEFAULT_MAX_PAYLOAD == 64 * 1024 * 1024
    assert (impl.NEW, impl.DUPLICATE, impl.TOO_OLD) == (0, 1, 2)
    assert impl.IMPLEMENTATION in ("cython", "python")


def test_defaults_and_empty_payload(impl):
    frame = impl.encode_frame(1, 2, 3, 4)
    assert len(frame) == 32
    assert impl.decode_frame(frame)[:5] == (1, 2, 0, 3, 4)
    assert bytes(impl.decode_frame(frame)[5]) == b""


def test_payload_is_a_zero_copy_view(impl):
    frame = impl.encode_frame(1, 2, 3, 4, b"payload")
    payload = impl.decode_frame(frame)[5]
    assert payload.obj is frame
    assert payload.readonly and payload.format == "B" and payload.ndim == 1
    assert payload.nbytes == 7 and payload.tobytes() == b"payload"

    writable = bytearray(frame)
    view = impl.decode_frame(writable)[5]
    writable[32] = ord("P")  # same memory: the view sees it
    assert bytes(view) == b"Payload"


def test_other_buffer_formats_count_bytes(impl):
    words = array.array("I", [1, 2, 3])
    frame = impl.encode_frame(1, 2, 3, 4, words)
    assert bytes(impl.decode_frame(frame)[5]) == words.tobytes()
    frame_words = array.array("I")
    frame_words.frombytes(frame)
    got = impl.decode_frame(memoryview(frame_words))
    assert got[:5] == (1, 2, 0, 3, 4) and bytes(got[5]) == words.tobytes()


def test_max_payload(impl):
    frame = impl.encode_frame(1, 2, 3, 4, b"x" * 100)
    assert bytes(impl.decode_frame(frame, max_payload=100)[5]) == b"x" * 100
    assert bytes(impl.decode_frame(frame, 2**80)[5]) == b"x" * 100
    with pytest.raises(ProtocolError, match=r"payload length 100 exceeds max_payload 99"):
        impl.decode_frame(frame, max_payload=99)
    assert impl.decode_frame(impl.encode_frame(1, 2, 3, 4), max_payload=0)[0] == 1
    with pytest.raises(ValueError, match="max_payload"):
        impl.decode_frame(frame, max_payload=-1)


# ---------------------------------------------------------------------------------- malformation

GOOD = bytes(range(40))


def _frame(impl):
    return impl.encode_frame(9, 1, 2, 3, GOOD)


@pytest.mark.parametrize("size", [0, 1, 2, 4, 16, 31])
def test_short(impl, size):
    with pytest.raises(ProtocolError, match=rf"^short frame: {size} bytes, the header alone needs 32$"):
        impl.decode_frame(_frame(impl)[:size])


def test_truncated_payload(impl):
    with pytest.raises(ProtocolError, match=r"^truncated frame: header says 40 payload bytes, got 39$"):
        impl.decode_frame(_frame(impl)[:-1])


def test_trailing_bytes(impl):
    with pytest.raises(ProtocolError, match=r"^trailing bytes: .*40 payload bytes, got 42 \(2 extra\)$"):
        impl.decode_frame(_frame(impl) + b"\0\0")


def test_bad_magic(impl):
    frame = b"XM" + _frame(impl)[2:]
    with pytest.raises(ProtocolError, match=r"^bad magic b'XM', expected b'SM'$"):
        impl.decode_frame(frame)


def test_bad_version(impl):
    frame = bytearray(_frame(impl))
    frame[2] = 2
    with pytest.raises(ProtocolError, match=r"^bad version 2, expected 1$"):
        impl.decode_frame(bytes(frame))


@pytest.mark.parametrize("at", [3, 4, 8, 16, 28, 31, 32, 71])
def test_bad_checksum(impl, at):
    # Any bit of the covered header bytes, the checksum itself or the payload.
    frame = bytearray(_frame(impl))
    frame[at] ^= 0x10
    with pytest.raises(ProtocolError, match=r"^bad checksum: header says 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}$"):
        impl.decode_frame(bytes(frame))


def test_huge_length_is_refused_before_anything_else(impl):
    frame = bytearray(_frame(impl))
    frame[24:28] = (0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="exceeds max_payload"):
        impl.decode_frame(bytes(frame))
    with pytest.raises(ProtocolError, match=r"truncated frame: header says 4294967295"):
        impl.decode_frame(bytes(frame), max_payload=2**32)


def test_encode_rejects_out_of_range_fields(impl):
    ok = dict(mtype=1, sender=2, view=3, instance=4)
    for name, bad in [("mtype", 256), ("mtype", -1), ("sender", 65536), ("view", 2**64),
                      ("instance", -1)]:
        with pytest.raises(OverflowError):
            impl.encode_frame(**{**ok, name: bad})
    with pytest.raises(OverflowError):
        impl.encode_frame(1, 2, 3, 4, b"", flags=1 << 16)
    with pytest.raises(TypeError):
        impl.encode_frame(1, 2, 3, 4, "text is not bytes")
    with pytest.raises(TypeError):
        impl.encode_frame(None, 2, 3, 4)


# -------------------------------------------------------------------------------------- fuzzing

@SETTINGS
@given(blob=st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_error(impl, blob):
    try:
        impl.decode_frame(blob)
    except ProtocolError:
        pass


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_random_bytes_behind_a_valid_magic_only_raise_protocol_error(impl, blob):
    try:
        impl.decode_frame(b"SM\x01" + blob)
    except ProtocolError:
        pass


@SETTINGS
@given(fields=frame_fields(), data=st.data())
def test_mutated_frames_only_raise_protocol_error(impl, mutate, fields, data):
    frame = impl.encode_frame(*fields[:5], flags=fields[5])
    bad = mutate(data, frame)
    try:
        got = impl.decode_frame(bad)
    except ProtocolError as exc:
        assert str(exc)
    else:
        # Survivors must be genuine frames: re-encoding reproduces the bytes exactly.
        assert impl.encode_frame(got[0], got[1], got[3], got[4], got[5], flags=got[2]) == bad


# ---------------------------------------------------------------------------------------- crc32

@SETTINGS
@given(blob=st.binary(max_size=3000), value=st.integers(0, 2**32 - 1))
def test_crc32_equals_zlib(impl, blob, value):
    assert impl.crc32(blob) == zlib.crc32(blob)
    assert impl.crc32(blob, value) == zlib.crc32(blob, value)
    assert impl.crc32(bytearray(blob), value=value) == zlib.crc32(blob, value)


@SETTINGS
@given(blob=st.binary(max_size=1000), cut=st.integers(0, 1000))
def test_crc32_running_value(impl, blob, cut):
    cut = min(cut, len(blob))
    assert impl.crc32(blob[cut:], impl.crc32(blob[:cut])) == zlib.crc32(blob)
    assert impl.crc32(memoryview(blob)[cut:], impl.crc32(memoryview(blob)[:cut])) == zlib.crc32(blob)


def test_crc32_known_vectors_and_masking(impl):
    assert impl.crc32(b"") == 0
    assert impl.crc32(b"123456789") == 0xCBF43926
    # zlib masks the running value to 32 bits; so must we.
    assert impl.crc32(b"a", -1) == zlib.crc32(b"a", -1)
    assert impl.crc32(b"a", 2**40 + 5) == zlib.crc32(b"a", 5)
    with pytest.raises(TypeError):
        impl.crc32("text")


def test_messages_name_the_problem(impl):
    """One sweep that every ProtocolError message starts with what is wrong."""
    frame = _frame(impl)
    cases = {
        b"": "short frame",
        frame[:-3]: "truncated frame",
        frame + b"!": "trailing bytes",
        b"ZZ" + frame[2:]: "bad magic",
        frame[:2] + b"\x07" + frame[3:]: "bad version",
        frame[:-1] + bytes([frame[-1] ^ 1]): "bad checksum",
    }
    for blob, prefix in cases.items():
        with pytest.raises(ProtocolError) as info:
            impl.decode_frame(blob)
        assert re.match(prefix, str(info.value)), (prefix, str(info.value))
