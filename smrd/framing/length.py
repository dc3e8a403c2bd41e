"""length mode: 4-byte big-endian unsigned length, then that many bytes; persistent connection.
Owns: the prefix and its bound. Never: allocate for a length before checking it against max_size.
"""
from typing import List

from .base import Buffer, Decoder
from .errors import FramingError, MessageTooLarge

PREFIX_SIZE = 4
MAX_LENGTH = 0xFFFFFFFF


class LengthDecoder(Decoder):
    mode = "length"

    def __init__(self, max_size: int, role: str) -> None:
        super().__init__(max_size, role)
        self._buf = bytearray()

    def _feed(self, data: Buffer, out: List[bytes]) -> None:
        buf = self._buf
        buf += data
        pos = 0
        avail = len(buf)
        while avail - pos >= PREFIX_SIZE:
            n = int.from_bytes(buf[pos:pos + PREFIX_SIZE], "big")
            if n > self.max_size:
                raise MessageTooLarge(
                    f"length prefix announces {n} bytes, over the limit of {self.max_size} bytes")
            end = pos + PREFIX_SIZE + n
            if end > avail:
                break
            out.append(bytes(buf[pos + PREFIX_SIZE:end]))
            pos = end
        if pos:
            del buf[:pos]

    def _eof(self, out: List[bytes]) -> None:
        if self._buf:
            raise FramingError(
                f"connection closed mid-message ({len(self._buf)} bytes of a length-prefixed "
                "message)")


def encode(message: Buffer) -> bytes:
    n = len(message)
    if n > MAX_LENGTH:
        raise MessageTooLarge(f"message of {n} bytes cannot be length-prefixed (max {MAX_LENGTH})")
    return n.to_bytes(PREFIX_SIZE, "big") + bytes(message)
