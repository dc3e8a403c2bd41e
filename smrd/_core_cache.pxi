# _core_cache.pxi: the per-client reply cache (ReplyCache); included by smrd/_core.pyx (one extension, several source files).

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
