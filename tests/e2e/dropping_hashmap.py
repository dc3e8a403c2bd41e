# The demo hashmap, with one fault on demand: after SIGUSR1, the next PUT is executed and then its
# connection is reset (RST) without a reply, and without any replies still owed on it, while the
# process stays up. The worst case for a replica: the request ran, and it cannot know. (A plain
# close would not do in close framing: there, a reply is whatever came before the close, so an
# app closing at once answered with an empty reply.)
#   python dropping_hashmap.py --port PORT --framing line|close
import contextvars
import signal
import socket
import struct
import sys

from smrd.apps import hashmap

armed = False
writer_of_task = contextvars.ContextVar("writer")


def arm(*_):
    global armed
    armed = True


class Dropping(hashmap.HashMapServer):
    async def handle(self, reader, writer):
        writer_of_task.set(writer)  # each connection is its own task, with its own context
        await super().handle(reader, writer)

    def _execute(self, request, multiline):
        global armed
        reply = super()._execute(request, multiline)
        if armed and request.startswith(b"PUT"):
            armed = False
            print("dropped a connection after executing", request[:40], flush=True)
            sock = writer_of_task.get().get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise ConnectionResetError("dropped on purpose")  # handle() closes: an RST
        return reply


signal.signal(signal.SIGUSR1, arm)
hashmap.HashMapServer = Dropping
sys.exit(hashmap.main())
