"""The no-op app of the ordering microbenchmark (the counterpart of BFT-SMaRt's ThroughputLatency
server): it answers every request with the same fixed 64-byte reply and keeps no state, so a run
through smrd measures ordering, logging and reply routing with the app's own cost near zero.
Like the hashmap demo it is a plain TCP server that must never import anything from smrd (it
also runs as a bare file: `python noop.py`), and it is trivially deterministic.

Framing: `line` only — a persistent connection, one request per "\n"-terminated line, one reply
line (REPLY, 64 bytes, then "\n") per request, in order; pipelined requests are answered in one
write. A line longer than --max-request bytes gets "ERR request too large" and the connection
is closed.
"""
import argparse
import asyncio
import signal
import sys

REPLY = b"R" * 64
REPLY_LINE = REPLY + b"\n"
TOO_LARGE = b"ERR request too large\n"


class NoopProtocol(asyncio.Protocol):
    """asyncio's Protocol rather than streams: the app should cost as little as possible."""

    def __init__(self, max_request: int) -> None:
        self.max_request = max_request
        self.transport = None
        self.partial = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        count = data.count(b"\n")
        if count:
            self.partial = data[data.rfind(b"\n") + 1:]
            self.transport.write(REPLY_LINE * count)
        else:
            self.partial = data
        if len(self.partial) > self.max_request:
            self.transport.write(TOO_LARGE)
            self.transport.close()


async def serve(host: str, port: int, max_request: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # the handler only sets a flag
    try:
        server = await loop.create_server(lambda: NoopProtocol(max_request), host, port)
    except OSError as exc:
        print(f"noop: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    sockname = server.sockets[0].getsockname()
    address = f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}"
    print(f"listening {address}", flush=True)  # the one start line; scripts parse the port
    await stop.wait()
    server.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="noop", description="No-op app: answers every request line with the same 64-byte "
        "reply line. Prints 'listening HOST:PORT' when up; SIGTERM or SIGINT stops it (exit 0).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=7000, help="TCP port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--framing", choices=("line",), default="line",
                        help="only line framing is served (default %(default)s)")
    parser.add_argument("--max-request", type=int, default=4 * 1024 * 1024, metavar="BYTES",
                        help="longest request line accepted (default %(default)s)")
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.host, args.port, args.max_request))


if __name__ == "__main__":
    sys.exit(main())
