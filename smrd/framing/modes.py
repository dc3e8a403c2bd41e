"""The mode selector: one decoder class and one encoder per framing mode, chosen by name, and
the mode's per-connection state rules and reply hints where it has them."""
from typing import Callable, Dict, List, Optional, Sequence, Type

from . import close, http, length, line, resp
from .base import Buffer, Decoder
from .rules import StateRules

MODES = ("close", "line", "length", "http", "resp")

_DECODERS: Dict[str, Type[Decoder]] = {
    "close": close.CloseDecoder, "line": line.LineDecoder, "length": length.LengthDecoder,
    "http": http.HttpDecoder, "resp": resp.RespDecoder,
}
_ENCODERS = {"close": close.encode, "line": line.encode, "length": length.encode,
             "http": http.encode, "resp": resp.encode}
# Modes whose requests can depend on the state of the connection they arrive on (see rules.py).
_RULES: Dict[str, Type[StateRules]] = {"resp": resp.RespRules}


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


def state_rules(mode: str, decoder: Decoder, submit: Callable,
                max_size: int) -> Optional[StateRules]:
    """The per-connection state rules for one client connection (its request ``decoder``;
    ``submit(request)`` orders one request), or None for a mode without any: then every decoded
    request is ordered as it is."""
    cls = _RULES.get(mode)
    return None if cls is None else cls(decoder, submit, max_size)


def reply_hints(mode: str, requests: Sequence[bytes]) -> Optional[List]:
    """What the app adapter tells the response decoder (``expect``) before writing each request,
    or None for modes that need nothing: http the request's method (a reply to HEAD has no
    body), resp the number of replies a request gets (a MULTI block gets one per command)."""
    if mode == "http":
        return [http.http_request_method(r) for r in requests]
    if mode == "resp":
        return [resp.reply_count(r) for r in requests]
    return None
