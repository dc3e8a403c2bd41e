# _core_quorum.pxi: per-instance vote counting (QuorumTracker); included by smrd/_core.pyx (one extension, several source files).

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
