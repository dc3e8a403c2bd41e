# The floor under single-client latency on this machine: what one message between two processes
# costs when the receiver sleeps until it arrives, measured with the cheapest code there is (two
# Python processes, blocking calls, no event loop), over plain TCP and over ZeroMQ (DEALER to
# ROUTER, as smrd's processes talk), and what that makes of smrd's critical path.
#
#   python -m bench.hop_floor [--out DIR] [--round-trips 5000]
#
# One client request through smrd crosses at least these one-way hops, each waking a process:
# client -TCP-> gateway -zmq-> leader -zmq-> follower -zmq-> leader -TCP-> app -TCP-> leader
# -zmq-> gateway -TCP-> client: 4 over TCP and 4 over ZeroMQ (the followers answer in parallel).
# No implementation of this design can answer one client faster than those 8 hops, whatever it
# does inside each process; the unreplicated app needs 2 TCP hops. A ZeroMQ hop costs more than a
# TCP one: the message also passes through each side's I/O thread.
import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from bench.out_dir import make_out_dir

SMRD_TCP_HOPS, SMRD_ZMQ_HOPS = 4, 4
DIRECT_HOPS = 2    # client>app>client


def _echo(listener):
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(4096)
        if not data:
            os._exit(0)
        conn.sendall(data)


def _zmq_echo(endpoint):
    import zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    while True:
        parts = router.recv_multipart()
        if parts[1] == b"":
            os._exit(0)
        router.send_multipart(parts)


def _round_trips(send, recv, n):
    rtts = []
    for i in range(n + 200):
        t = time.perf_counter()
        send()
        recv()
        if i >= 200:  # warm-up
            rtts.append(time.perf_counter() - t)
    rtts.sort()
    return rtts


def _stats(rtts):
    return {"p50": round(rtts[len(rtts) // 2] * 1e6, 1), "p99": round(rtts[int(len(rtts) * 0.99)] * 1e6, 1),
            "mean": round(statistics.fmean(rtts) * 1e6, 1)}


def measure(round_trips: int, size: int = 64) -> dict:
    payload = b"x" * size
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = listener.getsockname()
    pid = os.fork()
    if pid == 0:
        _echo(listener)
    listener.close()
    s = socket.create_connection(address)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def tcp_recv():
        got = 0
        while got < size:
            got += len(s.recv(4096))
    tcp = _round_trips(lambda: s.sendall(payload), tcp_recv, round_trips)
    s.close()
    os.waitpid(pid, 0)

    import zmq
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    endpoint = "tcp://127.0.0.1:%d" % probe.getsockname()[1]
    probe.close()
    pid = os.fork()
    if pid == 0:
        _zmq_echo(endpoint)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    zq = _round_trips(lambda: dealer.send(payload), dealer.recv, round_trips)
    dealer.send(b"")
    os.waitpid(pid, 0)
    dealer.close()
    ctx.term()

    tcp_hop, zmq_hop = tcp[len(tcp) // 2] / 2, zq[len(zq) // 2] / 2
    floor = SMRD_TCP_HOPS * tcp_hop + SMRD_ZMQ_HOPS * zmq_hop
    return {"round_trips": round_trips, "bytes": size,
            "tcp_rtt_us": _stats(tcp), "zmq_rtt_us": _stats(zq),
            "one_way_hop_us": {"tcp": round(tcp_hop * 1e6, 1), "zmq": round(zmq_hop * 1e6, 1)},
            "floor_us": {"smrd_c1_p50": round(floor * 1e6), "direct_c1_p50": round(DIRECT_HOPS * tcp_hop * 1e6)},
            "hops": {"smrd_tcp": SMRD_TCP_HOPS, "smrd_zmq": SMRD_ZMQ_HOPS, "direct_tcp": DIRECT_HOPS},
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hop_floor", description="the floor under single-client latency here: a loopback round trip between two Python processes, and what it makes of smrd's 8-hop critical path")
    ap.add_argument("--round-trips", type=int, default=5000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.out:
        make_out_dir(ap, args.out)  # before measuring: a bad path is told at once
    r = measure(args.round_trips)
    print(f"round trip between two Python processes ({r['bytes']} B, blocking calls): TCP p50 "
          f"{r['tcp_rtt_us']['p50']:.0f} µs (p99 {r['tcp_rtt_us']['p99']:.0f}), ZeroMQ DEALER-ROUTER p50 "
          f"{r['zmq_rtt_us']['p50']:.0f} µs (p99 {r['zmq_rtt_us']['p99']:.0f})")
    print(f"floor for one client's request: smrd ({SMRD_TCP_HOPS} TCP + {SMRD_ZMQ_HOPS} ZeroMQ hops) "
          f"≈ {r['floor_us']['smrd_c1_p50']} µs; the app alone ({DIRECT_HOPS} TCP hops) "
          f"≈ {r['floor_us']['direct_c1_p50']} µs")
    if args.out:
        (args.out / "hop_floor.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
