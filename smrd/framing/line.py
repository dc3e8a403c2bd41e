"""line mode: newline-delimited messages on a persistent connection.
Owns: splitting at b"\n", stripping one "\r" before it, and the writer's inverse. Never: decode
text or touch any other byte, so binary-safe except for the newline itself.
"""
from typing import List

from .base import Buffer, Decoder
from .errors import FramingError, MessageTooLarge

_LF = 0x0A
_CR = 0x0D


class LineDecoder(Decoder):
    mode = "line"

    def __init__(self, max_size: int, role: str) -> None:
        super().__init__(max_size, role)
        self._buf = bytearray()
        # Everything before _scan is known to hold no newline: a slow peer sending a long line
        # byte by byte must not make us rescan it on every feed (quadratic time).
        self._scan = 0

    def _feed(self, data: Buffer, out: List[bytes]) -> None:
        buf = self._buf
        buf += data
        start = 0
        search = self._scan
        limit = self.max_size
        while True:
            nl = buf.find(b"\n", search)
            if nl < 0:
                break
            end = nl - 1 if nl > start and buf[nl - 1] == _CR else nl
            if end - start > limit:
                raise MessageTooLarge(
                    f"line of {end - start} bytes exceeds the limit of {limit} bytes")
            out.append(bytes(buf[start:end]))
            start = search = nl + 1
        if start:
            del buf[:start]
        self._scan = len(buf)
        # The partial line may still lose one trailing "\r", so it is over the limit only once it
        # is longer than limit + 1, or exactly limit + 1 without that "\r" at its end.
        n = len(buf)
        if n > limit + 1 or (n == limit + 1 and buf[-1] != _CR):
            raise MessageTooLarge(
                f"line exceeds the limit of {limit} bytes (at least {n} bytes without a newline)")

    def _eof(self, out: List[bytes]) -> None:
        if self._buf:
            raise FramingError(
                f"connection closed mid-message ({len(self._buf)} bytes of a line "
                "without its terminating newline)")


def encode(message: Buffer) -> bytes:
    message = bytes(message)
    if b"\n" in message:
        raise FramingError("a line-mode message cannot contain a newline byte")
    # The reader strips one "\r" before the "\n"; a message that itself ends in "\r" gets "\r\n"
    # so that exactly its own "\r" survives the round trip.
    if message.endswith(b"\r"):
        return message + b"\r\n"
    return message + b"\n"
