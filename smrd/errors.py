"""The exceptions that cross module boundaries. Both _core twins raise ProtocolError from here,
so callers catch one class whichever twin is loaded.
"""


class SmrdError(Exception):
    """Base of every error smrd raises on purpose."""


class ProtocolError(SmrdError, ValueError):
    """Bytes that are not a well-formed smrd message, batch or record.

    Raised by decoders on anything malformed (short, long, bad magic/version/checksum, absurd
    lengths). Callers drop the offending message and log it; they never crash on it.
    """


class ConfigError(SmrdError):
    """A configuration that cannot be used; the message names the file, key and the fix."""


class ListenError(SmrdError, OSError):
    """A port this process must listen on is taken or not ours to use (an OSError too, for
    callers that handle socket errors alike)."""
