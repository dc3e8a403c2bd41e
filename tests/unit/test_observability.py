"""smrd.ops.observability: every series from a fake snapshot, the histograms, and the HTTP endpoints
over a real socket (port 0), including what a hostile or careless HTTP client sends.

No driver is involved: the snapshot is a plain dict the test changes between scrapes, and ready()
returns whatever the test sets. The only clock is the server's short request time-out under test.
"""
import asyncio
import logging
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from smrd import __version__
from smrd.ops.observability import (BATCH_BUCKETS, GATEWAY_SERIES, LATENCY_BUCKETS, MAX_LINE,
                                SERVER_SERIES, Histogram, Observability)

HOST = "127.0.0.1"


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def server_snapshot(**over):
    snap = {
        "requests_received": 100, "requests_executed": 90, "requests_deduplicated": 7,
        "requests_dropped": 1, "requests_forwarded": 3, "requests_relayed": 2, "bad_messages": 2, "stale_messages": 4,
        "view_changes": 5, "catchup_requests": 6, "app_errors": 8, "app_timeouts": 9,
        "app_reconnects": 10, "app_retries": 11, "app_ready": True, "halted": None,
        "view": 12, "leader": 0, "status": "normal", "commit": 13, "known_commit": 14,
        "executed": 15, "pending": 16, "log_bytes": 4096, "log_records": 17,
        "wal_bytes_written": 2048, "wal_records_written": 18, "wal_syncs": 19, "n": 3, "app_restarts": 0, "connections_refused": 0,
        "can_execute": True, "app_resets": 2, "execution_halts": 1, "divergences_reported": 0,
        # state_transfer_* left out on purpose: optional until state transfer exists
        # keys the collector does not know are ignored (Server.status() has several)
        "pid": 1234, "uptime_s": 1.5, "top": 20,
    }
    snap.update(over)
    return snap


def gateway_snapshot(**over):
    snap = {"requests": 50, "replies": 45, "retransmits": 3, "timeouts": 2, "errors": 1,
            "divergences": 1, "connections": 4, "inflight": 5, "bad_messages": 6,
            "replicas_reachable": 2, "replicas_not_executing": 1, "n": 3}
    snap.update(over)
    return snap


class Fake:
    """A driver stand-in: a snapshot dict and a readiness answer the test can change."""

    def __init__(self, snap, ready=(True, "")):
        self.snap = snap
        self.ready_answer = ready

    def snapshot(self):
        return self.snap

    def ready(self):
        return self.ready_answer


def make(role="server", node_id=0, snap=None, ready=(True, ""), **kw):
    fake = Fake(snap if snap is not None else
                (server_snapshot() if role == "server" else gateway_snapshot()), ready)
    return Observability(role, node_id, fake.snapshot, fake.ready, **kw), fake


def scrape(obs):
    text = obs.render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, family, sample=None, **labels):
    """The one sample named `sample` (default: the family's own name, or name_total for a
    counter) in `family` whose labels include `labels`."""
    fam = fams[family]
    if sample is None:
        sample = family + "_total" if fam.type == "counter" else family
    found = [s.value for s in fam.samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, fam.samples)
    return found[0]


# ---------------------------------------------------------------------------- series


def test_every_server_series_has_its_type_labels_and_value():
    obs, fake = make("server", node_id=0)
    fams = scrape(obs)
    for s in SERVER_SERIES:
        fam = fams[s.name]
        assert fam.type == s.kind, s.name
        assert s.name.startswith("smrd_")
        assert len(fam.samples) == 1
        assert fam.samples[0].labels == {"role": "server", "replica": "0"}
        assert value(fams, s.name) == s.convert(fake.snap.get(s.key)), s.name
    # spot checks of the conversions and names a dashboard relies on
    assert value(fams, "smrd_requests_received") == 100
    assert "smrd_requests_received_total" in obs.render().decode()
    assert value(fams, "smrd_app_up") == 1.0
    assert value(fams, "smrd_execution_halted") == 0.0
    assert value(fams, "smrd_log_bytes") == 4096
    assert value(fams, "smrd_state_transfer_bytes") == 0
    assert value(fams, "smrd_state_transfer_size_bytes") == 0
    assert value(fams, "smrd_state_transfer_progress_ratio") == 0
    assert value(fams, "smrd_is_leader") == 1.0
    assert value(fams, "smrd_replica_status", status="normal") == 1.0
    assert value(fams, "smrd_replica_status", status="view-change") == 0.0
    assert value(fams, "smrd_ready") == 1.0
    assert value(fams, "smrd_build_info", version=__version__) == 1.0
    # nothing of the gateway's
    assert "smrd_request_latency_seconds" not in fams
    assert "smrd_divergences" not in fams


def test_every_gateway_series_has_its_type_labels_and_value():
    obs, fake = make("client", node_id=2)
    fams = scrape(obs)
    for s in GATEWAY_SERIES:
        fam = fams[s.name]
        assert fam.type == s.kind, s.name
        assert fam.samples[0].labels == {"role": "client", "gateway": "2"}
        assert value(fams, s.name) == fake.snap[s.key], s.name
    assert value(fams, "smrd_divergences") == 1
    assert value(fams, "smrd_requests_retransmitted") == 3
    assert fams["smrd_request_latency_seconds"].type == "histogram"
    for server_only in ("smrd_batch_requests", "smrd_consensus_latency_seconds",
                        "smrd_replica_status", "smrd_view", "smrd_is_leader"):
        assert server_only not in fams


def test_process_figures_come_from_psutil():
    obs, _ = make("client")
    fams = scrape(obs)
    assert fams["smrd_process_cpu_seconds"].type == "counter"
    assert value(fams, "smrd_process_cpu_seconds", mode="user") > 0
    assert value(fams, "smrd_process_cpu_seconds", mode="system") >= 0
    assert value(fams, "smrd_process_resident_memory_bytes") > 1 << 20
    assert value(fams, "smrd_process_threads") >= 1
    assert value(fams, "smrd_process_open_fds") >= 3
    assert value(fams, "smrd_process_start_time_seconds") > 1.6e9
    # the same psutil.Process object serves every scrape
    process = obs._process
    scrape(obs)
    assert obs._process is process


def test_values_move_when_the_snapshot_changes():
    obs, fake = make("server", node_id=1)
    fams = scrape(obs)
    assert value(fams, "smrd_is_leader") == 0.0  # leader is 0
    fake.snap.update(requests_received=250, view=13, leader=1, commit=40, app_ready=False,
                     halted="app failed mid-request: reset", state_transfer_bytes=250,
                     state_transfer_size=1000)
    fams = scrape(obs)
    assert value(fams, "smrd_requests_received") == 250
    assert value(fams, "smrd_view") == 13
    assert value(fams, "smrd_leader_id") == 1
    assert value(fams, "smrd_is_leader") == 1.0
    assert value(fams, "smrd_commit_instance") == 40
    assert value(fams, "smrd_app_up") == 0.0
    assert value(fams, "smrd_execution_halted") == 1.0
    assert value(fams, "smrd_state_transfer_bytes") == 250
    assert value(fams, "smrd_state_transfer_progress_ratio") == 0.25
    fake.snap.update(status="view-change")
    fams = scrape(obs)
    assert value(fams, "smrd_replica_status", status="normal") == 0.0
    assert value(fams, "smrd_replica_status", status="view-change") == 1.0
    assert value(fams, "smrd_is_leader") == 0.0  # a leader-to-be is not a leader yet
    fake.ready_answer = (False, "view change in progress")
    assert value(scrape(obs), "smrd_ready") == 0.0


def test_an_unknown_status_gets_its_own_label():
    obs, _ = make("server", snap=server_snapshot(status="recovering"))
    fams = scrape(obs)
    assert value(fams, "smrd_replica_status", status="recovering") == 1.0
    assert value(fams, "smrd_replica_status", status="normal") == 0.0


def test_missing_keys_are_zero_and_warned_about_once(caplog):
    snap = server_snapshot()
    del snap["requests_executed"], snap["known_commit"]
    obs, _ = make("server", snap=snap)
    with caplog.at_level(logging.WARNING, logger="smrd.ops.observability"):
        fams = scrape(obs)
        scrape(obs)
    assert value(fams, "smrd_requests_executed") == 0
    assert value(fams, "smrd_known_commit_instance") == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["metrics snapshot lacks known_commit, requests_executed; exported as 0"]


def test_optional_keys_are_not_warned_about(caplog):
    obs, _ = make("server")
    with caplog.at_level(logging.WARNING, logger="smrd.ops.observability"):
        scrape(obs)
    assert caplog.records == []


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role"):
        Observability("gateway", 0, dict, lambda: (True, ""))


# ---------------------------------------------------------------------------- histograms


def test_histograms_count_observations_in_le_buckets():
    obs, _ = make("server")
    for size in (1, 1, 3, 4, 100, 5000):      # 4 falls into le=4, 5000 only into +Inf
        obs.observe_batch(size)
    obs.observe_consensus_latency(0.001)
    obs.observe_consensus_latency(0.02)
    obs.observe_request_latency(1.0)           # not a server's: ignored
    fams = scrape(obs)
    h = "smrd_batch_requests"
    assert fams[h].type == "histogram"
    assert value(fams, h, h + "_count") == 6
    assert value(fams, h, h + "_sum") == 5109
    assert value(fams, h, h + "_bucket", le="1.0") == 2
    assert value(fams, h, h + "_bucket", le="2.0") == 2
    assert value(fams, h, h + "_bucket", le="4.0") == 4
    assert value(fams, h, h + "_bucket", le="128.0") == 5
    assert value(fams, h, h + "_bucket", le="4096.0") == 5
    assert value(fams, h, h + "_bucket", le="+Inf") == 6
    assert len([s for s in fams[h].samples if s.name == h + "_bucket"]) == len(BATCH_BUCKETS) + 1
    c = "smrd_consensus_latency_seconds"
    assert value(fams, c, c + "_count") == 2
    assert value(fams, c, c + "_bucket", le="0.001") == 1
    assert value(fams, c, c + "_bucket", le="0.025") == 2
    assert value(fams, c, c + "_sum") == pytest.approx(0.021)


def test_gateway_request_latency_histogram():
    obs, _ = make("client")
    for _ in range(10):
        obs.observe_request_latency(0.003)
    obs.observe_batch(5)  # not a gateway's: ignored
    fams = scrape(obs)
    r = "smrd_request_latency_seconds"
    assert value(fams, r, r + "_count") == 10
    assert value(fams, r, r + "_bucket", le="0.0025") == 0
    assert value(fams, r, r + "_bucket", le="0.005") == 10
    assert len([s for s in fams[r].samples if s.name == r + "_bucket"]) == len(LATENCY_BUCKETS) + 1


def test_histogram_matches_a_plain_count():
    # The bisect fast path against the definition: bucket(le=b) = #{v : v <= b}.
    import random
    rnd = random.Random(7)
    h = Histogram("x", "x", LATENCY_BUCKETS)
    values = [rnd.choice([rnd.random() * 40, rnd.choice(LATENCY_BUCKETS)]) for _ in range(2000)]
    for v in values:
        h.observe(v)
    fam = h.family(["role"], ["server"])
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name == "x_bucket"}
    for b in LATENCY_BUCKETS:
        assert buckets[repr(float(b))] == sum(v <= b for v in values), b
    assert buckets["+Inf"] == len(values)


# ---------------------------------------------------------------------------- registries


def test_prometheus_client_is_imported_at_the_first_scrape_not_at_start():
    # A fifth of an smrd process's import time; start-up to full speed is one of the targets.
    code = ("import sys, smrd.replica.driver, smrd.gateway.driver, smrd.ops.cli\n"
            "from smrd.ops.observability import Observability\n"
            "obs = Observability('server', 0, lambda: {}, lambda: (True, 'ready'))\n"
            "assert 'prometheus_client' not in sys.modules, 'imported before a scrape'\n"
            "assert b'smrd_ready' in obs.render()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_two_instances_in_one_process_do_not_clash():
    a, fa = make("server", node_id=0)
    b, fb = make("server", node_id=1, snap=server_snapshot(requests_received=7))
    a.observe_batch(3)
    fa_, fb_ = scrape(a), scrape(b)
    assert value(fa_, "smrd_requests_received", replica="0") == 100
    assert value(fb_, "smrd_requests_received", replica="1") == 7
    assert value(fa_, "smrd_batch_requests", "smrd_batch_requests_count") == 1
    assert value(fb_, "smrd_batch_requests", "smrd_batch_requests_count") == 0
    assert a.registry is not b.registry
    assert b"smrd_" not in generate_latest(REGISTRY)  # the global registry is left alone

    async def both():
        pa = await a.start(HOST, 0)
        pb = await b.start(HOST, 0)
        try:
            assert pa != pb
            _, _, body_a = await request(pa, b"GET /metrics HTTP/1.1\r\n\r\n")
            _, _, body_b = await request(pb, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert b'replica="0"' in body_a and b'replica="1"' not in body_a
            assert b'replica="1"' in body_b and b'replica="0"' not in body_b
        finally:
            await a.stop()
            await b.stop()
    run(both())


# ---------------------------------------------------------------------------- HTTP


async def read_response(reader, head_only=False):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, val = line.partition(":")
            headers[name.lower()] = val.strip()
    body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return int(status), headers, body


async def request(port, raw, head_only=False):
    """One request on a fresh connection: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        return await read_response(reader, head_only)
    finally:
        writer.close()


async def closed_by_server(reader, timeout=2):
    return await asyncio.wait_for(reader.read(), timeout) == b""


def serve(test, role="server", ready=(True, ""), **kw):
    """Run `test(port, obs, fake)` against a started instance, then stop it."""
    obs, fake = make(role, ready=ready, **kw)

    async def go():
        port = await obs.start(HOST, 0)
        assert port == obs.port and port > 0
        try:
            await test(port, obs, fake)
        finally:
            await obs.stop()
    run(go())


def test_healthz_and_readyz():
    async def test(port, obs, fake):
        status, headers, body = await request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"ok\n")
        assert headers["content-type"].startswith("text/plain")
        status, _, body = await request(port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"ready\n")
        fake.ready_answer = (False, "app at 127.0.0.1:7000 is not answering\n(connection refused)")
        status, _, body = await request(port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert status == 503
        assert body == b"not ready: app at 127.0.0.1:7000 is not answering (connection refused)\n"
        # /healthz does not follow readiness: the process is alive, just not ready
        status, _, _ = await request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status == 200
    serve(test)


def test_readyz_when_the_callback_fails():
    def broken():
        raise RuntimeError("driver bug")

    async def test(port, obs, fake):
        obs._ready = broken
        status, _, body = await request(port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert status == 503
        assert b"readiness check failed" in body and b"driver bug" in body
        assert value(scrape(obs), "smrd_ready") == 0.0
    serve(test)


def test_metrics_over_a_socket():
    async def test(port, obs, fake):
        obs.observe_batch(8)
        status, headers, body = await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200
        from prometheus_client import CONTENT_TYPE_LATEST
        assert headers["content-type"] == CONTENT_TYPE_LATEST
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert value(fams, "smrd_requests_executed") == 90
        assert value(fams, "smrd_batch_requests", "smrd_batch_requests_count") == 1
        # a query string is ignored, HEAD gets the headers only
        status, _, _ = await request(port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == 200
        status, headers, _ = await request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n", head_only=True)
        assert status == 200 and int(headers["content-length"]) > 1000
    serve(test)


def test_metrics_failure_is_a_500_not_a_dead_loop():
    async def test(port, obs, fake):
        fake.snap = None  # snapshot() now returns None: a driver bug
        status, _, body = await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 500 and b"collecting metrics failed" in body
        status, _, _ = await request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status == 200
    serve(test)


def test_keep_alive_and_connection_close():
    async def test(port, obs, fake):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n")
        s1, h1, b1 = await read_response(reader)
        s2, h2, b2 = await read_response(reader)
        assert (s1, b1, s2, b2) == (200, b"ok\n", 200, b"ready\n")
        assert h1["connection"] == "keep-alive"
        writer.write(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        s3, h3, _ = await read_response(reader)
        assert s3 == 200 and h3["connection"] == "close"
        assert await closed_by_server(reader)
        writer.close()
        # HTTP/1.0 closes unless asked otherwise
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert await closed_by_server(reader)
        writer.close()
    serve(test)


def test_404_and_405():
    async def test(port, obs, fake):
        status, _, body = await request(port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert status == 404 and b"/metrics" in body
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(method + b" /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            status, headers, _ = await read_response(reader)
            assert status == 405 and headers["allow"] == "GET, HEAD"
            assert await closed_by_server(reader)  # the body is not read: the connection ends
            writer.close()
    serve(test)


@pytest.mark.parametrize("garbage", [
    b"hello\r\n\r\n",
    b"GET /metrics\r\n\r\n",
    b"GET /metrics HTTP/2.0\r\n\r\n",
    b"GET metrics HTTP/1.1\r\n\r\n",
    b"G\xffT /metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
    b"GET /" + b"a" * (MAX_LINE + 10) + b" HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 40,  # a TLS hello and more
])
def test_garbage_gets_400_and_close(garbage):
    async def test(port, obs, fake):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(garbage)
        status, headers, body = await read_response(reader)
        assert status == 400 and body.startswith(b"bad request: ")
        assert headers["connection"] == "close"
        assert await closed_by_server(reader)
        writer.close()
        # and the server is still fine
        status, _, _ = await request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status == 200
    serve(test)


def test_slow_and_idle_clients_are_cut_off():
    async def test(port, obs, fake):
        # a client that sends half a request and stalls
        slow_r, slow_w = await asyncio.open_connection(HOST, port)
        slow_w.write(b"GET /metr")
        # an idle keep-alive connection
        idle_r, idle_w = await asyncio.open_connection(HOST, port)
        idle_w.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await read_response(idle_r))[0] == 200
        # meanwhile others are served
        assert (await request(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        t0 = asyncio.get_running_loop().time()
        assert await closed_by_server(slow_r)
        assert await closed_by_server(idle_r)
        assert asyncio.get_running_loop().time() - t0 < 1.5
        slow_w.close()
        idle_w.close()
    serve(test, request_timeout_s=0.3)


def test_stop_drops_open_connections_and_frees_the_port():
    obs, _ = make("client")

    async def go():
        port = await obs.start(HOST, 0)
        with pytest.raises(RuntimeError):
            await obs.start(HOST, 0)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        await obs.stop()
        await obs.stop()  # twice is fine
        assert await reader.read() == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        # and it can listen again
        await obs.start(HOST, port)
        assert (await request(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        await obs.stop()
    run(go())


def test_connections_beyond_the_limit_are_refused():
    from smrd.ops.observability import MAX_CONNECTIONS

    async def test(port, obs, fake):
        held = []
        for _ in range(MAX_CONNECTIONS):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (await read_response(reader))[0] == 200  # now its handler is counted
            held.append(writer)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        try:
            assert await closed_by_server(reader)
        except ConnectionResetError:
            pass  # aborted: as good as closed
        writer.close()
        held.pop().close()
        await asyncio.sleep(0.05)  # let the server notice the close
        assert (await request(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        for w in held:
            w.close()
    serve(test)
