# _core_framing.pxi: wire frames (encode, decode with bounds checks, peek at a header); included by smrd/_core.pyx (one extension, several source files).

# ------------------------------------------------------------------------------------ framing

def encode_frame(unsigned char mtype, uint16_t sender, uint64_t view, uint64_t instance,
                 payload=b"", uint16_t flags=0):
    """One wire frame: the 32-byte header (checksum included) followed by payload."""
    cdef _Buf b
    cdef unsigned char *p
    cdef uint32_t crc
    cdef bytes out
    _buf_get(payload, &b)
    try:
        if <uint64_t>b.n > _U32_MAX:
            raise OverflowError(
                f"payload length={b.n} does not fit in an unsigned 32-bit field")
        out = PyBytes_FromStringAndSize(NULL, _HEADER + b.n)
        p = <unsigned char *>PyBytes_AS_STRING(out)
        p[0] = b'S'
        p[1] = b'M'
        p[2] = _VERSION
        p[3] = mtype
        _wr16(p + 4, sender)
        _wr16(p + 6, flags)
        _wr64(p + 8, view)
        _wr64(p + 16, instance)
        _wr32(p + 24, <uint32_t>b.n)
        if b.n:
            memcpy(p + _HEADER, b.p, b.n)
        crc = _crc_update(0xFFFFFFFFU, p, _HEAD_CRC)
        crc = _crc_update(crc, p + _HEADER, b.n)
        _wr32(p + _HEAD_CRC, ~crc)
        return out
    finally:
        _buf_release(&b)


cdef int _check_frame(const unsigned char *p, Py_ssize_t size, uint64_t max_payload) except -1:
    """Validates the frame in p[0:size]; raises ProtocolError naming what is wrong."""
    cdef uint32_t length, checksum, actual
    cdef Py_ssize_t have
    if size < _HEADER:
        raise ProtocolError(f"short frame: {size} bytes, the header alone needs {_HEADER}")
    if p[0] != b'S' or p[1] != b'M':
        raise ProtocolError(f"bad magic {bytes(p[:2])!r}, expected {b'SM'!r}")
    if p[2] != _VERSION:
        raise ProtocolError(f"bad version {p[2]}, expected {_VERSION}")
    length = _rd32(p + 24)
    if length > max_payload:
        raise ProtocolError(f"payload length {length} exceeds max_payload {max_payload}")
    have = size - _HEADER
    if have < length:
        raise ProtocolError(f"truncated frame: header says {length} payload bytes, got {have}")
    if have > length:
        raise ProtocolError(
            f"trailing bytes: header says {length} payload bytes, got {have} ({have - length} extra)")
    checksum = _rd32(p + _HEAD_CRC)
    actual = ~_crc_update(_crc_update(0xFFFFFFFFU, p, _HEAD_CRC), p + _HEADER, length)
    if actual != checksum:
        raise ProtocolError(f"bad checksum: header says 0x{checksum:08x}, computed 0x{actual:08x}")
    return 0


cdef uint64_t _max_payload(object max_payload) except? 0:
    # Any int is accepted as in the twin; beyond the u32 length field a limit cannot bind.
    cdef int overflow = 0
    cdef long long v
    if PyLong_CheckExact(max_payload):
        v = PyLong_AsLongLongAndOverflow(max_payload, &overflow)
        if overflow > 0 or (overflow == 0 and v > <long long>_U32_MAX):
            return _U32_MAX
        if overflow == 0 and v >= 0:
            return <uint64_t>v
    if max_payload < 0:
        raise ValueError(f"max_payload must be >= 0, not {max_payload}")
    if max_payload > _U32_MAX:
        return _U32_MAX
    return <uint64_t>max_payload


def decode_frame(data, max_payload=DEFAULT_MAX_PAYLOAD):
    """-> (mtype, sender, flags, view, instance, payload); payload is a zero-copy memoryview."""
    cdef uint64_t limit = _max_payload(max_payload)
    cdef const unsigned char *p
    cdef Py_ssize_t size
    cdef object base
    cdef Py_buffer pybuf
    if PyBytes_CheckExact(data):
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        size = PyBytes_GET_SIZE(data)
        _check_frame(p, size, limit)
        base = data
    else:
        base = _byte_view(data)
        PyObject_GetBuffer(base, &pybuf, PyBUF_SIMPLE)
        try:
            p = <const unsigned char *>pybuf.buf
            size = pybuf.len
            _check_frame(p, size, limit)
        finally:
            PyBuffer_Release(&pybuf)
    return (p[3], _rd16(p + 4), _rd16(p + 6), _rd64(p + 8), _rd64(p + 16),
            smrd_view_slice(base, _HEADER, size - _HEADER))


def peek_header(data, Py_ssize_t offset=0):
    """-> (mtype, sender, flags, view, instance, payload length) of the frame header at
    data[offset:], or None if fewer than HEADER_SIZE bytes are there or the magic or version is
    not smrd's. Checks nothing else (not the checksum, not that the payload follows): for
    indexing a file of frames by their headers alone."""
    cdef Py_buffer pybuf
    cdef const unsigned char *p
    PyObject_GetBuffer(_byte_view(data), &pybuf, PyBUF_SIMPLE)
    try:
        if offset < 0 or pybuf.len - offset < _HEADER:
            return None
        p = <const unsigned char *>pybuf.buf + offset
        if p[0] != b'S' or p[1] != b'M' or p[2] != _VERSION:
            return None
        return (p[3], _rd16(p + 4), _rd16(p + 6), _rd64(p + 8), _rd64(p + 16), _rd32(p + 24))
    finally:
        PyBuffer_Release(&pybuf)
