"""smrd.gateway.client_connection's CloseServer: the gateway's client-facing server in close
framing, on bare sockets, with ClientConnection's behaviour for close framing: one request per
connection (every byte before the client's half-close), its reply, then the close; nothing for a
connection that sends nothing or arrives while draining; an error reply, a half-close and a
linger for a request over max_request_bytes.

Real sockets on 127.0.0.1 against a stand-in for the Gateway (what the server uses of it:
reply_for, stats, stopping, settings.max_request_bytes)."""
import asyncio
import socket
import struct
import types

import pytest

from smrd.gateway import client_connection
from smrd.gateway.client_connection import serve_close

HOST = "127.0.0.1"


class FakeGateway:
    """reply_for answers b"R:" + request through a future the test completes (or at once)."""

    def __init__(self, max_request=1000, answer="later"):
        self.settings = types.SimpleNamespace(max_request_bytes=max_request)
        self.stats = {"connections": 0, "errors": 0}
        self.stopping = asyncio.Event()
        self.answer = answer
        self.requests = []
        self.calls = []

    def reply_for(self, request):
        self.requests.append(request)
        if self.answer == "bytes":
            return b"R:" + request
        fut = asyncio.get_running_loop().create_future()
        if self.answer == "done":
            fut.set_result(b"R:" + request)
        self.calls.append(fut)
        return fut


async def start(gateway):
    server = await serve_close(gateway, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port, request, pieces=1):
    reader, writer = await asyncio.open_connection(HOST, port)
    step = max(1, len(request) // pieces)
    for i in range(0, len(request), step):
        writer.write(request[i:i + step])
        await writer.drain()
        await asyncio.sleep(0)  # let the server see the pieces apart
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 15))


@pytest.mark.parametrize("answer", ["later", "done", "bytes"])
def test_a_request_gets_its_reply_then_the_close(answer):
    async def main():
        gw = FakeGateway(answer=answer)
        server, port = await start(gw)
        task = asyncio.create_task(exchange(port, b"PUT k v" * 10, pieces=5))
        if answer == "later":
            while not gw.calls:
                await asyncio.sleep(0.001)
            gw.calls[0].set_result(b"R:" + gw.requests[0])
        assert await task == b"R:" + b"PUT k v" * 10
        assert gw.requests == [b"PUT k v" * 10] and gw.stats["connections"] == 1
        server.close()
    run(main())


def test_many_clients_at_once_each_get_their_own_reply():
    async def main():
        gw = FakeGateway(answer="done")
        server, port = await start(gw)
        requests = [b"GET k%d" % i for i in range(200)]
        replies = await asyncio.gather(*(exchange(port, r) for r in requests))
        assert replies == [b"R:" + r for r in requests]
        assert gw.stats["connections"] == 200
        server.close()
    run(main())


def test_a_connection_without_a_byte_is_no_request():
    async def main():
        gw = FakeGateway()
        server, port = await start(gw)
        assert await exchange(port, b"") == b""
        assert gw.requests == []
        server.close()
    run(main())


def test_while_draining_a_request_is_not_taken():
    async def main():
        gw = FakeGateway()
        server, port = await start(gw)
        gw.stopping.set()
        assert await exchange(port, b"GET a") == b""  # never ordered: safe to send elsewhere
        assert gw.requests == []
        server.close()
    run(main())


def test_a_request_too_large_is_refused_and_the_client_can_read_why(monkeypatch):
    monkeypatch.setattr(client_connection, "LINGER_S", 5.0)

    async def main():
        gw = FakeGateway(max_request=1000)
        server, port = await start(gw)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"x" * 5000)  # over the limit, and still sending: read and dropped
        await writer.drain()
        head = await reader.read(200)
        assert head.startswith(b"ERR smrd: request too large: close-mode message exceeds the "
                               b"limit of 1000 bytes")
        writer.write(b"y" * 5000)
        await writer.drain()
        writer.write_eof()
        assert await reader.read() == b""  # the close follows the client's
        writer.close()
        assert gw.requests == [] and gw.stats["errors"] == 1
        server.close()
    run(main())


def test_failed_and_cancelled_calls_are_answered_with_an_error():
    async def main():
        gw = FakeGateway()
        server, port = await start(gw)
        first = asyncio.create_task(exchange(port, b"a"))
        second = asyncio.create_task(exchange(port, b"b"))
        while len(gw.calls) < 2:
            await asyncio.sleep(0.001)
        gw.calls[0].set_exception(RuntimeError("no quorum"))
        gw.calls[1].cancel()
        assert await first == b"ERR smrd: no quorum"
        assert await second == b"ERR smrd: gateway shutting down"
        server.close()
    run(main())


def test_close_stops_listening_and_what_is_under_way_is_still_answered():
    async def main():
        gw = FakeGateway()
        server, port = await start(gw)
        pending = asyncio.create_task(exchange(port, b"a"))
        while not gw.calls:
            await asyncio.sleep(0.001)
        server.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        gw.calls[0].set_result(b"late")
        assert await pending == b"late"
    run(main())


def test_a_reply_larger_than_the_socket_buffers_reaches_a_slow_reader():
    big = bytes(range(256)) * 20_000  # 5 MB

    async def main():
        gw = FakeGateway()
        server, port = await start(gw)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"big")
        writer.write_eof()
        while not gw.calls:
            await asyncio.sleep(0.001)
        gw.calls[0].set_result(big)
        got = bytearray()
        while True:
            chunk = await reader.read(100_000)
            if not chunk:
                break
            got += chunk
            await asyncio.sleep(0)
        assert bytes(got) == big
        writer.close()
        server.close()
    run(main())


def test_a_client_gone_before_its_reply_costs_nothing():
    async def main():
        gw = FakeGateway()
        server, port = await start(gw)
        sock = socket.create_connection((HOST, port))
        sock.sendall(b"a")
        sock.shutdown(socket.SHUT_WR)
        while not gw.calls:
            await asyncio.sleep(0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        await asyncio.sleep(0.01)
        gw.calls[0].set_result(b"R:a")  # written to nobody, quietly
        gw.answer = "done"
        assert await exchange(port, b"b") == b"R:b"  # and the server goes on
        server.close()
    run(main())
