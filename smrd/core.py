"""Picks the implementation of the hot path: the compiled smrd._core, or its pure-Python twin
smrd._core_py when SMRD_NO_EXTENSIONS is 1/true/yes (the switch setup.py honours too).
Everything else in smrd imports the hot path from here, never from either twin directly.
Never: add behaviour of its own; fall back silently (a missing build costs ~10x on the hot path,
so the fallback warns and names the fix).
"""
import warnings

from ._switch import no_extensions
from .errors import ProtocolError

_NO_EXTENSIONS = no_extensions()

if _NO_EXTENSIONS:
    from . import _core_py as _impl
else:
    try:
        from . import _core as _impl  # type: ignore[no-redef]
    except ImportError as exc:
        warnings.warn(
            f"smrd._core, the compiled hot path, could not be imported ({exc}); running on the "
            "much slower pure-Python twin. Build it with `pip install -e .` (or set "
            "SMRD_NO_EXTENSIONS=1 to choose the twin on purpose).",
            RuntimeWarning,
            stacklevel=2,
        )
        from . import _core_py as _impl  # type: ignore[no-redef]

__all__ = [
    "IMPLEMENTATION",
    "VERSION",
    "HEADER_SIZE",
    "BATCH_HEADER_SIZE",
    "ENTRY_HEADER_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "peek_header",
    "NEW",
    "DUPLICATE",
    "TOO_OLD",
    "crc32",
    "encode_frame",
    "decode_frame",
    "pack_batch",
    "Batch",
    "BatchBuilder",
    "QuorumTracker",
    "ReplyCache",
    "CloseLink",
    "CloseRun",
    "ProtocolError",
]

IMPLEMENTATION: str = _impl.IMPLEMENTATION
VERSION = _impl.VERSION
HEADER_SIZE = _impl.HEADER_SIZE
BATCH_HEADER_SIZE = _impl.BATCH_HEADER_SIZE
ENTRY_HEADER_SIZE = _impl.ENTRY_HEADER_SIZE
DEFAULT_MAX_PAYLOAD = _impl.DEFAULT_MAX_PAYLOAD
NEW = _impl.NEW
DUPLICATE = _impl.DUPLICATE
TOO_OLD = _impl.TOO_OLD
crc32 = _impl.crc32
encode_frame = _impl.encode_frame
decode_frame = _impl.decode_frame
peek_header = _impl.peek_header
pack_batch = _impl.pack_batch
Batch = _impl.Batch
BatchBuilder = _impl.BatchBuilder
QuorumTracker = _impl.QuorumTracker
ReplyCache = _impl.ReplyCache
CloseLink = _impl.CloseLink
CloseRun = _impl.CloseRun
