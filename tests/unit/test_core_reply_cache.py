# ReplyCache of smrd._core, on both twins: the exactly-once table. Seqs start at 1; each client
# keeps its last k executed seqs; evicting one raises the client's floor to it; anything at or
# below the floor is TOO_OLD.
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_new_duplicate_too_old(impl):
    cache = impl.ReplyCache(k=4)
    assert cache.k == 4
    assert cache.check(1, 1) == impl.NEW
    cache.put(1, 1, b"one", timestamp=10)
    assert cache.check(1, 1) == impl.DUPLICATE
    assert cache.get(1, 1) == b"one"
    assert cache.check(1, 2) == impl.NEW
    assert cache.check(2, 1) == impl.NEW  # clients are independent
    assert cache.floor(1) == 0 and cache.last_active(1) == 10


def test_unknown_client(impl):
    cache = impl.ReplyCache(3)
    assert cache.floor(42) == 0
    assert cache.last_active(42) == -1
    assert cache.get(42, 1) is None
    assert 42 not in cache and len(cache) == 0 and cache.clients() == []
    # seq 0 is at the floor of every client: seqs start at 1.
    assert cache.check(42, 0) == impl.TOO_OLD
    with pytest.raises(ValueError, match="at or below its floor 0"):
        cache.put(42, 0, b"")
    assert 42 not in cache


def test_eviction_raises_the_floor(impl):
    cache = impl.ReplyCache(3)
    for seq in range(1, 6):
        cache.put(7, seq, b"r%d" % seq)
    assert cache.floor(7) == 2
    assert [cache.check(7, s) for s in range(0, 7)] == [
        impl.TOO_OLD, impl.TOO_OLD, impl.TOO_OLD, impl.DUPLICATE, impl.DUPLICATE,
        impl.DUPLICATE, impl.NEW]
    assert cache.get(7, 2) is None and cache.get(7, 3) == b"r3"
    with pytest.raises(ValueError, match="at or below its floor 2"):
        cache.put(7, 2, b"late")


def test_out_of_order_seqs_within_the_window(impl):
    cache = impl.ReplyCache(3)
    for seq in (5, 3, 4):
        cache.put(1, seq, b"%d" % seq)
    assert cache.floor(1) == 0
    assert cache.check(1, 2) == impl.NEW  # a gap below the window is still NEW until evicted past
    cache.put(1, 7, b"7")  # four seqs now: the lowest (3) goes, not the oldest inserted (5)
    assert cache.floor(1) == 3
    assert [cache.check(1, s) for s in (2, 3, 4, 5, 6, 7)] == [
        impl.TOO_OLD, impl.TOO_OLD, impl.DUPLICATE, impl.DUPLICATE, impl.NEW, impl.DUPLICATE]
    cache.put(1, 6, b"6")  # fills the gap and evicts 4
    assert cache.floor(1) == 4 and cache.check(1, 6) == impl.DUPLICATE


def test_late_insert_below_the_window_is_evicted_at_once(impl):
    cache = impl.ReplyCache(2)
    cache.put(1, 5, b"5")
    cache.put(1, 6, b"6")
    cache.put(1, 2, b"2")  # above the floor (0) but the lowest of three: evicted immediately
    assert cache.floor(1) == 2 and cache.check(1, 2) == impl.TOO_OLD
    assert cache.check(1, 5) == impl.DUPLICATE


def test_placeholder_then_filled(impl):
    cache = impl.ReplyCache(2)
    cache.put(3, 1, None, timestamp=5)
    assert cache.check(3, 1) == impl.DUPLICATE  # executing: answer when the reply is in
    assert cache.get(3, 1) is None
    cache.put(3, 1, b"done", timestamp=4)
    assert cache.get(3, 1) == b"done"
    assert cache.last_active(3) == 5  # max(old, timestamp)
    cache.put(3, 2, b"two")
    assert cache.floor(3) == 0  # refilling seq 1 did not count as a second entry


def test_expire_by_timestamp(impl):
    cache = impl.ReplyCache(2)
    cache.put(1, 1, b"", timestamp=100)
    cache.put(2, 1, b"", timestamp=200)
    cache.put(3, 1, b"", timestamp=300)
    cache.put(1, 2, b"", timestamp=250)  # client 1 is active again
    assert [cache.last_active(c) for c in (1, 2, 3)] == [250, 200, 300]
    assert cache.expire(200) == 0  # strictly older than: 200 stays
    assert cache.expire(251) == 2
    assert cache.clients() == [3] and 1 not in cache and len(cache) == 1
    assert cache.check(1, 1) == impl.NEW  # a forgotten client starts over
    assert cache.expire(2**64 - 1) == 1 and len(cache) == 0


def test_clients_sorted(impl):
    cache = impl.ReplyCache(1)
    for cid in (9, 2**64 - 1, 0, 5):
        cache.put(cid, 1, b"")
    assert cache.clients() == [0, 5, 9, 2**64 - 1]
    assert len(cache) == 4 and 5 in cache and 6 not in cache


def test_rejects_bad_arguments(impl):
    for k in (0, -1):
        with pytest.raises(ValueError):
            impl.ReplyCache(k)
    cache = impl.ReplyCache(2)
    with pytest.raises(OverflowError):
        cache.put(-1, 1, b"")
    with pytest.raises(OverflowError):
        cache.put(1, 2**64, b"")
    with pytest.raises(OverflowError):
        cache.put(1, 1, b"", timestamp=-5)
    with pytest.raises(OverflowError):
        cache.check(1, -1)
    with pytest.raises(OverflowError):
        cache.expire(-1)
    assert len(cache) == 0


@SETTINGS
@given(k=st.integers(1, 5), ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12)),
                                         max_size=60))
def test_matches_a_simple_model(impl, k, ops):
    """Against a naive model: a sorted list of kept seqs per client."""
    cache = impl.ReplyCache(k)
    kept, floors = {}, {}
    for cid, seq in ops:
        floor = floors.get(cid, 0)
        if seq in kept.get(cid, ()):
            expected = impl.DUPLICATE
        elif seq <= floor:
            expected = impl.TOO_OLD
        else:
            expected = impl.NEW
        assert cache.check(cid, seq) == expected
        if expected == impl.NEW:
            cache.put(cid, seq, b"%d" % seq)
            seqs = sorted(kept.get(cid, []) + [seq])
            if len(seqs) > k:
                floors[cid] = seqs.pop(0)
            kept[cid] = seqs
        assert cache.floor(cid) == floors.get(cid, 0)
    assert cache.clients() == sorted(kept)


def test_replies_are_released(impl):
    import sys

    reply = bytes(range(7)) * 3  # a fresh object: only this frame and the cache refer to it
    before = sys.getrefcount(reply)
    cache = impl.ReplyCache(1)
    cache.put(1, 1, reply)
    assert sys.getrefcount(reply) == before + 1
    cache.put(1, 2, b"x")  # evicts seq 1
    assert sys.getrefcount(reply) == before
    cache.put(2, 1, reply)
    cache.put(2, 1, b"y")  # replaced in place
    assert sys.getrefcount(reply) == before
    cache.put(3, 1, reply)
    assert cache.expire(1) == 3
    assert sys.getrefcount(reply) == before
    cache.put(4, 1, reply)
    del cache
    assert sys.getrefcount(reply) == before


def test_entries_and_restore_client_round_trip(impl):
    # Checkpoints carry the exactly-once table: dumping a client and restoring it elsewhere must
    # give the same answers for every seq.
    cache = impl.ReplyCache(3)
    for seq in range(1, 7):
        cache.put(9, seq, b"r%d" % seq, 100 + seq)
    cache.put(9, 7, None, 200)
    entries = cache.entries(9)
    assert entries == [(5, b"r5"), (6, b"r6"), (7, None)]
    copy = impl.ReplyCache(3)
    copy.restore_client(9, cache.floor(9), cache.last_active(9), entries)
    for seq in range(0, 10):
        assert copy.check(9, seq) == cache.check(9, seq), seq
        assert copy.get(9, seq) == cache.get(9, seq)
    assert copy.floor(9) == 4 and copy.last_active(9) == 200
    assert impl.ReplyCache(2).entries(1) == []
