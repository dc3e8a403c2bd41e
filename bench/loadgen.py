# Closed-loop load generator: each simulated client keeps exactly one request outstanding.
# Speaks the hashmap grammar in `line` or `close` framing (to an smrd gateway or to the app
# itself), the no-op app's 64-byte requests, and etcd's v3 JSON gateway over keep-alive HTTP/1.1
# (`http` framing). Clients are spread over several worker processes so that the generator is not
# the bottleneck; every worker measures the same window and its own CPU in it, since on a small
# machine the generator competes with what it measures.
#
# Reports ops/s, latency (mean, the paper's trimmed mean that drops the 5% most deviating samples,
# p50, p99), errors, and the generator's CPU (µs per op, and cores used).
#
#   python bench/loadgen.py --port 11900 --framing line --clients 64 --seconds 10 --out r.json
#
# Self-contained (standard library only, Linux epoll, no smrd imports): bench/experiments.py
# imports it and spawns this file as its workers (`--worker`), so it also runs as a bare file.
# Never: keeps more than one request outstanding per client, or counts a request that completed
# outside the measured window.
import argparse
import base64
import errno
import json
import os
import random
import select
import socket
import statistics
import subprocess
import sys
import time
from array import array

HERE = os.path.abspath(__file__)
MIXES = ("put", "get", "mixed", "noop")
FRAMINGS = ("line", "close", "http")
NOOP_REQUEST = b"Q" * 64  # the ordering microbenchmark's 64-byte request


# ------------------------------------------------------------------ statistics

def trimmed_mean(samples, drop=0.05):
    """The paper's latency mean: drop the `drop` fraction of samples farthest from the mean."""
    if not samples:
        return 0.0
    mean = statistics.fmean(samples)
    keep = sorted(samples, key=lambda s: abs(s - mean))[: max(1, int(len(samples) * (1 - drop)))]
    return statistics.fmean(keep)


def percentile(sorted_samples, p):
    if not sorted_samples:
        return 0.0
    return sorted_samples[min(len(sorted_samples) - 1, int(len(sorted_samples) * p))]


def latency_summary(samples_us):
    us = sorted(samples_us)
    return {"trimmed_mean": round(trimmed_mean(us), 1),
            "mean": round(statistics.fmean(us), 1) if us else 0.0,
            "p50": round(percentile(us, 0.50), 1), "p99": round(percentile(us, 0.99), 1)}


# ------------------------------------------------------------------ requests

def request_table(framing, mix, keys, value_size, host="127.0.0.1", port=0):
    """(puts, gets): the request bytes for every key, built once so that making a request costs
    the generator nothing but an index (the same for every protocol, keeping costs comparable)."""
    value = b"v" * value_size
    if mix == "noop":
        return [NOOP_REQUEST + b"\n"], []
    if framing == "http":
        def post(path, body):
            data = json.dumps(body, separators=(",", ":")).encode()
            return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % (path, host.encode(), port, len(data))) + data
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        puts = [post(b"/v3/kv/put", {"key": b64(b"k%d" % k), "value": b64(value)}) for k in range(keys)]
        gets = [post(b"/v3/kv/range", {"key": b64(b"k%d" % k)}) for k in range(keys)]
        return puts, gets
    end = b"\n" if framing == "line" else b""
    puts = [b"PUT k%d %s%s" % (k, value, end) for k in range(keys)]
    gets = [b"GET k%d%s" % (k, end) for k in range(keys)]
    return puts, gets


class Requests:
    def __init__(self, seed, mix, puts, gets):
        self.rnd = random.Random(seed)
        self.mix, self.puts, self.gets = mix, puts, gets

    def next(self):
        if self.mix == "noop":
            return self.puts[0]
        if self.mix == "put" or (self.mix == "mixed" and self.rnd.random() < 0.5):
            return self.puts[self.rnd.randrange(len(self.puts))]
        return self.gets[self.rnd.randrange(len(self.gets))]


# ------------------------------------------------------------------ one worker process
# A plain epoll loop over non-blocking sockets, not asyncio: on the 2-core machine asyncio's
# Protocols cost ~50 µs of CPU per request against ~20 µs here, and every µs the generator burns
# is taken from the system it measures. All framings share this loop, so the generator costs
# about the same per request whether it drives smrd, the app alone or etcd.

class Client:
    __slots__ = ("index", "port", "requests", "sock", "buf", "t_sent", "reply")

    def __init__(self, index, port, requests):
        self.index, self.port, self.requests = index, port, requests
        self.sock, self.buf, self.t_sent, self.reply = None, b"", 0.0, []


def line_replies(c, data):
    """Complete replies in c's buffer (line framing); at most one is ever outstanding."""
    c.buf += data
    out = []
    while True:
        end = c.buf.find(b"\n")
        if end < 0:
            return out
        out.append(c.buf[:end])
        c.buf = c.buf[end + 1:]


def http_replies(c, data):
    """Complete HTTP/1.1 responses in c's buffer (Content-Length or chunked bodies)."""
    c.buf += data
    out = []
    while True:
        buf = c.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return out
        head = buf[:head_end].lower()
        body = head_end + 4
        i = head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            end = body + int(head[i + 15:j if j >= 0 else len(head)])
            if len(buf) < end:
                return out
        elif b"transfer-encoding: chunked" in head:
            end = _chunked_end(buf, body)
            if end is None:
                return out
        else:
            end = body
        out.append(buf[:end])
        c.buf = buf[end:]


def _chunked_end(buf, pos):
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(buf[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2 + size + 2
        if len(buf) < pos:
            return None
        if size == 0:
            return pos


def _reply_ok(framing, reply):
    if framing == "http":
        return reply[9:12] == b"200"
    return bool(reply) and not reply.startswith(b"ERR")


def _cpu_s():
    t = os.times()
    return t.user + t.system


def worker_main(spec):
    """Run this worker's clients: print READY once every client has a request outstanding (the
    warm-up), read the window's start (time.monotonic(), one clock for all processes on Linux)
    from stdin, measure `seconds` from there, let outstanding requests finish, return a dict."""
    framing, host, seconds = spec["framing"], spec["host"], spec["seconds"]
    persistent = framing != "close"
    ep = select.epoll()
    by_fd = {}
    clients = []
    tables = {}
    for index, port in spec["clients"]:
        if port not in tables:
            tables[port] = request_table(framing, spec["mix"], spec["keys"], spec["value_size"], host, port)
        clients.append(Client(index, port, Requests(index, spec["mix"], *tables[port])))
    samples, errors, first_errors = array("d"), [0], []
    window = [float("inf"), float("inf")]
    mono = time.monotonic

    def error(text, counted=None):
        """Errors inside the window count; any error is kept (up to 3) for the report."""
        if counted if counted is not None else window[0] <= mono() < window[1]:
            errors[0] += 1
        if len(first_errors) < 3:
            first_errors.append(text[:100])

    def open_one(c):
        """close framing: a new connection for the next request."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock, c.reply, c.t_sent = s, [], mono()
        err = s.connect_ex((host, c.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, os.strerror(err))
        by_fd[s.fileno()] = c
        ep.register(s.fileno(), select.EPOLLOUT)

    for c in clients:
        if persistent:
            c.sock = socket.create_connection((host, c.port), timeout=10)
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sock.setblocking(False)
            by_fd[c.sock.fileno()] = c
            ep.register(c.sock.fileno(), select.EPOLLIN)
    for c in clients:  # warm-up starts now: every client busy before the window opens
        if persistent:
            c.t_sent = mono()
            c.sock.send(c.requests.next())
        else:
            open_one(c)
    outstanding = len(clients)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    in_fd = sys.stdin.fileno()
    ep.register(in_fd, select.EPOLLIN)
    cpu = {}
    stopping = False
    give_up = float("inf")
    parse = line_replies if framing == "line" else http_replies

    def finished(c, reply):
        now = mono()
        if window[0] <= now < window[1]:
            if _reply_ok(framing, reply):
                samples.append((now - c.t_sent) * 1e6)
            else:
                error(bytes(reply[:100]).decode("ascii", "replace"))
        return now

    while outstanding and mono() < give_up:
        now = mono()
        if "start" not in cpu and now >= window[0]:
            cpu["start"] = _cpu_s()
        if not stopping and now >= window[1]:
            cpu["end"] = _cpu_s()
            stopping = True
            give_up = now + 5.0
        edge = window[0] if "start" not in cpu else window[1]
        for fd, events in ep.poll(min(0.05, max(0.0, edge - now))):
            if fd == in_fd:
                start = float(os.read(in_fd, 100).decode().split()[0])
                window[:] = [start, start + seconds]
                ep.unregister(in_fd)
                continue
            c = by_fd[fd]
            if persistent:
                try:
                    data = c.sock.recv(65536)
                except ConnectionError as e:
                    data, reason = b"", str(e)
                else:
                    reason = "connection closed by the server"
                if not data:
                    error(reason)
                    ep.unregister(fd)
                    outstanding -= 1
                    continue
                for reply in parse(c, data):
                    now = finished(c, reply)
                    if stopping:
                        outstanding -= 1
                    else:
                        c.t_sent = now
                        c.sock.send(c.requests.next())
            elif events & select.EPOLLOUT:  # close framing: connected (or failed to)
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    error(f"connect: {os.strerror(err)}")
                else:
                    c.sock.send(c.requests.next())
                    c.sock.shutdown(socket.SHUT_WR)
                    ep.modify(fd, select.EPOLLIN)
                    continue
                ep.unregister(fd)
                del by_fd[fd]
                c.sock.close()
                if stopping:
                    outstanding -= 1
                else:
                    open_one(c)
            else:  # close framing: reply bytes, until the server closes
                try:
                    data = c.sock.recv(65536)
                except ConnectionError as e:
                    error(f"connection: {e}")
                    data = None
                if data:
                    c.reply.append(data)
                    continue
                ep.unregister(fd)
                del by_fd[fd]
                c.sock.close()
                if data is not None:
                    finished(c, b"".join(c.reply))
                if stopping:
                    outstanding -= 1
                else:
                    open_one(c)
    if outstanding:
        error(f"{outstanding} requests still outstanding 5 s after the window", counted=True)
    for c in clients:
        if c.sock is not None:
            c.sock.close()
    ep.close()
    return {"samples": base64.b64encode(samples.tobytes()).decode(), "errors": errors[0],
            "first_errors": first_errors, "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0)}


def worker_entry(spec_json):
    result = worker_main(json.loads(spec_json))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


class ClosedLoop:
    """A fixed number of requests instead of a window, in the calling process, over connections
    kept open between runs (for pytest-benchmark rounds): run(total) issues exactly `total`
    requests from `clients` closed-loop clients and returns when the last reply is in."""

    def __init__(self, port, clients, mix="mixed", framing="line", host="127.0.0.1", keys=1000,
                 value_size=64):
        if framing not in ("line", "http"):
            raise ValueError("ClosedLoop keeps connections open: line or http framing")
        puts, gets = request_table(framing, mix, keys, value_size, host, port)
        self.parse = line_replies if framing == "line" else http_replies
        self.framing = framing
        self.ep = select.epoll()
        self.clients = {}
        for i in range(clients):
            c = Client(i, port, Requests(i, mix, puts, gets))
            c.sock = socket.create_connection((host, port), timeout=10)
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sock.setblocking(False)
            self.clients[c.sock.fileno()] = c
            self.ep.register(c.sock.fileno(), select.EPOLLIN)

    def run(self, total, timeout=60.0):
        """Returns the number of error replies (a reply that is not the app's normal answer)."""
        issued = done = errors = 0
        for c in self.clients.values():
            if issued < total:
                c.sock.send(c.requests.next())
                issued += 1
        deadline = time.monotonic() + timeout
        while done < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{total - done} of {total} requests unanswered after {timeout} s")
            for fd, _ in self.ep.poll(1.0):
                c = self.clients[fd]
                data = c.sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed a connection")
                for reply in self.parse(c, data):
                    done += 1
                    errors += not _reply_ok(self.framing, reply)
                    if issued < total:
                        c.sock.send(c.requests.next())
                        issued += 1
        return errors

    def close(self):
        for c in self.clients.values():
            c.sock.close()
        self.ep.close()


# ------------------------------------------------------------------ the parent: spawn and merge

def default_procs(clients, cores=None):
    """One worker per core once there are enough clients to keep several busy."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, clients // 8 or 1))


class LoadError(RuntimeError):
    pass


def run_load(*, ports, framing, clients, seconds, warmup=1.0, mix="mixed", keys=1000,
             value_size=64, host="127.0.0.1", procs=None, on_window_start=None,
             on_window_end=None):
    """Drive `clients` closed-loop clients (client i connects to ports[i % len(ports)]) from
    `procs` worker processes; measure a window of `seconds` after `warmup`. on_window_start/end
    are called in this process at the window's edges (to sample the servers' CPU there)."""
    if framing not in FRAMINGS or mix not in MIXES:
        raise ValueError(f"bad framing/mix {framing}/{mix}")
    procs = procs or default_procs(clients)
    procs = max(1, min(procs, clients))
    workers = []
    try:
        for w in range(procs):
            spec = {"framing": framing, "mix": mix, "keys": keys, "value_size": value_size,
                    "host": host, "seconds": seconds,
                    "clients": [(i, ports[i % len(ports)]) for i in range(w, clients, procs)]}
            workers.append(subprocess.Popen([sys.executable, HERE, "--worker", json.dumps(spec)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True))
        for p in workers:
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise LoadError(f"load worker did not start (said {line!r}; exit {p.poll()})")
        start = time.monotonic() + warmup
        for p in workers:
            p.stdin.write(f"{start!r}\n")
            p.stdin.flush()
        time.sleep(max(0.0, start - time.monotonic()))
        if on_window_start:
            on_window_start()
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        if on_window_end:
            on_window_end()
        results = []
        for p in workers:
            out, _ = p.communicate(timeout=30)
            if p.returncode != 0 or not out.strip():
                raise LoadError(f"load worker failed with exit {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
    samples = array("d")
    for r in results:
        samples.frombytes(base64.b64decode(r["samples"]))
    ops = len(samples)
    cpu = sum(r["cpu_s"] for r in results)
    errors = sum(r["errors"] for r in results)
    return {
        "framing": framing, "clients": clients, "mix": mix, "value_size": value_size,
        "seconds": seconds, "ops": ops, "ops_per_s": round(ops / seconds, 1),
        "latency_us": latency_summary(samples),
        "errors": errors, "first_errors": [e for r in results for e in r["first_errors"]][:3],
        "loadgen": {"procs": procs, "cpu_s": round(cpu, 3), "cores": round(cpu / seconds, 3),
                    "cpu_us_per_op": round(cpu * 1e6 / ops, 1) if ops else None},
    }


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return worker_entry(argv[1])
    ap = argparse.ArgumentParser(description="Closed-loop load generator (one outstanding "
                                 "request per client); prints one JSON result.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, action="append", required=True,
                    help="target port; repeat to spread clients over several (gateways, members)")
    ap.add_argument("--framing", choices=FRAMINGS, default="line")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--mix", choices=MIXES, default="mixed",
                    help="put, get, mixed (50/50) over --keys keys, or noop (64-byte requests)")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=64)
    ap.add_argument("--procs", type=int, default=None,
                    help="worker processes (default: one per core once there are 16+ clients)")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    result = run_load(ports=args.port, framing=args.framing, clients=args.clients,
                      seconds=args.seconds, warmup=args.warmup, mix=args.mix, keys=args.keys,
                      value_size=args.value_size, host=args.host, procs=args.procs)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["ops"] else 1


if __name__ == "__main__":
    sys.exit(main())
