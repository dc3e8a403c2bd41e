"""Resetting an app that has no snapshot hooks: end its process so that its supervisor (the
kubelet, `smrd local`, systemd) starts it again empty, then wait for the new one.

Owns: the order that keeps a reset clean. The app's processes are frozen first (SIGSTOP: from
then on they write nothing), the app's own data paths are emptied, then the processes are killed
(SIGKILL: no shutdown handler gets to save state). The supervisor only sees an exit after the
kill, so a new app never starts before its files are gone.
Never: guesses which process is the app (smrd.replica.app_watch identifies it from its listening socket),
signals a process that is not the identified one or its descendant, or waits without a bound.
"""
import asyncio
import logging
import os
import shutil
import signal

import psutil

from .app_watch import AppIdentity, AppWatch

log = logging.getLogger(__name__)

# How often the port is looked at while waiting for the new app: a lookup costs ~30 µs, and the
# new app's first connection then waits at most this long.
POLL_S = 0.02


class ResetFailed(Exception):
    """The app could not be ended: the text says why and what the operator can do."""


def empty_paths(paths) -> list:
    """Empties each path: a directory keeps itself (it may be a mount) and loses its contents, a
    file is removed. Returns what could not be removed, as text."""
    problems = []
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                for name in os.listdir(path):
                    child = os.path.join(path, name)
                    if os.path.isdir(child) and not os.path.islink(child):
                        shutil.rmtree(child)
                    else:
                        os.unlink(child)
            elif os.path.lexists(path):
                os.unlink(path)
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
    return problems


def end_app(watch: AppWatch, identity: AppIdentity, data_paths=()) -> int:
    """Freezes, empties and kills the app of `identity`; returns its pid. ResetFailed if it
    cannot be done (its process is not visible, or may not be signalled)."""
    procs = watch.processes(identity)
    if not procs:
        raise ResetFailed(
            f"cannot see the app's process ({identity.describe()}): run smrd as the app's user "
            f"in the same PID namespace (in Kubernetes: shareProcessNamespace: true and the same "
            f"runAsUser for both containers)")
    frozen = []
    try:
        for p in procs:
            p.send_signal(signal.SIGSTOP)
            frozen.append(p)
    except psutil.AccessDenied:
        for p in frozen:
            _quietly(p, signal.SIGCONT)
        raise ResetFailed(
            f"no permission to signal the app's process (pid {identity.pid}): run smrd with the "
            f"app's user id (in Kubernetes: the same runAsUser for both containers)") from None
    except psutil.NoSuchProcess:
        pass  # gone already: what is left is killed below
    problems = empty_paths(data_paths)
    for p in procs:
        _quietly(p, signal.SIGKILL)
    if problems:
        # The app is gone, but its successor would find these: it would not start empty.
        raise ResetFailed("the app was ended, but its data paths could not all be emptied ("
                          + "; ".join(problems) + "): fix their permissions (smrd needs write access)")
    return identity.pid


def _quietly(proc, sig):
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


async def wait_for_new_app(watch: AppWatch, old: AppIdentity, timeout_s: float, stopping=None):
    """The identity of an app listening on the port with other sockets than `old`'s, once one
    does; None after timeout_s (or once `stopping` is set)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end and not (stopping is not None and stopping.is_set()):
        sockets = watch.listening()
        if sockets and sockets != old.sockets:
            return watch.current() or AppIdentity(sockets)
        await asyncio.sleep(POLL_S)  # there is no event for "a process started listening"
    return None
