# Which checkpoint a state transfer fetches (smrd.replica.state_transfer.StateTransfer._choose):
# f+1 peers agreeing, or, when fewer than f+1 hold any new enough one for LONE_AFTER queries in
# a row and none contradicts another, the newest one those few hold. Real StateInfo messages go
# through on_message; only the peers are scripted.
import asyncio

from smrd.protocol import messages as m
from smrd.replica import state_transfer
from smrd.replica.state_transfer import LONE_AFTER, StateTransfer

A, B = b"a" * 32, b"b" * 32


def _transfer(reports):
    """A transfer whose peers answer every StateQuery with reports[peer]."""
    def send(peer, msg):
        assert type(msg) is m.StateQuery
        asyncio.get_running_loop().call_soon(
            st.on_message, peer, m.StateInfo(msg.nonce, tuple(reports[peer])))
    st = StateTransfer(0, sorted(reports), 2, None, send, 1e9, None, None)
    st.task = object()  # as while _run runs
    return st


def _choices(reports, queries, monkeypatch):
    monkeypatch.setattr(state_transfer, "QUERY_WAIT_S", 0.5)

    async def run():
        st = _transfer(reports)
        return [await st._choose(100) for _ in range(queries)]
    return asyncio.run(run())


def test_f_plus_one_agreeing_peers_are_chosen_at_once(monkeypatch):
    reports = {1: [(150, 10, A), (120, 9, B)], 2: [(150, 10, A)]}
    assert _choices(reports, 1, monkeypatch) == [(150, A, [1, 2])]


def test_one_holder_nobody_contradicts_is_taken_after_lone_after_queries(monkeypatch):
    # Replica 2 is behind too (its newest checkpoint is older than what we need).
    reports = {1: [(150, 10, A), (140, 9, B)], 2: [(50, 3, B)]}
    choices = _choices(reports, LONE_AFTER, monkeypatch)
    assert choices[:-1] == [None] * (LONE_AFTER - 1)
    assert choices[-1] == (150, A, [1])


def test_peers_that_disagree_on_an_instance_are_never_trusted_alone(monkeypatch):
    # Snapshots that are not deterministic: the two peers hold instance 150 with other bytes.
    reports = {1: [(150, 10, A)], 2: [(150, 10, B)]}
    assert _choices(reports, LONE_AFTER + 2, monkeypatch) == [None] * (LONE_AFTER + 2)


def test_no_peer_with_a_new_enough_checkpoint_means_waiting(monkeypatch):
    reports = {1: [(50, 3, A)], 2: [(60, 3, B)]}
    assert _choices(reports, LONE_AFTER + 1, monkeypatch) == [None] * (LONE_AFTER + 1)
