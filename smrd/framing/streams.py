"""Thin asyncio glue between StreamReader/StreamWriter and the sans-I/O decoders.
Owns: reading in bounded chunks and queueing decoded messages. Never: time out, retry, log or
close a connection (close mode's half-close is the framing itself): callers own the connection
and wrap calls in their own deadlines.
"""
import asyncio
from collections import deque
from typing import AsyncIterator, Deque, Optional, Union

from .base import Buffer, Decoder
from .modes import encode, make_decoder

READ_SIZE = 64 * 1024


class MessageReader:
    """Reads whole messages of one framing mode from an ``asyncio.StreamReader``.

    ``await next()`` returns the next message, or None when no further message will come: a clean
    EOF between messages, or the decoder is ``finished`` (an HTTP message asked to close the
    connection; a close-mode connection carried its one message). Raises FramingError on bad
    bytes (after returning the good messages that preceded them) and whatever the transport
    raises (ConnectionResetError ...).
    """

    def __init__(self, reader: asyncio.StreamReader, mode: str, max_size: int,
                 role: str = "request", *, read_size: int = READ_SIZE) -> None:
        self.decoder: Decoder = make_decoder(mode, max_size, role)
        self._reader = reader
        self._read_size = read_size
        self._pending: Deque[bytes] = deque()

    @property
    def wants_close(self) -> bool:
        return self.decoder.wants_close

    def expect(self, method: Union[str, bytes]) -> None:
        self.decoder.expect(method)

    async def next(self) -> Optional[bytes]:
        pending = self._pending
        decoder = self.decoder
        while not pending:
            if decoder.error is not None:
                raise decoder.error  # deferred behind good messages; never wait for more bytes
            if decoder.finished:
                return None
            data = await self._reader.read(self._read_size)
            pending.extend(decoder.feed(data) if data else decoder.eof())
        return pending.popleft()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        message = await self.next()
        if message is None:
            raise StopAsyncIteration
        return message


async def write_message(writer: asyncio.StreamWriter, mode: str, message: Buffer) -> None:
    """Encode and write one message, then wait for the buffer to drain.

    close mode also half-closes the writing side (``write_eof``): that is what ends the message
    for the peer. The caller still closes the connection once it has read what it needs.
    """
    writer.write(encode(mode, message))
    if mode == "close" and writer.can_write_eof():
        writer.write_eof()
    await writer.drain()
