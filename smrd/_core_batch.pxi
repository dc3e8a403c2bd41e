# _core_batch.pxi: batches of (client_id, seq, payload) entries (pack, the zero-copy Batch view, BatchBuilder); included by smrd/_core.pyx (one extension, several source files).

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
