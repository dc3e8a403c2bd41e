"""smrd.gateway.calls.CallBook, sans-IO: where requests go, around replicas that cannot execute,
and divergence notices.

A replica that orders a request it was sent alone but cannot execute it answers NOT_EXECUTING at
once: the call book then asks every replica, for that request and for new ones, until a status
answer says the replica executes again. A majority reply tells the minority to rebuild.

No sockets, no event loop, no clock: time is the `now` the test passes, and what the book would
send is what take() returns."""
import itertools

from smrd.gateway.calls import CallBook, ClusterUnavailable, Notice, Send
from smrd.protocol.messages import reply_digest
from smrd.protocol.sessions import NOT_EXECUTING, TOO_OLD, UNKNOWN_SESSION


def book(**kw):
    ids = itertools.count(100)
    settings = dict(k=8, max_inflight=8, reply_quorum=1, retransmit_s=0.5, deadline_s=10.0,
                    check_every=0, new_client_id=lambda: next(ids))
    settings.update(kw)
    return CallBook((0, 1, 2), **settings)


def status(b, replica, now=0.0, **fields):
    body = dict(view=0, leader=0, status="normal",
                membership={"index": 0, "voters": [0, 1, 2], "learners": []}, **fields)
    b.heard(replica, now)
    b.on_status(replica, body, now)


def sent(b):
    return [(out.to, out.directed, [c.key for c in out.calls]) for out in b.take() if type(out) is Send]


def submit(b, payload=b"PUT a 1", now=0.0):
    call = b.submit(payload, now)
    b.flush()
    return call


def test_requests_go_to_the_known_leader_alone_and_retransmissions_to_everyone():
    b = book()
    first = submit(b)
    assert sent(b) == [((0, 1, 2), False, [first.key])]  # no leader known yet
    for r in range(3):
        status(b, r)
    call = submit(b)
    assert sent(b) == [((0,), True, [call.key])]
    b.tick(0.4)
    assert sent(b) == []
    b.tick(0.6)
    assert sent(b) == [((0, 1, 2), False, [first.key, call.key])]
    assert b.stats["retransmits"] == 2


def test_a_leader_that_cannot_execute_is_routed_around_at_once():
    b = book()
    for r in range(3):
        status(b, r)
    call = submit(b)
    assert sent(b) == [((0,), True, [call.key])]

    b.on_error(0, call.key, NOT_EXECUTING, b"cannot execute now", 0.01)
    assert not call.done(), "NOT_EXECUTING is not an answer for the client"
    assert sent(b) == [((0, 1, 2), False, [call.key])]  # asked again, everyone, at once
    assert b.not_executing == {0}

    later = submit(b, b"PUT b 1")
    assert sent(b) == [((0, 1, 2), False, [later.key])], "new requests go to everyone now"
    b.on_reply(1, later.key, b"OK", 0.02)
    assert later.result() == b"OK"

    status(b, 0, can_execute=True)  # it executes again
    again = submit(b, b"PUT c 1")
    assert sent(b) == [((0,), True, [again.key])]


def test_a_status_answer_that_says_cannot_execute_is_enough():
    b = book()
    for r in range(3):
        status(b, r)
    status(b, 0, can_execute=False, execution_reason="rebuilding")
    assert b.not_executing == {0}
    call = submit(b)
    assert sent(b) == [((0, 1, 2), False, [call.key])]


def test_the_minority_is_told_once_and_the_majority_never():
    b = book(reply_quorum=3)  # wait for all three, as a divergence check does
    for r in range(3):
        status(b, r)
    call = submit(b, b"GET a")
    b.take()
    key = call.key
    b.on_reply(0, key, b"VALUE 1", 0.0)
    b.on_reply(1, key, b"NOT_FOUND", 0.0)
    assert b.take() == [], "one against one: no majority yet"
    b.on_reply(2, key, b"VALUE 1", 0.0)
    told = [out for out in b.take() if type(out) is Notice]
    assert [n.to for n in told] == [1]
    (cid, seq, data), = told[0].entries
    assert (cid, seq) == key and data[:16] == reply_digest(b"VALUE 1") and data[16] == 2
    b.on_reply(1, key, b"NOT_FOUND", 0.0)  # a late duplicate answer
    assert not [out for out in b.take() if type(out) is Notice]
    assert b.stats["divergences"] >= 2


def test_the_window_holds_k_seqs_and_reopens_on_a_reply():
    opened = []
    b = book(k=3, max_inflight=3)
    b.on_window_open = lambda: opened.append(True)
    calls = [b.submit(b"x", 0.0) for _ in range(3)]
    assert b.submit(b"x", 0.0) is None
    b.on_reply(0, calls[0].key, b"OK", 0.0)
    assert opened and b.submit(b"x", 0.0) is not None


def test_an_expired_session_resends_everything_under_a_new_one():
    b = book()
    calls = [submit(b, b"PUT a %d" % i) for i in range(2)]
    b.take()
    old = b.client_id
    b.on_error(0, calls[0].key, UNKNOWN_SESSION, b"unknown", 0.0)
    assert b.client_id != old
    assert [c.key for c in calls] == [(b.client_id, 1), (b.client_id, 2)]
    assert sent(b) == [((0, 1, 2), False, [(b.client_id, 1), (b.client_id, 2)])]


def test_errors_and_deadlines_complete_calls_with_a_clear_error():
    b = book(deadline_s=2.0)
    old, slow = submit(b), submit(b)
    b.on_error(1, old.key, TOO_OLD, b"", 0.0)
    assert isinstance(old.exception(), ClusterUnavailable) and "too old" in str(old.exception())
    b.tick(2.0)
    assert "no reply from the replicas within 2 s" in str(slow.exception())
    assert b.stats["timeouts"] == 1 and not b.calls


def test_losing_the_leader_sends_everything_to_everyone_and_asks_for_a_probe():
    lost = []
    b = book()
    b.on_leader_lost = lambda: lost.append(True)
    for r in range(3):
        status(b, r)
    call = submit(b)
    b.take()
    b.connection_lost(0, 0.1)
    assert lost and b.leader is None
    assert sent(b) == [((0, 1, 2), False, [call.key])]
