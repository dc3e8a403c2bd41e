"""Replies smrd itself writes to an outside client when it cannot forward the app's reply
(malformed or too-large request, no answer from the cluster). Owns their exact bytes.
Never: let a caller's text break the framing (newlines in a line reply, CRLF in a header).
"""
from http import HTTPStatus
from typing import Optional, Union

ERROR_PREFIX = b"ERR smrd: "
MAX_REASON = 200


def _clean(text: str) -> bytes:
    # Printable ASCII only, one line, bounded: the reason may quote client bytes via an exception.
    raw = text.encode("ascii", "replace")
    return bytes(b if 0x20 <= b < 0x7F else 0x20 for b in raw)[:MAX_REASON]


def http_error_response(status: int, reason: Optional[str] = None,
                        body: Union[str, bytes] = b"", *, close: bool = False) -> bytes:
    """A complete HTTP/1.1 response with a text/plain body, e.g. 400, 413, 503.

    ``reason`` defaults to the standard phrase. ``close=True`` adds ``Connection: close``; use it
    whenever the gateway closes afterwards (always after a FramingError: the request stream
    cannot be resynchronised).
    """
    if not isinstance(status, int) or not 100 <= status <= 999:
        raise ValueError(f"invalid HTTP status {status!r}")
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    if isinstance(body, str):
        body = body.encode("utf-8")
    head = [b"HTTP/1.1 %d %s\r\n" % (status, _clean(reason)),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body)]
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + bytes(body)


def error_reply(mode: str, reason: str, *, status: int = 503, close: bool = False) -> bytes:
    """The message smrd answers with instead of an app reply (not yet encoded for raw modes).

    Raw modes: ``ERR smrd: <reason>`` (reason reduced to printable ASCII, at most 200 bytes);
    write it with ``write_message``/``encode`` like any reply. http: a complete response with
    ``status`` and body ``smrd: <reason>\\n`` (``status`` and ``close`` only matter here).
    resp: the RESP error ``-ERR smrd: <reason>\\r\\n``.
    """
    text = _clean(reason)
    if mode == "http":
        return http_error_response(status, None, b"smrd: " + text + b"\n", close=close)
    if mode == "resp":
        return b"-ERR smrd: " + text + b"\r\n"
    if mode not in ("close", "line", "length"):
        raise ValueError(f"unknown framing mode {mode!r}")
    return ERROR_PREFIX + text
