# Fixtures for end-to-end tests: real smrd processes and real hashmap apps on 127.0.0.1.
import socket

import pytest

from smrd.ops.local import LocalCluster


def ephemeral_ports():
    """The kernel's range of ports for outgoing connections. A listening port inside it can be
    taken by any process's outgoing connection between our check and the app's bind, and a
    process retrying a connection to a port nobody listens on yet can even connect to itself
    (TCP simultaneous open, when the kernel picks that very port as the source)."""
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_base_port(replicas=3, gateways=2, span=1000):
    """A base port whose ports (LocalCluster's layout) for `replicas` replicas and `gateways`
    gateways are all free right now, outside the ephemeral range where there is room."""
    ephemeral = ephemeral_ports()
    bases = list(range(10000, 65000 - span, span))
    bases.sort(key=lambda b: b in ephemeral or b + span - 1 in ephemeral)  # those outside first
    for base in bases:
        ports = [base + 10 * i + k for i in range(replicas) for k in range(4)]
        ports += [base + 900 + g for g in range(gateways)] + [base + 950 + g for g in range(gateways)]
        socks = []
        try:
            for port in ports:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.fixture
def make_cluster(tmp_path):
    clusters = []

    def make(**kw):
        kw.setdefault("base_port", free_base_port(kw.get("replicas", 3), max(2, kw.get("gateways", 1))))
        kw.setdefault("data_dir", tmp_path / f"cluster{len(clusters)}")
        cluster = LocalCluster(**kw)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
