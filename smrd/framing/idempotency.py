"""Idempotency keys: how an outside client marks retries of one logical request, so that a retry
through another gateway is answered from the replicas' cache instead of being executed again.
Owns: the raw-mode envelope and reading the key back out of a decoded message. Never: decide
what a key means (the gateway does) or put it into the replicated bytes in a raw mode.

Raw modes (close, line, length): a message that starts with the ASCII bytes
    SMRD-IDEM <key> <payload>
(one space after "SMRD-IDEM", one after the key; key = 1 to 128 of [A-Za-z0-9._-]) carries
<key>; the app only ever sees <payload>. A message starting with "SMRD-IDEM " that does not
continue with a valid key and a space is refused, never passed through: that prefix is reserved.
http: the Idempotency-Key request header. It stays in the canonical request (it is end-to-end,
and the app may use it too), so the replicated bytes are the same whoever extracts the key.
"""
import re
from typing import Optional, Tuple

from . import http
from .base import Buffer
from .errors import FramingError

ENVELOPE_PREFIX = b"SMRD-IDEM "
MAX_ENVELOPE_KEY = 128
_KEY = re.compile(rb"[A-Za-z0-9._-]{1,%d}" % MAX_ENVELOPE_KEY)
_RAW_MODES = ("close", "line", "length")


def split_idempotency(mode: str, message: Buffer) -> Tuple[Optional[str], bytes]:
    """-> (key or None, the message the app must see).

    Raw modes strip the envelope; http returns the Idempotency-Key header value and the message
    unchanged. Raises FramingError on a malformed envelope or header.
    """
    if mode == "http":
        return http.idempotency_key(message), bytes(message)
    if mode == "resp":  # no key: a RESP command has no place for one that Redis would not see
        return None, bytes(message)
    if mode not in _RAW_MODES:
        raise ValueError(f"unknown framing mode {mode!r}")
    message = bytes(message)
    if not message.startswith(ENVELOPE_PREFIX):
        return None, message
    start = len(ENVELOPE_PREFIX)
    sp = message.find(b" ", start, start + MAX_ENVELOPE_KEY + 1)
    if sp < 0 or _KEY.fullmatch(message, start, sp) is None:
        raise FramingError(
            f"malformed SMRD-IDEM envelope: expected 'SMRD-IDEM <key> ' with a key of 1 to "
            f"{MAX_ENVELOPE_KEY} characters from [A-Za-z0-9._-]")
    return message[start:sp].decode("ascii"), message[sp + 1:]


def add_idempotency(mode: str, key: str, message: Buffer) -> bytes:
    """Wrap a raw-mode message in the envelope (what a client, or a test, sends)."""
    if mode not in _RAW_MODES:
        raise ValueError(f"the SMRD-IDEM envelope is for raw modes {_RAW_MODES}; "
                         "http clients send an Idempotency-Key header")
    raw = key.encode("ascii", "replace")
    if _KEY.fullmatch(raw) is None:
        raise ValueError(f"invalid idempotency key {key!r}")
    return ENVELOPE_PREFIX + raw + b" " + bytes(message)
