# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, binding=False, auto_pickle=False, embedsignature=True
#
# smrd._core: the compiled hot path. Owns wire framing (encode/decode with bounds checks), batch
# packing/unpacking, per-instance quorum counting and the reply cache; smrd/_core.pyi is the
# contract and smrd/_core_py.py the pure-Python reference twin it must agree with, byte for byte
# and error for error (tests/unit/test_core_twins.py).
# Never: I/O, clocks, logging, asyncio/zmq imports, or a decode path that raises anything but
# ProtocolError on bad bytes or allocates before a length has been checked against the buffer.
#
# Rules the loops below follow:
# - Integers on the wire are little-endian and are assembled byte by byte: compilers turn that into
#   one load/store on little-endian targets and it stays correct on big-endian ones.
# - Work happens on raw pointers; Python objects are touched only at the boundary (arguments in,
#   one result object out).
# - Argument checks happen in the same order as in the twin so both raise the same exception.

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongMask, PyLong_CheckExact
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.dict cimport PyDict_Next

import operator

from smrd.errors import ProtocolError

__all__ = [
    "VERSION", "HEADER_SIZE", "BATCH_HEADER_SIZE", "ENTRY_HEADER_SIZE", "DEFAULT_MAX_PAYLOAD",
    "IMPLEMENTATION", "NEW", "DUPLICATE", "TOO_OLD",
    "crc32", "encode_frame", "decode_frame", "peek_header", "pack_batch",
    "Batch", "BatchBuilder", "QuorumTracker", "ReplyCache",
]

cdef enum:
    _VERSION = 1
    _HEADER = 32
    _HEAD_CRC = 28           # the checksum covers header bytes [0:28], then the payload
    _BATCH_HEADER = 16
    _ENTRY_HEADER = 20

cdef enum:
    _NEW = 0
    _DUPLICATE = 1
    _TOO_OLD = 2

cdef uint64_t _U32_MAX = 0xFFFFFFFFULL

IMPLEMENTATION = "cython"
VERSION = _VERSION
HEADER_SIZE = _HEADER
BATCH_HEADER_SIZE = _BATCH_HEADER
ENTRY_HEADER_SIZE = _ENTRY_HEADER
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
NEW = _NEW
DUPLICATE = _DUPLICATE
TOO_OLD = _TOO_OLD


cdef extern from "Python.h":
    # Declared here because cpython.number types `exc` as object: NULL asks for clipping.
    Py_ssize_t PyNumber_AsSsize_t(object o, PyObject *exc) except? -1


cdef extern from "Python.h":
    # Borrowed-reference accessors for the packing loops: no reference counting per entry.
    # Only used where nothing can run Python code between fetching and using the pointer.
    PyObject *_list_item "PyList_GET_ITEM" (object lst, Py_ssize_t i)
    Py_ssize_t _list_size "PyList_GET_SIZE" (object lst)
    PyObject *_tuple_item "PyTuple_GET_ITEM" (PyObject *tup, Py_ssize_t i)
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE" (PyObject *tup)
    bint _is_tuple "PyTuple_CheckExact" (PyObject *obj)
    bint _is_bytes "PyBytes_CheckExact" (PyObject *obj)
    bint _is_int "PyLong_CheckExact" (PyObject *obj)
    char *_bytes_data "PyBytes_AS_STRING" (PyObject *obj)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE" (PyObject *obj)


cdef extern from *:
    """
    /* A 1-byte-per-item, 1-D, C-contiguous memoryview of base[off:off+n].
     *
     * Slicing through the Python protocol costs a slice object, two ints and a subscript
     * dispatch per call; Batch iteration does this once per entry. Instead take a fresh view on
     * the same managed buffer (PyMemoryView_FromObject on a memoryview allocates only the view)
     * and narrow it in place before anyone else can see it: exactly what memoryview slicing
     * does internally (init_slice), so the result is an ordinary memoryview that keeps the
     * source alive. The caller guarantees base is bytes or a flat 'B' view and the range is in
     * bounds. Where the struct is not public, fall back to plain slicing. */
    static PyObject *smrd_view_slice(PyObject *base, Py_ssize_t off, Py_ssize_t n) {
    #if defined(PYPY_VERSION) || defined(Py_LIMITED_API) || defined(GRAALVM_PYTHON)
        return PySequence_GetSlice(base, off, off + n);
    #else
        PyObject *mv = PyMemoryView_FromObject(base);
        Py_buffer *view;
        if (mv == NULL) return NULL;
        view = &((PyMemoryViewObject *)mv)->view;
        view->buf = (char *)view->buf + off;
        view->len = n;
        view->shape[0] = n;
        return mv;
    #endif
    }
    """
    object smrd_view_slice(object base, Py_ssize_t off, Py_ssize_t n)


# ------------------------------------------------------------------------- little-endian access

cdef inline uint16_t _rd16(const unsigned char *p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))

cdef inline uint32_t _rd32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))

cdef inline uint64_t _rd64(const unsigned char *p) noexcept nogil:
    return <uint64_t>_rd32(p) | (<uint64_t>_rd32(p + 4) << 32)

cdef inline void _wr16(unsigned char *p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)

cdef inline void _wr32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)
    p[2] = <unsigned char>(v >> 16)
    p[3] = <unsigned char>(v >> 24)

cdef inline void _wr64(unsigned char *p, uint64_t v) noexcept nogil:
    _wr32(p, <uint32_t>v)
    _wr32(p + 4, <uint32_t>(v >> 32))


# ------------------------------------------------------------------------------------- CRC-32
# Reflected polynomial 0xEDB88320 with zlib's pre/post inversion, so crc32() equals zlib.crc32
# (the twin uses zlib; libz itself is not linked because slim images lack its headers).
# Slicing-by-8: eight 256-entry tables let each step consume 8 bytes with independent lookups.

cdef uint32_t _crc_table[8][256]

cdef void _crc_init() noexcept nogil:
    cdef uint32_t c
    cdef int i, k
    for i in range(256):
        c = <uint32_t>i
        for k in range(8):
            c = (c >> 1) ^ (0xEDB88320U if (c & 1) else 0U)
        _crc_table[0][i] = c
    for i in range(256):
        c = _crc_table[0][i]
        for k in range(1, 8):
            c = _crc_table[0][c & 0xFF] ^ (c >> 8)
            _crc_table[k][i] = c

_crc_init()

cdef inline uint32_t _crc_update(uint32_t crc, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """crc is the running register (already inverted), as zlib keeps it between calls."""
    cdef uint32_t lo, hi
    while n >= 8:
        lo = crc ^ _rd32(p)
        hi = _rd32(p + 4)
        crc = (_crc_table[7][lo & 0xFF] ^ _crc_table[6][(lo >> 8) & 0xFF]
               ^ _crc_table[5][(lo >> 16) & 0xFF] ^ _crc_table[4][lo >> 24]
               ^ _crc_table[3][hi & 0xFF] ^ _crc_table[2][(hi >> 8) & 0xFF]
               ^ _crc_table[1][(hi >> 16) & 0xFF] ^ _crc_table[0][hi >> 24])
        p += 8
        n -= 8
    while n > 0:
        crc = _crc_table[0][(crc ^ p[0]) & 0xFF] ^ (crc >> 8)
        p += 1
        n -= 1
    return crc


# --------------------------------------------------------------------------- buffer arguments

cdef struct _Buf:
    const unsigned char *p
    Py_ssize_t n
    bint held
    Py_buffer view

cdef inline int _buf_get(object obj, _Buf *b) except -1:
    # bytes is by far the common case and needs no buffer export (nor a release).
    if PyBytes_CheckExact(obj):
        b.p = <const unsigned char *>PyBytes_AS_STRING(obj)
        b.n = PyBytes_GET_SIZE(obj)
        b.held = False
        return 0
    # PyBUF_SIMPLE: any C-contiguous buffer, counted in bytes (zlib.crc32 and bytes.join agree).
    PyObject_GetBuffer(obj, &b.view, PyBUF_SIMPLE)
    b.held = True
    b.p = <const unsigned char *>b.view.buf
    b.n = b.view.len
    return 0

cdef inline void _buf_release(_Buf *b) noexcept:
    if b.held:
        b.held = False
        PyBuffer_Release(&b.view)

cdef object _byte_view(object data):
    """A flat view of data counted in bytes, normalised like the twin's _byte_view: every payload
    slice is then taken from a 1-D 'B' view, which smrd_view_slice relies on."""
    cdef object mv = PyMemoryView_FromObject(data)
    if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
        mv = mv.cast("B")
    return mv

cdef Py_ssize_t _as_index(object value) except? -1:
    # Out-of-range ints clip instead of raising, so callers report them as the twin does.
    return PyNumber_AsSsize_t(value, NULL)


def crc32(data, value=0):
    """CRC-32 of data continuing from value, equal to zlib.crc32(data, value)."""
    cdef _Buf b
    cdef uint32_t crc
    _buf_get(data, &b)
    try:
        crc = <uint32_t>PyLong_AsUnsignedLongMask(value)
        return ~_crc_update(~crc, b.p, b.n)
    finally:
        _buf_release(&b)


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


# ----------------------------------------------------------------------------------- batching

cdef inline int _open_entry(object item, _Buf *b, uint64_t *client_id, uint64_t *seq) except -1:
    """Unpacks one (client_id, seq, payload) entry and opens its payload buffer (the caller
    releases b). Checks run in the twin's order: shape, payload type, client_id, seq, size."""
    cdef object payload
    # The common shape, a 3-tuple with a bytes payload, needs no buffer export and so no
    # try/except to release one on error.
    if type(item) is tuple and PyTuple_GET_SIZE(item) == 3:
        payload = <object>PyTuple_GET_ITEM(item, 2)
        if PyBytes_CheckExact(payload):
            b.p = <const unsigned char *>PyBytes_AS_STRING(payload)
            b.n = PyBytes_GET_SIZE(payload)
            b.held = False
            client_id[0] = <object>PyTuple_GET_ITEM(item, 0)
            seq[0] = <object>PyTuple_GET_ITEM(item, 1)
            if <uint64_t>b.n > _U32_MAX:
                raise OverflowError(
                    f"payload length={b.n} does not fit in an unsigned 32-bit field")
            return 0
    return _open_entry_slow(item, b, client_id, seq)


cdef int _open_entry_slow(object item, _Buf *b, uint64_t *client_id, uint64_t *seq) except -1:
    cdef object cid_o, seq_o, payload
    cid_o, seq_o, payload = item
    _buf_get(payload, b)
    try:
        client_id[0] = cid_o
        seq[0] = seq_o
        if <uint64_t>b.n > _U32_MAX:
            raise OverflowError(
                f"payload length={b.n} does not fit in an unsigned 32-bit field")
    except BaseException:
        _buf_release(b)
        raise
    return 0


cdef inline PyObject *_fast_payload(PyObject *item) noexcept:
    """The bytes payload of an (int, int, bytes) tuple, or NULL when the entry needs the general
    path. Exact types only: converting them runs no Python code that could free the borrowed
    pointers (an int subclass's __index__ could empty the list)."""
    cdef PyObject *payload
    if _is_tuple(item) and _tuple_size(item) == 3:
        payload = _tuple_item(item, 2)
        if (_is_bytes(payload) and <uint64_t>_bytes_size(payload) <= _U32_MAX
                and _is_int(_tuple_item(item, 0)) and _is_int(_tuple_item(item, 1))):
            return payload
    return NULL


cdef Py_ssize_t _slow_size(object item) except -1:
    cdef _Buf b
    cdef uint64_t cid, sq
    cdef Py_ssize_t n
    _open_entry(item, &b, &cid, &sq)
    n = b.n
    _buf_release(&b)
    return n


cdef int _validate_prefix(list items, Py_ssize_t end) except -1:
    """Fully checks items[:end], raising the first error the twin would raise there."""
    cdef Py_ssize_t i = 0
    while i < end and i < len(items):  # foreign code may shrink the list meanwhile
        _slow_size(<object>_list_item(items, i))
        i += 1
    return 0


def pack_batch(entries, timestamp=0, flags=0):
    """Packs (client_id, seq, payload) entries into one batch (layout in smrd/_core.pyi)."""
    cdef list items = entries if type(entries) is list else list(entries)
    cdef Py_ssize_t count = len(items)
    cdef Py_ssize_t total = _BATCH_HEADER
    cdef Py_ssize_t i, pos
    cdef Py_ssize_t n = 0
    cdef PyObject *item
    cdef PyObject *payload
    cdef object err, owned = None
    cdef uint64_t cid, sq, ts
    cdef uint32_t fl
    cdef _Buf b
    cdef bytes out
    cdef unsigned char *p
    # Pass 1 only sizes the output, so client_id/seq are converted once (in pass 2). An entry
    # off the fast path is checked fully; if it fails, earlier entries are checked first so the
    # error is the one the twin raises (it stops at the first bad entry). The general path can
    # run foreign code (__index__, buffer exporters) that may even shrink the list: sizes are
    # re-read every step and pass 2 re-checks everything against the total computed here.
    i = 0
    while i < _list_size(items):
        item = _list_item(items, i)
        payload = _fast_payload(item)
        if payload != NULL:
            n = _bytes_size(payload)
        else:
            err = None
            try:
                n = _slow_size(<object>item)
            except BaseException as e:
                err = e
            if err is not None:
                _validate_prefix(items, i)
                raise err
        total += _ENTRY_HEADER + n
        i += 1
    count = i
    if <uint64_t>count > _U32_MAX:
        raise OverflowError(f"count={count} does not fit in an unsigned 32-bit field")
    out = PyBytes_FromStringAndSize(NULL, total)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    pos = _BATCH_HEADER
    i = 0
    while i < _list_size(items):
        item = _list_item(items, i)
        payload = _fast_payload(item)
        if payload != NULL:
            cid = <object>_tuple_item(item, 0)
            sq = <object>_tuple_item(item, 1)
            b.p = <const unsigned char *>_bytes_data(payload)
            b.n = _bytes_size(payload)
            b.held = False
        else:
            # Owned for the whole step: converting client_id/seq may run code that drops the
            # list's reference, and a bytes payload is only kept alive by its tuple.
            owned = <object>item
            _open_entry(owned, &b, &cid, &sq)
        if b.n > total - pos - _ENTRY_HEADER:
            _buf_release(&b)
            raise RuntimeError("pack_batch: entries changed while being packed")
        _wr64(p + pos, cid)
        _wr64(p + pos + 8, sq)
        _wr32(p + pos + 16, <uint32_t>b.n)
        pos += _ENTRY_HEADER
        memcpy(p + pos, b.p, b.n)
        pos += b.n
        _buf_release(&b)
        owned = None
        i += 1
    if pos != total or i != count:
        raise RuntimeError("pack_batch: entries changed while being packed")
    fl = flags
    ts = timestamp
    _wr32(p, <uint32_t>count)
    _wr32(p + 4, fl)
    _wr64(p + 8, ts)
    return out


cdef struct _Entry:
    uint64_t client_id
    uint64_t seq
    Py_ssize_t off
    Py_ssize_t length


cdef class Batch:
    """A validated, zero-copy view of a packed batch. Construction walks the buffer once and
    raises ProtocolError on anything malformed; accessors then cost O(1)."""
    cdef _Entry *_entries
    cdef Py_ssize_t _n
    cdef object _mv          # flat byte view of the source; keeps it alive; payloads slice it
    cdef readonly uint64_t timestamp
    cdef readonly uint32_t flags
    cdef readonly Py_ssize_t nbytes

    def __cinit__(self, data):
        cdef Py_buffer pybuf
        if PyBytes_CheckExact(data):
            self._parse(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            self._mv = PyMemoryView_FromObject(data)
        else:
            mv = _byte_view(data)
            PyObject_GetBuffer(mv, &pybuf, PyBUF_SIMPLE)
            try:
                self._parse(<const unsigned char *>pybuf.buf, pybuf.len)
            finally:
                PyBuffer_Release(&pybuf)
            self._mv = mv

    def __dealloc__(self):
        free(self._entries)

    cdef int _parse(self, const unsigned char *p, Py_ssize_t size) except -1:
        cdef uint32_t count, length
        cdef uint32_t i
        cdef Py_ssize_t pos = _BATCH_HEADER
        cdef _Entry *e
        if size < _BATCH_HEADER:
            raise ProtocolError(
                f"short batch: {size} bytes, the header alone needs {_BATCH_HEADER}")
        count = _rd32(p)
        self.flags = _rd32(p + 4)
        self.timestamp = _rd64(p + 8)
        self.nbytes = size
        # Every entry takes at least its header, so a larger count is a lie: refuse it before
        # allocating anything sized by it.
        if count > <uint64_t>((size - _BATCH_HEADER) // _ENTRY_HEADER):
            raise ProtocolError(f"absurd batch count {count} for a {size}-byte batch")
        if count:
            self._entries = <_Entry *>malloc(count * sizeof(_Entry))
            if self._entries == NULL:
                raise MemoryError()
        for i in range(count):
            if size - pos < _ENTRY_HEADER:
                raise ProtocolError(
                    f"truncated entry {i}: header needs {_ENTRY_HEADER} bytes, "
                    f"{size - pos} remain")
            e = &self._entries[i]
            e.client_id = _rd64(p + pos)
            e.seq = _rd64(p + pos + 8)
            length = _rd32(p + pos + 16)
            pos += _ENTRY_HEADER
            if length > size - pos:
                raise ProtocolError(
                    f"truncated entry {i}: says {length} payload bytes, {size - pos} remain")
            e.off = pos
            e.length = length
            pos += length
        if pos != size:
            raise ProtocolError(f"trailing bytes: {size - pos} after {count} entries")
        self._n = count
        return 0

    cdef inline Py_ssize_t _index(self, object i) except -1:
        cdef Py_ssize_t j = _as_index(i)
        if j < 0:
            j += self._n
        if j < 0 or j >= self._n:
            raise IndexError("batch index out of range")
        return j

    cdef inline tuple _item(self, Py_ssize_t j):
        cdef _Entry *e = &self._entries[j]
        return (e.client_id, e.seq, smrd_view_slice(self._mv, e.off, e.length))

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        return self._item(self._index(i))

    def __iter__(self):
        cdef _BatchIter it = _BatchIter.__new__(_BatchIter)
        it._batch = self
        it._i = 0
        return it

    def client_id(self, i):
        return self._entries[self._index(i)].client_id

    def seq(self, i):
        return self._entries[self._index(i)].seq

    def payload(self, i):
        cdef _Entry *e = &self._entries[self._index(i)]
        return smrd_view_slice(self._mv, e.off, e.length)

    def __repr__(self):
        return (f"<Batch {self._n} entries, {self.nbytes} bytes, "
                f"timestamp={self.timestamp}>")


cdef class _BatchIter:
    # Only Batch.__iter__ makes these; one built from Python has no batch and is simply empty.
    cdef Batch _batch
    cdef Py_ssize_t _i

    def __iter__(self):
        return self

    def __next__(self):
        cdef Py_ssize_t j = self._i
        if self._batch is None or j >= self._batch._n:
            raise StopIteration
        self._i = j + 1
        return self._batch._item(j)


cdef class BatchBuilder:
    """Accumulates entries up to max_count entries / max_bytes packed bytes; an empty builder
    always accepts its first entry. Payloads are copied at add() so callers may reuse buffers."""
    cdef unsigned char *_buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _max_bytes
    cdef Py_ssize_t _max_count
    cdef readonly Py_ssize_t count
    cdef readonly object max_count
    cdef readonly object max_bytes

    def __cinit__(self, max_count, max_bytes):
        max_count = operator.index(max_count)
        max_bytes = operator.index(max_bytes)
        if not 1 <= max_count <= _U32_MAX:
            raise ValueError(f"max_count must be in [1, {_U32_MAX}], not {max_count}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._max_bytes = _as_index(max_bytes)
        self._max_count = max_count
        self._len = _BATCH_HEADER
        self._reserve(4096)

    def __dealloc__(self):
        free(self._buf)

    cdef int _reserve(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = self._cap if self._cap else 4096
        cdef unsigned char *nb
        if need <= self._cap:
            return 0
        while cap < need:
            cap *= 2
        nb = <unsigned char *>realloc(self._buf, cap)
        if nb == NULL:
            raise MemoryError()
        self._buf = nb
        self._cap = cap
        return 0

    @property
    def nbytes(self):
        return self._len

    def add(self, uint64_t client_id, uint64_t seq, payload):
        cdef _Buf b
        cdef unsigned char *p
        _buf_get(payload, &b)
        try:
            if <uint64_t>b.n > _U32_MAX:
                raise OverflowError(
                    f"payload length={b.n} does not fit in an unsigned 32-bit field")
            if self.count and (self.count >= self._max_count
                               or b.n > self._max_bytes - self._len - _ENTRY_HEADER):
                return False
            self._reserve(self._len + _ENTRY_HEADER + b.n)
            p = self._buf + self._len
            _wr64(p, client_id)
            _wr64(p + 8, seq)
            _wr32(p + 16, <uint32_t>b.n)
            if b.n:
                memcpy(p + _ENTRY_HEADER, b.p, b.n)
            self._len += _ENTRY_HEADER + b.n
            self.count += 1
            return True
        finally:
            _buf_release(&b)

    def build(self, uint64_t timestamp=0, uint32_t flags=0):
        cdef bytes out
        _wr32(self._buf, <uint32_t>self.count)
        _wr32(self._buf + 4, flags)
        _wr64(self._buf + 8, timestamp)
        out = PyBytes_FromStringAndSize(<char *>self._buf, self._len)
        self._len = _BATCH_HEADER
        self.count = 0
        # One oversized request must not pin its buffer for the builder's lifetime.
        if self._cap > (1 << 20) and self._cap > 2 * self._max_bytes:
            free(self._buf)
            self._buf = NULL
            self._cap = 0
            self._reserve(4096)
        return out


# ------------------------------------------------------------------------------- quorum votes

cdef class _Votes:
    cdef uint64_t view
    cdef uint64_t voters
    cdef int count
    cdef bint done


cdef class QuorumTracker:
    """Per-instance vote counting for one view at a time. n <= 64 (votes are a bitmask)."""
    cdef dict _votes
    cdef readonly int n
    cdef readonly int quorum

    def __cinit__(self, n, quorum):
        n = operator.index(n)
        quorum = operator.index(quorum)
        if not 1 <= quorum <= n <= 64:
            raise ValueError(f"need 1 <= quorum <= n <= 64, got n={n}, quorum={quorum}")
        self.n = n
        self.quorum = quorum
        self._votes = {}

    def add(self, instance, view, replica):
        cdef Py_ssize_t r = _as_index(replica)
        cdef uint64_t inst, v, bit
        cdef _Votes rec
        if r < 0 or r >= self.n:
            raise ValueError(f"replica {replica} is not in [0, {self.n})")
        inst = instance
        v = view
        bit = (<uint64_t>1) << r
        found = self._votes.get(instance)
        if found is None or v > (<_Votes>found).view:
            rec = _Votes.__new__(_Votes)
            rec.view = v
            rec.voters = bit
            rec.count = 1
            rec.done = self.quorum <= 1
            self._votes[instance] = rec
            return rec.done
        rec = <_Votes>found
        if v < rec.view or rec.voters & bit:
            return False
        rec.voters |= bit
        rec.count += 1
        if not rec.done and rec.count >= self.quorum:
            rec.done = True
            return True
        return False

    def count(self, instance):
        found = self._votes.get(instance)
        return 0 if found is None else (<_Votes>found).count

    def reached(self, instance):
        found = self._votes.get(instance)
        return False if found is None else (<_Votes>found).done

    def view_of(self, instance):
        found = self._votes.get(instance)
        return -1 if found is None else (<_Votes>found).view

    def voters(self, instance):
        found = self._votes.get(instance)
        return 0 if found is None else (<_Votes>found).voters

    def discard_below(self, instance):
        cdef dict votes = self._votes
        for key in [key for key in votes if key < instance]:
            del votes[key]

    def __len__(self):
        return len(self._votes)


# -------------------------------------------------------------------------------- reply cache

cdef class _Client:
    """One client's window: the kept seqs in ascending order in slots [head, head + n) of a C
    array, their replies (owned references, None while executing) in a parallel array.
    Seqs mostly arrive in increasing order, so the common insert is an append, the common
    lookup hits the last slot, and evicting the lowest is head += 1; out-of-order seqs cost a
    binary search and a short memmove. No dict, no per-seq Python objects."""
    cdef uint64_t *seqs
    cdef PyObject **replies
    cdef Py_ssize_t head
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef uint64_t floor
    cdef uint64_t last_active

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.head, self.head + self.n):
            Py_XDECREF(self.replies[i])
        free(self.seqs)
        free(self.replies)

    cdef inline Py_ssize_t find(self, uint64_t s) noexcept:
        """Slot holding s, or -1."""
        cdef Py_ssize_t lo = self.head, hi = self.head + self.n, mid
        if self.n and self.seqs[hi - 1] == s:
            return hi - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.seqs[mid] < s:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.head + self.n and self.seqs[lo] == s:
            return lo
        return -1

    cdef int insert(self, uint64_t s, object reply) except -1:
        """Adds s (not present, above the floor) keeping the slots sorted."""
        cdef Py_ssize_t end, pos, lo, hi, mid, cap
        cdef uint64_t *ns
        cdef PyObject **nr
        if self.head + self.n == self.cap:
            if self.head:
                # Slide the window back to the start: amortised O(1) per insert.
                memmove(self.seqs, self.seqs + self.head, self.n * sizeof(uint64_t))
                memmove(self.replies, self.replies + self.head, self.n * sizeof(PyObject *))
                self.head = 0
            else:
                cap = self.cap * 2 if self.cap else 4
                ns = <uint64_t *>realloc(self.seqs, cap * sizeof(uint64_t))
                if ns == NULL:
                    raise MemoryError()
                self.seqs = ns
                nr = <PyObject **>realloc(self.replies, cap * sizeof(PyObject *))
                if nr == NULL:
                    raise MemoryError()
                self.replies = nr
                self.cap = cap
        end = self.head + self.n
        if self.n == 0 or self.seqs[end - 1] < s:
            pos = end
        else:
            lo = self.head
            hi = end
            while lo < hi:
                mid = (lo + hi) >> 1
                if self.seqs[mid] < s:
                    lo = mid + 1
                else:
                    hi = mid
            pos = lo
            memmove(self.seqs + pos + 1, self.seqs + pos, (end - pos) * sizeof(uint64_t))
            memmove(self.replies + pos + 1, self.replies + pos, (end - pos) * sizeof(PyObject *))
        self.seqs[pos] = s
        Py_INCREF(reply)
        self.replies[pos] = <PyObject *>reply
        self.n += 1
        return 0

    cdef void evict_lowest(self) noexcept:
        cdef PyObject *reply = self.replies[self.head]
        self.floor = self.seqs[self.head]
        self.head += 1
        self.n -= 1
        Py_XDECREF(reply)


cdef class ReplyCache:
    """The exactly-once table: for each client the replies of its last k executed seqs. Seqs
    start at 1: a client's floor starts at 0 and everything at or below it is TOO_OLD."""
    cdef dict _clients
    cdef Py_ssize_t _k
    cdef readonly object k

    def __cinit__(self, k):
        k = operator.index(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        self.k = k
        self._k = _as_index(k)
        self._clients = {}

    def check(self, client_id, seq):
        cdef uint64_t s = seq
        cdef uint64_t c = client_id
        cdef _Client cl
        found = self._clients.get(client_id)
        if found is None:
            return _NEW if s else _TOO_OLD
        cl = <_Client>found
        if s <= cl.floor:
            return _TOO_OLD
        return _DUPLICATE if cl.find(s) >= 0 else _NEW

    def get(self, client_id, seq):
        cdef uint64_t s
        cdef Py_ssize_t slot
        found = self._clients.get(client_id)
        if found is None:
            return None
        try:
            s = seq
        except (OverflowError, TypeError):
            return None  # not a seq any client can hold, as a dict lookup in the twin says
        slot = (<_Client>found).find(s)
        return None if slot < 0 else <object>(<_Client>found).replies[slot]

    def put(self, client_id, seq, reply, timestamp=0):
        cdef uint64_t s = seq
        cdef uint64_t c = client_id
        cdef uint64_t ts = timestamp
        cdef uint64_t floor
        cdef Py_ssize_t slot
        cdef _Client cl
        cdef PyObject *old
        found = self._clients.get(client_id)
        floor = 0 if found is None else (<_Client>found).floor
        if s <= floor:
            raise ValueError(
                f"seq {seq} of client {client_id} is at or below its floor {floor} (TOO_OLD)")
        if found is None:
            cl = _Client.__new__(_Client)
            cl.last_active = ts
            self._clients[client_id] = cl
        else:
            cl = <_Client>found
            if ts > cl.last_active:
                cl.last_active = ts
        slot = cl.find(s)
        if slot >= 0:
            # Filling a placeholder (or replacing a reply): same seq, no new slot.
            old = cl.replies[slot]
            Py_INCREF(reply)
            cl.replies[slot] = <PyObject *>reply
            Py_XDECREF(old)
            return
        cl.insert(s, reply)
        if cl.n > self._k:
            cl.evict_lowest()

    def floor(self, client_id):
        found = self._clients.get(client_id)
        return 0 if found is None else (<_Client>found).floor

    def last_active(self, client_id):
        found = self._clients.get(client_id)
        return -1 if found is None else (<_Client>found).last_active

    def expire(self, older_than):
        cdef uint64_t limit = older_than
        cdef list dead = []
        cdef Py_ssize_t pos = 0
        cdef PyObject *key
        cdef PyObject *value
        while PyDict_Next(self._clients, &pos, &key, &value):
            if (<_Client>value).last_active < limit:
                dead.append(<object>key)
        for cid in dead:
            del self._clients[cid]
        return len(dead)

    def __len__(self):
        return len(self._clients)

    def __contains__(self, client_id):
        return client_id in self._clients

    def clients(self):
        return sorted(self._clients)

    def entries(self, client_id):
        """The client's kept (seq, reply) pairs in seq order (for checkpoints)."""
        cdef _Client cl
        cdef Py_ssize_t i
        found = self._clients.get(client_id)
        if found is None:
            return []
        cl = <_Client>found
        return [(cl.seqs[i], <object>cl.replies[i]) for i in range(cl.head, cl.head + cl.n)]

    def restore_client(self, client_id, floor, last_active, entries):
        """Replace one client's whole state (from a checkpoint): its floor, last-active time and
        kept (seq, reply) pairs, all above the floor."""
        cdef _Client cl
        self._clients.pop(client_id, None)
        cl = _Client.__new__(_Client)
        cl.last_active = last_active
        self._clients[client_id] = cl
        for seq, reply in entries:
            self.put(client_id, seq, reply)
        cl.floor = floor
