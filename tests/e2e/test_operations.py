# What an operator sees, from real processes: Prometheus metrics that move under load, /healthz
# and /readyz that flip with the replica's situation and flip back, and `smrd status`.
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from smrd.apps.kvclient import KVClient

SERVER_SERIES = [
    "smrd_requests_received_total", "smrd_requests_executed_total", "smrd_requests_deduplicated_total",
    "smrd_view", "smrd_leader_id", "smrd_commit_instance", "smrd_executed_instance",
    "smrd_log_bytes", "smrd_state_transfer_bytes", "smrd_app_errors_total", "smrd_bad_messages_total",
    "smrd_batch_requests_bucket", "smrd_consensus_latency_seconds_bucket",
    "smrd_process_cpu_seconds_total", "smrd_process_resident_memory_bytes", "smrd_process_open_fds",
    "smrd_process_threads",
]
GATEWAY_SERIES = ["smrd_request_latency_seconds_bucket", "smrd_divergences_total",
                  "smrd_requests_retransmitted_total", "smrd_replicas_reachable"]


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text, name, **labels):
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


def wait_until(what, predicate, timeout=20):
    # Readiness lives in another process: polling its endpoint is the only way to observe it.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_metrics_expose_the_listed_series_and_move_under_load(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line").start()
    leader = cluster.leader()
    _, before = http_get(cluster.metrics_port(leader), "/metrics")
    for name in SERVER_SERIES:
        assert metric(before, name) is not None, f"{name} missing from a replica's /metrics"
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        for i in range(200):
            assert c.request(f"PUT k{i} v") == b"OK"
    _, after = http_get(cluster.metrics_port(leader), "/metrics")
    assert metric(after, "smrd_requests_executed_total") >= metric(before, "smrd_requests_executed_total") + 200
    assert metric(after, "smrd_commit_instance") > metric(before, "smrd_commit_instance")
    assert metric(after, "smrd_consensus_latency_seconds_count") > 0
    assert metric(after, "smrd_log_bytes") > metric(before, "smrd_log_bytes")
    _, gw = http_get(cluster.gateway_metrics_port(0), "/metrics")
    for name in GATEWAY_SERIES:
        assert metric(gw, name) is not None, f"{name} missing from the gateway's /metrics"
    assert metric(gw, "smrd_request_latency_seconds_count") >= 200
    assert http_get(cluster.metrics_port(leader), "/healthz") == (200, "ok\n") or \
        http_get(cluster.metrics_port(leader), "/healthz")[0] == 200


def test_readyz_flips_when_a_replica_is_cut_off_and_flips_back(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line").start()
    cluster.leader()
    port = cluster.metrics_port(0)
    wait_until("replica 0 ready", lambda: http_get(port, "/readyz")[0] == 200)
    wait_until("gateway ready", lambda: http_get(cluster.gateway_metrics_port(0), "/readyz")[0] == 200)
    for i in (1, 2):
        cluster.servers[i].signal(signal.SIGSTOP)
    try:
        status, body = wait_until("replica 0 not ready", lambda: (lambda r: r if r[0] == 503 else None)(http_get(port, "/readyz")))
        assert "view change" in body or "quorum" in body
        assert http_get(port, "/healthz")[0] == 200, "the process itself is fine"
        wait_until("gateway not ready", lambda: http_get(cluster.gateway_metrics_port(0), "/readyz")[0] == 503)
    finally:
        for i in (1, 2):
            cluster.servers[i].signal(signal.SIGCONT)
    wait_until("replica 0 ready again", lambda: http_get(port, "/readyz")[0] == 200)
    wait_until("gateway ready again", lambda: http_get(cluster.gateway_metrics_port(0), "/readyz")[0] == 200)


def test_readyz_is_503_while_the_app_is_down_and_200_once_it_answers(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line")
    for i in (0, 1):
        cluster.start_replica(i)
    cluster.start_server(2)                      # replica 2's app is not there yet
    cluster.start_gateway(0)
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line") as c:
        assert c.request("PUT a 1") == b"OK"     # a quorum with working apps answers
    port = cluster.metrics_port(2)
    status, body = wait_until("replica 2 not ready", lambda: (lambda r: r if r[0] == 503 else None)(http_get(port, "/readyz")))
    assert "app" in body and "not answering" in body
    cluster.start_app(2)                         # the app comes up (empty, as it must)
    wait_until("replica 2 ready", lambda: http_get(port, "/readyz")[0] == 200)
    with KVClient("127.0.0.1", cluster.app_port(2), "line") as app:
        assert app.request("GET a") == b"VALUE 1", "the backlog was executed on the app"


def test_smrd_status_shows_a_killed_replica_as_unreachable(make_cluster):
    cluster = make_cluster(replicas=3, gateways=1, framing="line").start()
    cluster.leader()
    ok = subprocess.run([sys.executable, "-m", "smrd", "status", "-c", str(cluster.hosts_path)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "leader" in ok.stdout and "follower" in ok.stdout
    cluster.kill_replica(1)
    out = subprocess.run([sys.executable, "-m", "smrd", "status", "-c", str(cluster.hosts_path), "--timeout", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    row = next(line for line in out.stdout.splitlines() if line.startswith("1 "))
    assert "UNREACHABLE" in row
    assert "replica 1" in out.stderr and "no answer" in out.stderr
