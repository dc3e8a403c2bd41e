"""smrd.gateway.driver around replicas that cannot execute, and divergence notices.

A replica that orders a request it was sent alone but cannot execute it answers NOT_EXECUTING at
once: the gateway then asks every replica, for that request and for new ones, until a status
answer says the replica executes again. A majority reply tells the minority to rebuild.

A real Gateway (its ZeroMQ sockets connect to nothing) on a real event loop; what it sends is
recorded instead of going out, and replica frames are fed to it as they arrive on the wire."""
import asyncio
import json

import pytest

from smrd import core
from smrd.config.settings import load_config
from smrd.gateway.driver import Gateway
from smrd.protocol import messages as m
from smrd.protocol.sessions import NOT_EXECUTING


@pytest.fixture
def gateway(tmp_path):
    hosts = tmp_path / "hosts.conf"
    hosts.write_text("".join(f"replica {i} 127.0.0.1 {23000 + 10 * i} {23001 + 10 * i}\n" for i in range(3))
                     + "gateway 0 127.0.0.1 23900\n")
    config = load_config({"role": "client", "hosts": str(hosts)}, env={})
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    gw = Gateway(config)
    gw.loop = loop
    gw.sent = []

    def send(sock, frames):
        replica = gw.sock_replica[sock]
        for frame in frames:
            if frame[3] == m.STATUS_REQUEST:
                continue
            gw.sent.append((replica, m.decode(frame)[1]))

    gw.channels.send = send
    yield gw
    gw.channels.close()
    loop.close()
    asyncio.set_event_loop(None)


def status(gw, replica, **fields):
    body = dict(view=0, leader=0, status="normal", membership={"index": 0, "voters": [0, 1, 2],
                                                                "learners": []}, **fields)
    frame = core.encode_frame(m.STATUS_REPLY, replica, 0, 0, json.dumps(body).encode())
    gw._on_message(gw.replica_socks[replica], [frame])


def reply_errors(gw, replica, entries):
    frame = m.encode(replica, m.ReplyErrors(core.pack_batch(entries)))
    gw._on_message(gw.replica_socks[replica], [frame])


def replies(gw, replica, entries):
    frame = m.encode(replica, m.Replies(core.pack_batch(entries)))
    gw._on_message(gw.replica_socks[replica], [frame])


def flush(gw):
    gw.loop.run_until_complete(asyncio.sleep(0))  # the batch scheduled by try_submit goes out
    out, gw.sent = gw.sent, []
    return out


def test_a_leader_that_cannot_execute_is_routed_around_at_once(gateway):
    gw = gateway
    for r in range(3):
        status(gw, r)
    assert gw.leader == 0
    call = gw.try_submit(b"PUT a 1")
    sent = flush(gw)
    assert [(r, msg.directed) for r, msg in sent] == [(0, True)]  # the leader alone

    refusal = bytes([NOT_EXECUTING]) + b"cannot execute now"
    reply_errors(gw, 0, [(call.key[0], call.key[1], refusal)])
    assert not call.done(), "NOT_EXECUTING is not an answer for the client"
    assert sorted(r for r, msg in gw.sent if not msg.directed) == [0, 1, 2]  # asked again, all
    gw.sent = []

    later = gw.try_submit(b"PUT b 1")
    assert sorted(r for r, msg in flush(gw)) == [0, 1, 2], "new requests go to everyone now"
    replies(gw, 1, [(later.key[0], later.key[1], b"OK")])
    assert later.result() == b"OK"

    status(gw, 0, can_execute=True)  # it executes again
    gw.try_submit(b"PUT c 1")
    assert [(r, msg.directed) for r, msg in flush(gw)] == [(0, True)]


def test_a_status_answer_that_says_cannot_execute_is_enough(gateway):
    gw = gateway
    for r in range(3):
        status(gw, r)
    status(gw, 0, can_execute=False, execution_reason="rebuilding")
    assert gw.not_executing == {0}
    gw.try_submit(b"PUT a 1")
    assert sorted(r for r, msg in flush(gw)) == [0, 1, 2]


def test_readiness_needs_a_replica_that_can_execute(gateway):
    gw = gateway
    gw.server = object()  # listening
    for r in range(3):
        status(gw, r)
    assert gw.ready() == (True, "ready")
    for r in range(3):
        status(gw, r, can_execute=False)
    ready, why = gw.ready()
    assert not ready and "no reachable replica can execute" in why
    status(gw, 2, can_execute=True)
    assert gw.ready()[0]


def test_the_minority_is_told_once_and_the_majority_never(gateway):
    gw = gateway
    gw.reply_quorum = 3  # wait for all three, as a divergence check does
    for r in range(3):
        status(gw, r)
    call = gw.try_submit(b"GET a")
    flush(gw)
    key = call.key
    replies(gw, 0, [(key[0], key[1], b"VALUE 1")])
    replies(gw, 1, [(key[0], key[1], b"NOT_FOUND")])
    assert gw.sent == [], "one against one: no majority yet"
    replies(gw, 2, [(key[0], key[1], b"VALUE 1")])
    told = [(r, msg) for r, msg in gw.sent if type(msg) is m.Diverged]
    assert [r for r, _ in told] == [1]
    (cid, seq, data), = core.Batch(told[0][1].batch)
    assert (cid, seq) == key and bytes(data[:16]) == m.reply_digest(b"VALUE 1") and data[16] == 2
    gw.sent = []
    replies(gw, 1, [(key[0], key[1], b"NOT_FOUND")])  # a late duplicate answer
    assert not [msg for _, msg in gw.sent if type(msg) is m.Diverged]
