"""Reply parts that may differ between replicas without the app being non-deterministic.

Owns: turning a framing mode and the `volatile_reply_headers` setting into the function that
gives the part of a reply that replicas must agree on (the "comparable" reply). An HTTP server
stamps `Date` from its own clock, so two replicas executing the same request a second apart send
different bytes; comparing those bytes would report a divergence that is not one, and reset an app
that is fine. The gateway compares, and the replica checks a divergence notice, on comparable
replies; the client always gets one replica's reply, byte for byte.
Must never: change a reply that is sent anywhere, or hide a difference outside the named parts
(a body, the status line, any header not named).
"""
from typing import Callable, Iterable, Optional

Comparable = Callable[[bytes], bytes]


def header_names(value: str) -> tuple:
    """The setting's value (comma-separated header names) as lowercase names, without blanks."""
    return tuple(sorted({n.strip().lower() for n in value.split(",") if n.strip()}))


def comparable_reply(mode: str, volatile_headers: Iterable[str]) -> Optional[Comparable]:
    """The function that strips the volatile parts of one reply, or None when every byte counts
    (modes without named parts, or no header named)."""
    names = frozenset(n.lower() for n in volatile_headers)
    if mode != "http" or not names:
        return None

    def strip_http_headers(reply: bytes) -> bytes:
        head_end = reply.find(b"\r\n\r\n")
        if head_end < 0:
            return reply  # not a whole HTTP head: compare every byte
        lines = reply[:head_end].split(b"\r\n")
        kept = [lines[0]]  # the status line always counts
        for line in lines[1:]:
            name, colon, _ = line.partition(b":")
            if colon and name.strip().lower().decode("latin-1") in names:
                continue
            kept.append(line)
        if len(kept) == len(lines):
            return reply
        return b"\r\n".join(kept) + reply[head_end:]

    return strip_http_headers


def same_reply(a: bytes, b: bytes, comparable: Optional[Comparable]) -> bool:
    """Whether two replicas' replies agree: equal bytes, or equal once the volatile parts go."""
    if a == b:
        return True
    return comparable is not None and comparable(a) == comparable(b)
