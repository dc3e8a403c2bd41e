"""close mode: one TCP connection per exchange (the paper's mode). The message is every byte the
peer sent before it shut down its sending side; nothing inside the bytes delimits anything.
Owns: accumulating one message under max_size. Never: look inside the bytes.
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
            raise MessageTooLarge(
                f"close-mode message exceeds the limit of {self.max_size} bytes "
                f"(at least {len(self._buf) + len(data)} bytes received)")
        self._buf += data

    def _eof(self, out: List[bytes]) -> None:
        # A client that connects and closes without sending a byte (a TCP health probe, a port
        # scan) has not made a request: replicating an empty request for it would put junk into
        # every replica's log. An app that closes without sending a byte has answered with the
        # empty reply, which is a legitimate, deterministic reply.
        if self._buf or self.role == "response":
            out.append(bytes(self._buf))
        self._buf = bytearray()


def encode(message: Buffer) -> bytes:
    return bytes(message)
