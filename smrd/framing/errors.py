"""The two exceptions every framing decoder raises on purpose, and nothing else.
A decoder meets bytes from outside clients (the gateway) and from the app (the replica): anything
malformed must surface as FramingError so that callers can answer with an error and drop the
connection instead of crashing a task on an IndexError or UnicodeDecodeError.
"""
from ..errors import SmrdError


class FramingError(SmrdError, ValueError):
    """Bytes that do not form a message in the configured framing mode.

    ``status`` is the HTTP status a gateway should answer with in http mode (400 unless the cause
    says otherwise: 417, 501, 505 ...). Only request decoders' statuses mean anything; raw modes
    ignore it and send ``error_reply(mode, str(err))``.
    After a FramingError the connection cannot be resynchronised: answer, then close it.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class MessageTooLarge(FramingError):
    """A message (or an HTTP header block) over its bound, raised as soon as that is knowable.

    ``status`` is 413 for a body/message over ``max_size`` and 431 for an HTTP header block over
    ``MAX_HEADER_BYTES``.
    """

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message, status)
