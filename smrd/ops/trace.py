"""Opt-in timing of single requests through every process (read by `python -m bench.trace`).

Owns: the stamps (monotonic nanoseconds, event, key) a process records while the environment
variable SMRD_TRACE names a directory, and writing them there, one file per process, when the
process exits. CLOCK_MONOTONIC is one clock for every process of a machine, so stamps from the
gateway, the leader and a follower subtract into the time of each hop.
Never: on unless asked (each hook on the request path is one `if trace.ON` test), unbounded
(STAMPS_MAX per process), or anything a decision depends on.

Keys: (client_id, seq) for a request, an int for a consensus instance. The events, in the order a
request meets them: gw_read, gw_send (gateway); r_recv, propose, persisted, accepted_recv, decided,
app_write, app_reply, reply_send (leader); propose_recv, persisted, accepted_sent (followers);
gw_reply, gw_write (gateway). `planned` ties a request to its instance.
"""
import atexit
import json
import os
import time

ON = bool(os.environ.get("SMRD_TRACE"))
STAMPS_MAX = 2_000_000

_stamps = []
_name = None
_now = time.monotonic_ns


def stamp(event: str, key, extra=None) -> None:
    if len(_stamps) < STAMPS_MAX:
        _stamps.append((_now(), event, key, extra))


def start(name: str) -> None:
    """Name this process's trace file (role and id); written at exit."""
    global _name
    if ON and _name is None:
        _name = name
        atexit.register(_write)


def _write() -> None:
    path = os.path.join(os.environ["SMRD_TRACE"], f"{_name}-{os.getpid()}.trace.jsonl")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for t, event, key, extra in _stamps:
                f.write(json.dumps([t, event, list(key) if isinstance(key, tuple) else key, extra]))
                f.write("\n")
    except OSError:
        pass  # a measurement: never the reason a process fails to exit
