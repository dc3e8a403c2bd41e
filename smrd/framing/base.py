"""The contract every mode's decoder follows (sans-I/O: bytes in, whole messages out).
A decoder owns the bytes of one connection in one direction. It never reads a socket, never
buffers more than one message's bound plus a small header overhead, and never lets an exception
other than FramingError escape on bad input.
"""
from typing import List, Optional, Union

from .errors import FramingError

Buffer = Union[bytes, bytearray, memoryview]

ROLES = ("request", "response")


class Decoder:
    """Incremental decoder for one direction of one connection.

    ``feed(data)`` returns the messages completed by ``data`` (possibly none, possibly several when
    the peer pipelines); ``eof()`` is called once when the peer closed its sending side and returns
    the messages that EOF completes (close mode, close-delimited HTTP responses) or raises
    FramingError if EOF cut a message short.

    Errors are deferred by one call when the same ``feed`` also completed messages: those messages
    are returned, the error is raised by the next ``feed``/``eof``. So how the bytes happen to be
    split never changes which messages come out before the error. A decoder that raised stays
    failed.

    ``finished`` — no further message can come from this connection (stop reading).
    ``wants_close`` — once the messages returned so far are answered, close the connection.
    """

    mode = ""

    def __init__(self, max_size: int, role: str) -> None:
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 0:
            raise ValueError(f"max_size must be a non-negative int, not {max_size!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.max_size = max_size
        self.role = role
        self.finished = False
        self.wants_close = False
        self._error: Optional[FramingError] = None
        self._at_eof = False

    @property
    def error(self) -> Optional[FramingError]:
        """The error this decoder failed with (raised already, or deferred to the next call)."""
        return self._error

    def feed(self, data: Buffer) -> List[bytes]:
        if self._error is not None:
            raise self._error
        if self._at_eof:
            raise FramingError("data fed to a decoder after EOF")
        out: List[bytes] = []
        if not data or self.finished:
            # After a message that ends the connection (HTTP "Connection: close") the peer may
            # not send more; whatever it sends anyway is dropped unread, never buffered.
            return out
        try:
            self._feed(data, out)
        except FramingError as exc:
            self._error = exc
            if not out:
                raise
        return out

    def eof(self) -> List[bytes]:
        if self._error is not None:
            raise self._error
        if self._at_eof:
            return []
        self._at_eof = True
        out: List[bytes] = []
        if not self.finished:
            try:
                self._eof(out)
            except FramingError as exc:
                self._error = exc
                raise
        self.finished = True
        return out

    def expect(self, method: Union[str, bytes]) -> None:
        """Announce the method of the next request this connection's responses answer.

        Only HTTP response decoders use it (a response to HEAD has no body); it is accepted by every
        decoder so that an app adapter can call it whatever the mode.
        """

    # Subclasses implement these two; they append complete messages to ``out``.
    def _feed(self, data: Buffer, out: List[bytes]) -> None:
        raise NotImplementedError

    def _eof(self, out: List[bytes]) -> None:
        raise NotImplementedError

