# Membership changes in the protocol core, driven by a tiny lossless in-memory network: the
# rules themselves (what is refused, who leads, who counts). Faults are the simulator's job
# (tests/sim); real processes are tests/e2e/test_membership.py.
import pytest

from smrd import core
from smrd.protocol import Options, Replica, Requests
from smrd.protocol.membership import (
    ADD_LEARNER, PROMOTE, REMOVE, SYSTEM_CLIENT, Change, Membership,
)
from smrd.protocol.sessions import SYSTEM, Sessions, run_plan

OPT = Options(window=2, heartbeat_ticks=2, election_ticks=10, request_ticks=20, retransmit_ticks=3)


class Net:
    """n candidate ids; `up` replicas run. Messages are delivered in order, none lost."""

    def __init__(self, n, voters, up, auto_join=()):
        self.n = n
        self.replicas = {}
        self.apps = {}
        self.replies = []
        for r in up:
            self.start(r, voters, auto_join=r in auto_join)

    def start(self, r, voters, auto_join=False):
        self.replicas[r] = Replica(r, n=self.n, options=OPT, sessions=Sessions(8, 10 ** 9),
                                   voters=voters, auto_join=auto_join, recovery_nonce=r + 1)
        self.apps[r] = {}

    def run(self, ticks=1, until=None):
        for _ in range(ticks):
            for rep in list(self.replicas.values()):
                rep.tick()
            self.flush()
            if until is not None and until():
                return True
        return until() if until is not None else None

    def flush(self):
        moved = True
        while moved:
            moved = False
            for r, rep in list(self.replicas.items()):
                rd = rep.ready()
                for dest, msg in rd.messages:
                    if dest in self.replicas:
                        self.replicas[dest].step(r, msg)
                        moved = True
                for _, _, plan in rd.apply:
                    for cid, seq, status, reply in run_plan(rep.sessions, plan, lambda p: b"ok"):
                        if status == SYSTEM:
                            self.replies.append((r, reply))
                for origin, cid, seq, status, reply in rd.replies:
                    self.replies.append((r, reply))

    def leader(self):
        leaders = [r for r, rep in self.replicas.items() if rep.is_leader]
        return leaders[0] if len(leaders) == 1 else None

    def submit(self, change, to=None, seq=1):
        batch = core.pack_batch([(SYSTEM_CLIENT, seq, change.encode())])
        for r in ([to] if to is not None else list(self.replicas)):
            self.replicas[r].step("admin", Requests(batch))
        self.flush()

    def memberships(self):
        return {r: rep.membership for r, rep in self.replicas.items()}


def test_membership_check_rules():
    m = Membership.bootstrap([0, 1, 2])
    assert m.check(Change(ADD_LEARNER, 3, 0), 5)[0] == Membership(1, frozenset({0, 1, 2}), frozenset({3}))
    assert "stale" in m.check(Change(ADD_LEARNER, 3, 1), 5)[1]
    assert "not in hosts.conf" in m.check(Change(ADD_LEARNER, 7, 0), 5)[1]
    assert "already a voter" in m.check(Change(ADD_LEARNER, 1, 0), 5)[1]
    assert "not a learner" in m.check(Change(PROMOTE, 3, 0), 5)[1]
    one = Membership.bootstrap([0])
    assert "last voter" in one.check(Change(REMOVE, 0, 0), 5)[1]
    assert Change.decode(Change(REMOVE, 2, 9).encode()) == Change(REMOVE, 2, 9)
    assert Change.decode(b"garbage") is None
    assert Change.decode(b'smrd-membership/1 ["promote", -1, 0]') is None
    assert Membership.decode(m.encode()) == m
    with pytest.raises(ValueError):
        Membership.decode(b"[1, [], []]")


def test_sessions_image_carries_the_membership():
    s = Sessions(4, 1000)
    s.membership = Membership(3, frozenset({0, 1, 4}), frozenset({2}))
    blob = s.capture().encode()
    assert Sessions.restore(4, 1000, blob).membership == s.membership


def test_new_replicas_join_as_learners_and_are_promoted_when_caught_up():
    net = Net(5, voters=[0, 1, 2], up=[0, 1, 2])
    assert net.run(200, until=lambda: net.leader() is not None)
    net.start(3, [0, 1, 2], auto_join=True)
    assert net.run(400, until=lambda: all(m.voters == {0, 1, 2, 3} for m in net.memberships().values()))
    net.start(4, [0, 1, 2], auto_join=True)
    assert net.run(400, until=lambda: all(m.voters == {0, 1, 2, 3, 4} for m in net.memberships().values()))
    ms = net.memberships()
    assert len(set(ms.values())) == 1 and ms[0].index == 4  # learner, promote, learner, promote


def test_a_change_that_would_lose_quorum_is_refused():
    net = Net(5, voters=[0, 1, 2], up=[0, 1, 2])
    assert net.run(200, until=lambda: net.leader() == 0)
    del net.replicas[2]                      # replica 2 is down
    net.run(20)
    net.submit(Change(REMOVE, 1, 0), to=0)   # 0 alone cannot be a quorum of {0, 2}
    assert any(b"would lose quorum" in reply for _, reply in net.replies)
    assert net.replicas[0].membership.index == 0


def test_a_leader_that_leaves_hands_off_first():
    net = Net(3, voters=[0, 1, 2], up=[0, 1, 2])
    assert net.run(200, until=lambda: net.leader() == 0)
    net.replicas[0].request_leave()
    assert net.run(400, until=lambda: all(m.voters == {1, 2} for m in net.memberships().values()))
    assert net.leader() in (1, 2)
    assert net.replicas[0].role == "none" and not net.replicas[0].is_leader
    # The two left still order requests.
    net.submit(Change(ADD_LEARNER, 0, net.replicas[1].membership.index))
    assert net.run(100, until=lambda: net.replicas[1].membership.learners == {0})


def test_a_stale_change_is_refused_at_execution():
    net = Net(5, voters=[0, 1, 2], up=[0, 1, 2])
    assert net.run(200, until=lambda: net.leader() == 0)
    net.submit(Change(ADD_LEARNER, 3, 0), seq=1)
    net.submit(Change(ADD_LEARNER, 4, 0), seq=2)   # made for the same membership: stale now
    assert net.run(100, until=lambda: all(m.index == 1 for m in net.memberships().values()))
    net.run(50)
    assert all(m.learners == {3} for m in net.memberships().values())
    assert any(b"stale change" in reply for _, reply in net.replies)
