# QuorumTracker of smrd._core, on both twins: a quorum is reached exactly once per (instance,
# view); older views are ignored, newer views restart the count; duplicates count once.
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("n", range(1, 10))
def test_majority_quorum_reached_exactly_once(impl, n):
    quorum = n // 2 + 1
    tracker = impl.QuorumTracker(n, quorum)
    assert (tracker.n, tracker.quorum) == (n, quorum)
    results = [tracker.add(7, 3, r) for r in range(n)]
    assert results == [r + 1 == quorum for r in range(n)]
    assert tracker.count(7) == n and tracker.reached(7) and tracker.view_of(7) == 3
    assert tracker.voters(7) == (1 << n) - 1
    # Votes arriving again (retransmissions) change nothing and never re-report the quorum.
    assert not any(tracker.add(7, 3, r) for r in range(n))
    assert tracker.count(7) == n


@pytest.mark.parametrize("n", range(1, 10))
def test_quorum_in_any_vote_order(impl, n):
    quorum = n // 2 + 1
    tracker = impl.QuorumTracker(n, quorum)
    order = list(reversed(range(n)))
    assert [tracker.add(1, 0, r) for r in order].count(True) == 1
    assert tracker.add(1, 0, order[0]) is False


def test_duplicates_count_once(impl):
    tracker = impl.QuorumTracker(5, 3)
    assert not tracker.add(1, 0, 2)
    assert not tracker.add(1, 0, 2)
    assert not tracker.add(1, 0, 2)
    assert tracker.count(1) == 1 and tracker.voters(1) == 0b100 and not tracker.reached(1)
    assert not tracker.add(1, 0, 4)
    assert tracker.add(1, 0, 0) is True
    assert tracker.voters(1) == 0b10101


def test_older_view_is_ignored(impl):
    tracker = impl.QuorumTracker(3, 2)
    assert not tracker.add(5, 4, 0)
    assert not tracker.add(5, 3, 1)  # older view: ignored
    assert tracker.count(5) == 1 and tracker.view_of(5) == 4 and tracker.voters(5) == 0b001
    assert tracker.add(5, 4, 1) is True


def test_newer_view_restarts_the_count(impl):
    tracker = impl.QuorumTracker(3, 2)
    assert not tracker.add(5, 1, 0)
    assert tracker.add(5, 1, 1) is True
    assert not tracker.add(5, 2, 2)  # the new view starts over with this one vote
    assert (tracker.view_of(5), tracker.count(5), tracker.voters(5)) == (2, 1, 0b100)
    assert not tracker.reached(5)
    assert not tracker.add(5, 1, 0)  # the old view is now older: ignored
    assert tracker.add(5, 2, 0) is True  # exactly once for (instance 5, view 2) too
    assert not tracker.add(5, 2, 1)


def test_quorum_of_one_and_of_all(impl):
    one = impl.QuorumTracker(3, 1)
    assert one.add(1, 0, 2) is True and not one.add(1, 0, 1)
    assert one.add(1, 1, 0) is True  # new view, reached again at once
    everyone = impl.QuorumTracker(4, 4)
    assert [everyone.add(9, 0, r) for r in (3, 1, 0, 2)] == [False, False, False, True]


def test_instances_are_independent(impl):
    tracker = impl.QuorumTracker(3, 2)
    tracker.add(1, 0, 0)
    tracker.add(2, 5, 1)
    assert len(tracker) == 2
    assert (tracker.count(1), tracker.count(2), tracker.count(3)) == (1, 1, 0)
    assert (tracker.view_of(1), tracker.view_of(2), tracker.view_of(3)) == (0, 5, -1)
    assert tracker.voters(3) == 0 and not tracker.reached(3)


def test_discard_below(impl):
    tracker = impl.QuorumTracker(3, 2)
    for instance in (10, 3, 7, 1, 12):
        tracker.add(instance, 0, 0)
    tracker.discard_below(7)
    assert len(tracker) == 3 and tracker.view_of(3) == -1 and tracker.count(7) == 1
    tracker.discard_below(0)
    assert len(tracker) == 3
    tracker.discard_below(2**64)
    assert len(tracker) == 0


def test_sixty_four_replicas_and_u64_fields(impl):
    tracker = impl.QuorumTracker(64, 33)
    top = 2**64 - 1
    assert not tracker.add(top, top, 63)
    assert tracker.voters(top) == 1 << 63 and tracker.view_of(top) == top
    assert [tracker.add(top, top, r) for r in range(32)].count(True) == 1


def test_rejects_bad_arguments(impl):
    for n, quorum in [(0, 0), (1, 0), (3, 4), (65, 33), (-1, 1), (3, -1)]:
        with pytest.raises(ValueError):
            impl.QuorumTracker(n, quorum)
    tracker = impl.QuorumTracker(3, 2)
    for replica in (-1, 3, 64, 2**70):
        with pytest.raises(ValueError):
            tracker.add(1, 0, replica)
    with pytest.raises(OverflowError):
        tracker.add(-1, 0, 0)
    with pytest.raises(OverflowError):
        tracker.add(1, 2**64, 0)
    assert len(tracker) == 0


@SETTINGS
@given(n=st.integers(1, 9), votes=st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 8)), max_size=60))
def test_matches_a_simple_model(impl, n, votes):
    """Checked against a deliberately naive model built from sets."""
    quorum = n // 2 + 1
    tracker = impl.QuorumTracker(n, quorum)
    model = {}  # instance -> (view, set of voters, reported)
    for instance, view, replica in votes:
        replica %= n
        cur = model.get(instance)
        if cur is None or view > cur[0]:
            cur = model[instance] = [view, set(), False]
        expected = False
        if view == cur[0] and replica not in cur[1]:
            cur[1].add(replica)
            if len(cur[1]) >= quorum and not cur[2]:
                cur[2] = expected = True
        assert tracker.add(instance, view, replica) is expected
        assert tracker.count(instance) == len(cur[1])
        assert tracker.reached(instance) == cur[2]
        assert tracker.voters(instance) == sum(1 << r for r in cur[1])
    assert len(tracker) == len(model)
