# `smrd admin` against a fake replica group: ZeroMQ ROUTERs on 127.0.0.1 that answer status
# queries and apply membership changes with the real rules (smrd.protocol.membership), the way
# a leader would. What is checked here is the tool: the procedures (learner, caught up, promote;
# remove and wait), idempotence, retrying with a fresh base, refusals and unreachable clusters as
# one line and the right exit status. The real thing is tests/e2e/test_membership.py.
import json
import logging
import os
import socket
import sys
import threading
import types

import pytest
import zmq

from smrd import core
from smrd.ops import cli
from smrd.protocol import messages as m
from smrd.protocol.membership import SYSTEM_CLIENT, Change, Membership


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class FakeGroup:
    """n candidates; `up` answer. Replica 0 plays the leader: it applies changes (or refuses them
    with `refuse(change)`'s reason); `drop` submissions are swallowed (a timeout for the tool)."""

    def __init__(self, tmp_path, n=5, voters=(0, 1, 2), up=(0, 1, 2)):
        self.membership = Membership.bootstrap(voters)
        self.commit = {r: 500 for r in range(n)}
        self.refuse = lambda change: None
        self.drop = 0
        self.moved = None          # a change applied behind the tool's back before its first one
        self.submitted = []
        self.status_calls = {}
        self.ctx = zmq.Context()
        self.socks = {}
        ports = {}
        for r in range(n):
            if r in up:
                s = self.ctx.socket(zmq.ROUTER)
                s.setsockopt(zmq.LINGER, 0)
                port = s.bind_to_random_port("tcp://127.0.0.1")
                self.socks[s] = r
            else:
                port = free_port()
            ports[r] = port
        lines = [f"replica {r} 127.0.0.1 {free_port()} {ports[r]}\n" for r in range(n)]
        self.hosts = tmp_path / "hosts.conf"
        self.hosts.write_text("".join(lines))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        for s in self.socks:
            s.close(0)
        self.ctx.term()

    def _run(self):
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        while not self.stopping.is_set():
            for s, _ in poller.poll(50):
                identity, frame = s.recv_multipart()
                self._on(s, self.socks[s], identity, frame)

    def _status(self, r):
        self.status_calls[r] = self.status_calls.get(r, 0) + 1
        cfg = self.membership
        return {"id": r, "status": "normal", "view": 0, "leader": 0, "commit": self.commit[r],
                "executed": self.commit[r], "known_commit": max(self.commit.values()),
                "role": cfg.role(r), "membership": cfg.describe(), "transfer_active": False}

    def _on(self, sock, r, identity, frame):
        if frame[3] == m.STATUS_REQUEST:
            body = json.dumps(self._status(r)).encode()
            sock.send_multipart([identity, core.encode_frame(m.STATUS_REPLY, r, 0, 0, body)])
            return
        _, msg = m.decode(frame)
        for client_id, seq, payload in core.Batch(msg.batch):
            assert client_id == SYSTEM_CLIENT
            if r != 0:
                continue  # followers pass it to the leader
            change = Change.decode(payload)
            self.submitted.append(change)
            if self.moved is not None:
                self.membership, self.moved = self.membership.check(self.moved, 5)[0], None
            if self.drop:
                self.drop -= 1
                continue
            why = self.refuse(change)
            new = None
            if why is None:
                new, why = self.membership.check(change, len(self.commit))
            if new is None:
                answer = f"REFUSED {why}".encode()
            else:
                self.membership = new
                answer = (f"OK {change.op} {change.replica}: membership {new.index} voters "
                          f"{sorted(new.voters)} learners {sorted(new.learners)}").encode()
            batch = core.pack_batch([(client_id, seq, answer)])
            sock.send_multipart([identity, m.encode(r, m.Replies(batch))])


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for key in list(os.environ):
        if key.startswith("SMRD_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr("smrd.ops.admin.ATTEMPT_S", 0.5)
    monkeypatch.setattr("smrd.ops.admin.POLL_S", 0.02)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def group(tmp_path):
    groups = []

    def make(**kw):
        g = FakeGroup(tmp_path, **kw)
        groups.append(g)
        return g

    yield make
    for g in groups:
        g.close()


def run(g, *argv):
    return cli.main(["admin", *map(str, argv), "-c", str(g.hosts), "--query-timeout", "0.5"])


def test_members_prints_the_agreed_membership_and_each_replica(group, capsys):
    g = group()
    assert run(g, "members") == 0
    out = capsys.readouterr().out
    assert out.startswith("membership 0: voters [0, 1, 2] learners [] (quorum 2)")
    assert "UNREACHABLE" in out.splitlines()[-1]  # candidate 4 is not running
    assert run(g, "members", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["membership"]["voters"] == [0, 1, 2] and len(doc["replicas"]) == 5


def test_join_adds_a_learner_waits_until_it_caught_up_then_promotes(group, capsys):
    g = group(up=(0, 1, 2, 3))
    g.commit[3] = 10                                   # far behind: not promoted yet
    status = g._status

    def catching_up(r):                                # it catches up after 5 looks as a learner
        if r == 3 and g.membership.role(3) == "learner" and g.status_calls.get(3, 0) >= 5:
            g.commit[3] = 480                          # within the bound (64) of the others' 500
        return status(r)

    g._status = catching_up
    assert run(g, "join", 3, "--timeout", "10") == 0
    out = capsys.readouterr().out
    assert "OK add-learner 3: membership 1" in out
    assert "waiting: replica 3 is catching up (commit 10 of 500" in out
    assert "OK promote 3: membership 2 voters [0, 1, 2, 3]" in out
    assert [c.op for c in g.submitted] == ["add-learner", "promote"]
    # Again: it is a voter already, nothing is submitted.
    assert run(g, "join", 3) == 0
    assert "replica 3 is a voter" in capsys.readouterr().out and len(g.submitted) == 2


def test_join_retries_with_a_fresh_base_when_the_membership_moved(group, capsys):
    g = group(up=(0, 1, 2, 3, 4))
    g.moved = Change("add-learner", 4, 0)              # someone else changed it first
    assert run(g, "join", 3, "--timeout", "10") == 0
    assert [(c.op, c.replica, c.base) for c in g.submitted] == [
        ("add-learner", 3, 0), ("add-learner", 3, 1), ("promote", 3, 2)]
    assert g.membership.voters == {0, 1, 2, 3} and g.membership.learners == {4}


def test_a_lost_submission_is_sent_again(group, capsys):
    g = group()
    g.drop = 1
    assert run(g, "leave", 2, "--timeout", "10") == 0
    assert "OK remove 2" in capsys.readouterr().out
    assert len(g.submitted) == 2 and g.membership.voters == {0, 1}


def test_a_refusal_is_one_line_and_exit_1(group, capsys):
    g = group()
    g.refuse = lambda c: "would lose quorum: after it 2 voters need 2, and only 1 answer (not answering: [2])"
    assert run(g, "leave", 1) == 1
    err = capsys.readouterr().err
    assert err == ("smrd: error: remove 1 refused: would lose quorum: after it 2 voters need 2, and only 1 "
                   "answer (not answering: [2])\n")
    assert g.membership.index == 0


def test_leave_of_a_non_member_is_done_already(group, capsys):
    g = group()
    assert run(g, "leave", 4) == 0
    assert "replica 4 is not a member" in capsys.readouterr().out and not g.submitted


def test_ids_outside_hosts_conf_are_usage_errors(group, capsys):
    g = group()
    assert run(g, "join", 7) == 2
    assert "replica 7 is not in" in capsys.readouterr().err
    assert run(g, "leave") == 2
    assert "which replica?" in capsys.readouterr().err
    assert cli.main(["admin", "join", "x"]) == 2


def test_an_unreachable_cluster_is_exit_1_with_a_clear_message(group, capsys):
    g = group(up=())
    assert run(g, "members") == 1
    err = capsys.readouterr().err
    assert err.startswith("smrd: error: no replica of ") and "answered within 0.5 s" in err
    assert err.count("\n") == 1


def test_leave_self_uses_the_id_setting(group, capsys, monkeypatch):
    g = group()
    monkeypatch.setenv("SMRD_ID", "2")
    assert run(g, "leave", "--self") == 0
    assert "OK remove 2" in capsys.readouterr().out
    monkeypatch.delenv("SMRD_ID")
    assert run(g, "leave", "--self") == 2
    assert "needs this replica's id" in capsys.readouterr().err


def fake_kube(monkeypatch, answer):
    asked = []
    module = types.ModuleType("smrd.ops.kube")
    module.scaled_down = lambda ordinal: asked.append(ordinal) or answer
    monkeypatch.setitem(sys.modules, "smrd.ops.kube", module)
    monkeypatch.setattr("smrd.ops.kube", module, raising=False)
    return asked


def test_if_scaled_down_leaves_only_when_the_statefulset_shrank(group, capsys, monkeypatch):
    g = group()
    monkeypatch.setenv("SMRD_ID", "2")
    asked = fake_kube(monkeypatch, False)
    assert run(g, "leave", "--self", "--if-scaled-down") == 0
    assert asked == [2] and not g.submitted            # a restart: the membership is unchanged
    asked = fake_kube(monkeypatch, True)
    assert run(g, "leave", "--self", "--if-scaled-down") == 0
    assert asked == [2] and "OK remove 2" in capsys.readouterr().out


def test_the_real_kube_module_says_not_scaled_down_outside_kubernetes(group, monkeypatch):
    kube = pytest.importorskip("smrd.ops.kube")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kube.scaled_down(2) is False
    g = group()
    monkeypatch.setenv("SMRD_ID", "2")
    assert run(g, "leave", "--self", "--if-scaled-down") == 0 and not g.submitted
