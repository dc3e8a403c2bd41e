"""Message framing for the five app modes, used both ways: the gateway decodes outside clients'
requests and encodes replies to them; a replica's app adapter encodes requests to its app and
decodes the app's replies. The wire behaviour of each mode is written in docs/framing.md.

Owns: where a message starts and ends, its bounds, and (http) the canonical form that is
replicated. Never: I/O outside streams.py, clocks, logging, or any knowledge of replication;
never an exception other than FramingError for bad bytes.
"""
from .base import ROLES, Decoder
from .close import CloseDecoder
from .errors import FramingError, MessageTooLarge
from .http import MAX_HEADER_BYTES, HttpDecoder, http_request_method
from .idempotency import ENVELOPE_PREFIX, add_idempotency, split_idempotency
from .length import LengthDecoder
from .line import LineDecoder
from .modes import MODES, encode, make_decoder, reply_hints, state_rules
from .replies import ERROR_PREFIX, error_reply, http_error_response
from .resp import RespDecoder
from .rules import StateRules
from .streams import MessageReader, write_message

__all__ = [
    "MODES", "ROLES", "MAX_HEADER_BYTES", "ENVELOPE_PREFIX", "ERROR_PREFIX",
    "FramingError", "MessageTooLarge", "Decoder",
    "CloseDecoder", "LineDecoder", "LengthDecoder", "HttpDecoder", "RespDecoder", "StateRules",
    "make_decoder", "encode", "state_rules", "reply_hints", "split_idempotency",
    "add_idempotency", "http_request_method",
    "error_reply", "http_error_response", "MessageReader", "write_message",
]
