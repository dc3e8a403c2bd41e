# The floor under single-client latency on this machine: what a message between processes costs
# when each receiver sleeps until it arrives, measured with the cheapest code there is (Python
# processes, blocking calls, no event loop).
#
#   python -m bench.hop_floor [--out DIR] [--round-trips 5000]
#
# One client request through smrd crosses at least these one-way hops, each waking a process:
# client -TCP-> gateway -zmq-> leader -zmq-> follower -zmq-> leader -TCP-> app -TCP-> leader
# -zmq-> gateway -TCP-> client: 4 over TCP and 4 over ZeroMQ (the followers answer in parallel,
# and with 3 replicas one follower's ACCEPTED makes the majority, so one follower is the floor).
# No implementation of this design can answer one client faster than those 8 hops, whatever it
# does inside each process; the unreplicated app needs 2 TCP hops. A ZeroMQ hop costs more than a
# TCP one: the message also passes through each side's I/O thread.
#
# Two measurements of that floor:
# - two-process round trips, over TCP and over ZeroMQ (DEALER to ROUTER, as smrd's processes
#   talk), half of each p50 taken as a hop and summed over the 8 hops (`floor_us`). An estimate
#   only: it does not add up to what the chain costs (on the 2-core sandbox the chain's p50 was
#   1.6-1.9x the sum), so targets are not stated against it.
# - the chain itself (`measure_chain`, `chain_*_us`): five processes, client, gateway, leader,
#   follower and app, relay one 64-byte message along exactly that path, one request outstanding.
#   Each process sleeps in a blocking call between messages, as smrd's do between one client's
#   requests, so the idle wake-ups are in it: smrd's one-client p50 and this floor pay the same
#   wake-ups, and their ratio compares what smrd adds on top. This is "the 8-hop floor" that
#   single-client latency targets are stated against (smrd's one-client PUT p50 ≤
#   TARGET_RATIO × the floor, both measured in the same run: the floor moves with the machine's
#   load by a factor of 3 or more, docs/benchmarks.md). Other benchmarks call measure_chain() to
#   measure the floor in their own run.
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.out_dir import make_out_dir

SMRD_TCP_HOPS, SMRD_ZMQ_HOPS = 4, 4
DIRECT_HOPS = 2    # client>app>client
CHAIN_ROLES = ("app", "follower", "leader", "gateway")  # the client is started last, see measure_chain
TARGET_RATIO = 2.0  # smrd's one-client PUT p50 ≤ TARGET_RATIO × chain_p50_us (issue #17)
ROOT = Path(__file__).resolve().parents[1]


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


def _round_trips(send, recv, n, warmup=200):
    rtts = []
    for i in range(n + warmup):
        t = time.perf_counter()
        send()
        recv()
        if i >= warmup:
            rtts.append(time.perf_counter() - t)
    rtts.sort()
    return rtts


def _pct(rtts, q):
    return round(rtts[min(len(rtts) - 1, int(len(rtts) * q))] * 1e6, 1)


def _stats(rtts):
    return {"p50": _pct(rtts, 0.50), "p90": _pct(rtts, 0.90), "p99": _pct(rtts, 0.99),
            "mean": round(statistics.fmean(rtts) * 1e6, 1)}


def measure(round_trips: int, size: int = 64) -> dict:
    """The two-process round trips (TCP, ZeroMQ) and the 8-hop estimate summed from them."""
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


# ---------------------------------------------------------------------------- the 8-hop chain
# Each role runs in a fresh interpreter (subprocess, not fork: a caller with a ZeroMQ context or
# threads of its own cannot be forked safely, and multiprocessing's spawn would re-import the
# caller's main module). A role binds what it serves on 127.0.0.1, port 0, writes its ports as
# one JSON line on stdout, reads every role's ports as one line on stdin, connects, and relays
# forever; the parent terminates it. Sockets are as smrd's: a bound ROUTER receives, a DEALER per
# destination sends (smrd/net/transport.py), and a replica answers its gateway on the ROUTER the
# request came in on.

def _tell(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _hear():
    line = sys.stdin.readline()
    if not line:
        os._exit(0)  # the parent went away before the chain was wired
    return json.loads(line)


def _die_with_parent(parent: int):
    # Terminated in the parent's `finally`; this covers a parent killed outright (SIGKILL, OOM),
    # whose finally never runs: Linux sends us SIGKILL when it dies, so no relay outlives it.
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)  # it died before prctl took effect


def _tcp_listener():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return listener


def _nodelay(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _recv_exact(conn, buf):
    # One message is `size` bytes; TCP may hand it over in pieces.
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = conn.recv_into(view[got:])
        if n == 0:
            os._exit(0)  # the peer closed: the run is over
        got += n
    return buf


def _zmq_socket(ctx, kind, identity=None):
    import zmq
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    return s


def _role(role: str, parent: int, size: int, round_trips: int = 0, warmup: int = 0) -> None:
    _die_with_parent(parent)
    buf = bytearray(size)
    if role == "app":  # the replicated app: answers each request on the leader's TCP connection
        listener = _tcp_listener()
        _tell({"app_tcp": listener.getsockname()[1]})
        _hear()
        conn, _ = listener.accept()
        _nodelay(conn)
        while True:
            conn.sendall(_recv_exact(conn, buf))
    if role == "client":  # measures; its gateway's port comes on the command line
        conn = _nodelay(socket.create_connection(("127.0.0.1", int(_hear()["gateway_tcp"]))))
        payload = b"x" * size

        def recv():
            _recv_exact(conn, buf)
        rtts = _round_trips(lambda: conn.sendall(payload), recv, round_trips, warmup)
        _tell({"rtts": rtts})
        conn.close()
        return
    import zmq
    ctx = zmq.Context()
    if role == "follower":  # PROPOSE in on its peer ROUTER, ACCEPTED out on its DEALER to the leader
        router = _zmq_socket(ctx, zmq.ROUTER)
        ports = {"follower_peer": router.bind_to_random_port("tcp://127.0.0.1")}
        _tell(ports)
        ports = _hear()
        to_leader = _zmq_socket(ctx, zmq.DEALER, b"r2")
        to_leader.connect("tcp://127.0.0.1:%d" % ports["leader_peer"])
        while True:
            _, propose = router.recv_multipart()
            to_leader.send(propose)
    if role == "leader":
        clients = _zmq_socket(ctx, zmq.ROUTER)  # requests from gateways, replies back to them
        peers = _zmq_socket(ctx, zmq.ROUTER)    # ACCEPTED from followers
        _tell({"leader_client": clients.bind_to_random_port("tcp://127.0.0.1"),
               "leader_peer": peers.bind_to_random_port("tcp://127.0.0.1")})
        ports = _hear()
        to_follower = _zmq_socket(ctx, zmq.DEALER, b"r1")
        to_follower.connect("tcp://127.0.0.1:%d" % ports["follower_peer"])
        app = _nodelay(socket.create_connection(("127.0.0.1", ports["app_tcp"])))
        while True:
            gateway, request = clients.recv_multipart()
            to_follower.send(request)           # PROPOSE
            peers.recv_multipart()              # ACCEPTED: with the leader's own, a majority of 3
            app.sendall(request)                # execute
            clients.send_multipart([gateway, bytes(_recv_exact(app, buf))])
    if role == "gateway":
        listener = _tcp_listener()
        _tell({"gateway_tcp": listener.getsockname()[1]})
        ports = _hear()
        to_leader = _zmq_socket(ctx, zmq.DEALER, b"g1")
        to_leader.connect("tcp://127.0.0.1:%d" % ports["leader_client"])
        conn, _ = listener.accept()
        _nodelay(conn)
        while True:
            to_leader.send(bytes(_recv_exact(conn, buf)))
            conn.sendall(to_leader.recv())
    raise ValueError(f"no chain role {role!r}")


def _spawn(role, size, round_trips=0, warmup=0):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.hop_floor import _role; "
            f"_role({role!r}, {os.getpid()}, {size}, {round_trips}, {warmup})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _read_line(proc, role):
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"hop_floor chain: the {role} process exited (status {proc.wait()}) "
                           f"before it answered; its stderr is above")
    return json.loads(line)


def measure_chain(round_trips: int = 5000, size: int = 64, warmup: int = 500,
                  timeout_s: float | None = None) -> dict:
    """The 8-hop floor: p50/p90/p99/mean (µs) of `round_trips` closed-loop round trips of a
    `size`-byte message along smrd's critical path through five blocking Python processes, after
    `warmup` unmeasured ones. Keys are prefixed chain_ so a caller can merge them into its own
    results; chain_p50_us is the floor single-client targets are compared against. Raises
    RuntimeError if a process dies or the run exceeds timeout_s (default: 60 s + 10 ms a round
    trip); every process it started is gone when it returns or raises."""
    if timeout_s is None:
        timeout_s = 60 + 0.01 * (round_trips + warmup)
    procs = {}
    timed_out = threading.Event()

    def kill_all():
        timed_out.set()
        for p in list(procs.values()):
            p.kill()  # a blocked readline below then sees EOF and raises
    watchdog = threading.Timer(timeout_s, kill_all)
    watchdog.daemon = True
    watchdog.start()
    load_before = os.getloadavg()

    def start(role, *args):
        procs[role] = _spawn(role, size, *args)
        if timed_out.is_set():  # the watchdog ran before this one existed
            procs[role].kill()
        return procs[role]
    try:
        for role in CHAIN_ROLES:
            start(role)
        ports = {}
        for role in CHAIN_ROLES:
            ports.update(_read_line(procs[role], role))
        for role in CHAIN_ROLES:
            procs[role].stdin.write(json.dumps(ports) + "\n")
            procs[role].stdin.flush()
        # The client starts once every other role is bound: a TCP connect or a DEALER's first
        # message waits in the kernel or in ZeroMQ's queue until the peer accepts or connects,
        # and the warm-up absorbs that, so no readiness round is needed.
        client = start("client", round_trips, warmup)
        client.stdin.write(json.dumps({"gateway_tcp": ports["gateway_tcp"]}) + "\n")
        client.stdin.flush()
        rtts = _read_line(client, "client")["rtts"]
    except (RuntimeError, ValueError, OSError) as e:
        if timed_out.is_set():
            raise RuntimeError(f"hop_floor chain: no result within {timeout_s:g} s") from e
        raise
    finally:
        watchdog.cancel()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass  # the pipe's reader is gone: nothing left to flush
    stats = _stats(rtts)
    return {"chain_p50_us": stats["p50"], "chain_p90_us": stats["p90"], "chain_p99_us": stats["p99"],
            "chain_mean_us": stats["mean"], "chain_round_trips": round_trips, "chain_warmup": warmup,
            "chain_bytes": size, "chain_processes": len(CHAIN_ROLES) + 1,
            "chain_hops": {"tcp": SMRD_TCP_HOPS, "zmq": SMRD_ZMQ_HOPS},
            "chain_load_average": {"before": load_before, "after": os.getloadavg()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hop_floor", description="the floor under single-client latency here: round trips between two Python processes, the 8-hop estimate summed from them, and the 8-hop chain of smrd's critical path through five processes (the floor single-client targets are compared against)")
    ap.add_argument("--round-trips", type=int, default=5000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.out:
        make_out_dir(ap, args.out)  # before measuring: a bad path is told at once
    r = measure(args.round_trips)
    r.update(measure_chain(args.round_trips, r["bytes"]))
    r["c1_put_p50_target_us"] = round(TARGET_RATIO * r["chain_p50_us"])
    r["target_ratio"] = TARGET_RATIO
    print(f"round trip between two Python processes ({r['bytes']} B, blocking calls): TCP p50 "
          f"{r['tcp_rtt_us']['p50']:.0f} µs (p99 {r['tcp_rtt_us']['p99']:.0f}), ZeroMQ DEALER-ROUTER p50 "
          f"{r['zmq_rtt_us']['p50']:.0f} µs (p99 {r['zmq_rtt_us']['p99']:.0f})")
    print(f"estimate summed from them: smrd ({SMRD_TCP_HOPS} TCP + {SMRD_ZMQ_HOPS} ZeroMQ hops) "
          f"≈ {r['floor_us']['smrd_c1_p50']} µs; the app alone ({DIRECT_HOPS} TCP hops) "
          f"≈ {r['floor_us']['direct_c1_p50']} µs")
    print(f"the 8-hop floor (client-gateway-leader-follower-leader-app-leader-gateway-client, "
          f"{r['chain_processes']} processes, {r['chain_round_trips']} round trips): p50 "
          f"{r['chain_p50_us']:.0f} µs, p90 {r['chain_p90_us']:.0f}, p99 {r['chain_p99_us']:.0f}, "
          f"mean {r['chain_mean_us']:.0f}")
    print(f"target for smrd's one-client PUT p50, measured in the same run: ≤ {TARGET_RATIO:g} × "
          f"{r['chain_p50_us']:.0f} = {r['c1_put_p50_target_us']} µs "
          f"(load average {' '.join(f'{x:.2f}' for x in r['load_average'])})")
    if args.out:
        (args.out / "hop_floor.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
