# Fixtures for end-to-end tests: real smrd processes and real hashmap apps on 127.0.0.1.
import socket

import pytest

from smrd.local import LocalCluster


def free_base_port(span=1000):
    """A base port whose whole range (replicas, apps, gateways) is free right now."""
    for base in range(20000, 60000, span):
        socks = []
        try:
            for port in (base, base + 1, base + 2, base + 10, base + 11, base + 12, base + 20,
                         base + 21, base + 22, base + 900, base + 901):
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
        kw.setdefault("base_port", free_base_port())
        kw.setdefault("data_dir", tmp_path / f"cluster{len(clusters)}")
        cluster = LocalCluster(**kw)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
