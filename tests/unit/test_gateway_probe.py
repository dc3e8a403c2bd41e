"""How often a gateway asks the replicas for their status (smrd.gateway.driver, FAST_PROBES_S).

While no leader is known every new request goes to every replica, so the gateway asks often
until one is named; but only for FAST_PROBES_S after start-up or after losing the leader,
because a DEALER queues what it sends to a replica that is down.

The methods under test run on a stand-in holding only what they read (a real event loop and
the probe state), since a whole Gateway needs sockets and replicas."""
import asyncio
from types import SimpleNamespace

import pytest

from smrd.gateway.driver import FAST_PROBES_S, PROBE_NO_LEADER_S, PROBE_S, Gateway


@pytest.fixture
def gateway():
    loop = asyncio.new_event_loop()
    probes = []
    gw = SimpleNamespace(loop=loop, stopping=asyncio.Event(), book=SimpleNamespace(leader=None),
                         probe_timer=None, fast_probes_until=loop.time() + FAST_PROBES_S,
                         _probe_once=lambda: probes.append(loop.time()))
    gw._probe = lambda: Gateway._probe(gw)
    gw._leader_lost = lambda: Gateway._leader_lost(gw)
    gw.probes = probes
    yield gw
    loop.close()


def _next_probe_in(gw):
    return gw.probe_timer.when() - gw.loop.time()


def test_without_a_leader_it_probes_often_then_every_second(gateway):
    gateway._probe()
    assert len(gateway.probes) == 1
    assert _next_probe_in(gateway) == pytest.approx(PROBE_NO_LEADER_S, abs=0.05)
    assert PROBE_NO_LEADER_S < PROBE_S

    gateway.book.leader = 0  # a status answer named one
    gateway._probe()
    assert _next_probe_in(gateway) == pytest.approx(PROBE_S, abs=0.05)

    # Nobody named a leader for FAST_PROBES_S (the cluster is down): back to once a second, so
    # that a replica coming back does not find a long queue of status requests.
    gateway.book.leader = None
    gateway.fast_probes_until = gateway.loop.time() - 0.001
    gateway._probe()
    assert _next_probe_in(gateway) == pytest.approx(PROBE_S, abs=0.05)


def test_losing_the_leader_probes_at_once_and_often_again(gateway):
    gateway.book.leader = 0
    gateway._probe()
    slow = gateway.probe_timer
    gateway.fast_probes_until = gateway.loop.time() - 0.001

    gateway.book.leader = None  # the call book forgot it, then told the driver
    gateway._leader_lost()
    assert slow.cancelled()  # not two probe chains
    gateway.loop.run_until_complete(asyncio.sleep(0))  # the probe scheduled "at once" runs
    assert len(gateway.probes) == 2
    assert _next_probe_in(gateway) == pytest.approx(PROBE_NO_LEADER_S, abs=0.05)


def test_a_stopping_gateway_stops_probing(gateway):
    gateway.stopping.set()
    gateway._probe()
    assert gateway.probes == [] and gateway.probe_timer is None
