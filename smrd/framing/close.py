"""close mode: one TCP connection per exchange (the paper's mode). The message is every byte the
peer sent before it shut down its sending side; nothing inside the bytes delimits anything.
Owns: accumulating one message under max_size, and the words for one over it (too_large). Never:
look inside the bytes.
"""
from typing import List

from .base import Buffer, Decoder
from .errors import MessageTooLarge


class CloseDecoder(Decoder):
    mode = "close"

    def __init__(self, max_size: int, role: str) -> None:
        super().__init__(max_size, role)
        self._buf = bytearray()
        # The connection carries one exchange, so whoever answers it closes it afterwards.
        self.wants_close = True

    def _feed(self, data: Buffer, out: List[bytes]) -> None:
        if len(self._buf) + len(data) > self.max_size:
            raise too_large(self.max_size, len(self._buf) + len(data))
        self._buf += data

    def _eof(self, out: List[bytes]) -> None:
        # A client that connects and closes without sending a byte (a TCP health probe, a port
        # scan) has not made a request: replicating an empty request for it would put junk into
        # every replica's log. An app that closes without sending a byte has answered with the
        # empty reply, which is a legitimate, deterministic reply.
        if self._buf or self.role == "response":
            out.append(bytes(self._buf))
        self._buf = bytearray()


def too_large(max_size: int, received: int) -> MessageTooLarge:
    """The error for a message over max_size, `received` bytes in (also for readers that skip the
    decoder: the gateway's close-mode server, the app adapter's close-mode worker)."""
    return MessageTooLarge(f"close-mode message exceeds the limit of {max_size} bytes "
                           f"(at least {received} bytes received)")


def encode(message: Buffer) -> bytes:
    return bytes(message)
