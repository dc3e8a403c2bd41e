"""The mode selector: one decoder class and one encoder per framing mode, chosen by name."""
from typing import Dict, Type

from . import close, http, length, line
from .base import Buffer, Decoder

MODES = ("close", "line", "length", "http")

_DECODERS: Dict[str, Type[Decoder]] = {
    "close": close.CloseDecoder, "line": line.LineDecoder, "length": length.LengthDecoder,
    "http": http.HttpDecoder,
}
_ENCODERS = {"close": close.encode, "line": line.encode, "length": length.encode,
             "http": http.encode}


def make_decoder(mode: str, max_size: int, role: str = "request") -> Decoder:
    """A fresh decoder for one connection. role: "request" (what a client sends) or "response"
    (what an app sends). max_size bounds the message (http: the body)."""
    try:
        cls = _DECODERS[mode]
    except KeyError:
        raise ValueError(f"unknown framing mode {mode!r}; expected one of {MODES}") from None
    return cls(max_size, role)


def encode(mode: str, message: Buffer) -> bytes:
    """The bytes to write for one message: line adds the newline, length the prefix; close and
    http pass through."""
    try:
        enc = _ENCODERS[mode]
    except KeyError:
        raise ValueError(f"unknown framing mode {mode!r}; expected one of {MODES}") from None
    return enc(message)
