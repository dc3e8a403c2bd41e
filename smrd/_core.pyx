# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, binding=False, auto_pickle=False, embedsignature=True
"""smrd._core: the compiled hot path. Owns wire framing (encode/decode with bounds checks), batch
packing/unpacking, per-instance quorum counting and the reply cache; smrd/_core.pyi is the
contract and smrd/_core_py.py the pure-Python reference twin it must agree with, byte for byte
and error for error (tests/unit/test_core_twins.py).
Never: I/O, clocks, logging, asyncio/zmq imports, or a decode path that raises anything but
ProtocolError on bad bytes or allocates before a length has been checked against the buffer. One
exception to "no I/O": _core_close.pxi, close framing's per-connection exchanges with the app,
which run without the GIL (the only place plain system calls are cheaper than the event loop).

Rules the loops below follow:
- Integers on the wire are little-endian and are assembled byte by byte: compilers turn that into
  one load/store on little-endian targets and it stays correct on big-endian ones.
- Work happens on raw pointers; Python objects are touched only at the boundary (arguments in,
  one result object out).
- Argument checks happen in the same order as in the twin so both raise the same exception.
"""

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

include "_core_framing.pxi"
include "_core_batch.pxi"
include "_core_quorum.pxi"
include "_core_cache.pxi"
include "_core_close.pxi"
