"""Which app a replica is feeding: the socket listening on the app's port, and the process that
holds it.

Owns: the app's identity and the rule for trusting a connection. The identity of "the app
listening now" is the set of inodes of the sockets listening on the port (smrd.replica.sockdiag asks the
kernel), with the holder's (pid, start time) beside it where psutil can see it. It is never
inferred from whether an old pid still exists: a killed app can stay a zombie for seconds (its
parent reaps late), and psutil calls a zombie running, while its listening socket died with it.

The rule (`check`, run on a new connection before anything is written on it):
  - nothing listens any more, or the sockets cannot be read: AppUnverified (the adapter drops the
    connection and tries again, as after a failed connect: nothing was written);
  - the listener is not the adopted one: AppRestarted, carrying the new identity; the replica
    decides what the app now holds;
  - no app adopted yet: the listener is adopted (and recorded, so that a restarted smrd knows
    the app it fed).
A check that passes on an app with one listening socket returns its inode: close mode's worker
(smrd.core's CloseLink) then verifies the connections right after it by asking the kernel which
socket a connection to the app's address reaches now (sock_diag's exact lookup, the kernel's own
listener lookup for an arriving SYN: ~3 µs, against ~30 µs for this dump of every listener) and
comparing with that inode, and comes back here on any other answer, at the start of every batch
and at least every smrd.replica.app_adapter.CLOSE_RECHECK_S. An app with several listening sockets
on the port (several addresses, or an SO_REUSEPORT group, whose members share connections by a
hash the lookup cannot reproduce) gets no such shortcut: every connection is checked here. What
the lookup alone would not see is a second socket appearing beside the one socket adopted: that
changes the set compared here, so it is seen by the next check, within CLOSE_RECHECK_S.
Never: touches the app (smrd.replica.app_reset ends it), or lets a connection through that it could not
verify. The one exception is an app on another host (app_host not local), whose sockets this host
cannot see: then nothing is checked, and the replica says so once at start.
"""
import ipaddress
import json
import logging
import os
import socket
import threading
from typing import NamedTuple, Optional

import psutil

from .app_adapter import AppError, AppUnverified
from .sockdiag import ListenerQuery

log = logging.getLogger(__name__)


class AppIdentity(NamedTuple):
    sockets: frozenset            # inodes of the sockets listening on the port
    pid: Optional[int] = None     # the process holding them, when psutil can see it
    create_time: Optional[float] = None

    def describe(self) -> str:
        inodes = ",".join(str(i) for i in sorted(self.sockets))
        return f"pid {self.pid} (socket {inodes})" if self.pid else f"socket {inodes} (pid not visible)"

    def same_process(self, other: "AppIdentity") -> bool:
        """Known to be the same process (the same pid started at the same time)."""
        return (self.pid is not None and self.pid == other.pid
                and self.create_time == other.create_time)


class AppRestarted(AppError):
    """Another socket listens on the app's port than the one requests were executed on."""

    def __init__(self, reason: str, new: AppIdentity = None, old: AppIdentity = None):
        super().__init__(reason)
        self.new = new
        self.old = old

    def __str__(self) -> str:
        return self.reason  # no request was written on the connection it was raised for


def is_local_host(host: str) -> bool:
    """Can this host see the sockets of an app at `host`? (A loopback or local address.)"""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    local = set()
    try:
        for addrs in psutil.net_if_addrs().values():
            local.update(a.address.split("%")[0] for a in addrs)
    except OSError:
        pass
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a.split("%")[0])
        except ValueError:
            return False
        if not (ip.is_loopback or ip.is_unspecified or str(ip) in local):
            return False
    return bool(addresses)


PF_EXITING = 0x4  # include/linux/sched.h: set when the process starts to exit


def _exiting(pid: int) -> bool:
    """Has the process begun to exit? Its sockets are closed one by one then, before it becomes a
    zombie: a connection can already be reset while its listening socket is still there, and a
    check in between must not take the dying app for a live one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return bool(int(stat[stat.rindex(b")") + 2:].split()[6]) & PF_EXITING)
    except (OSError, ValueError, IndexError):
        return False


class AppWatch:
    def __init__(self, port: int, record_path: str = None, host: str = "127.0.0.1"):
        self.port = port
        # Where the identity of the app we fed is kept across our own restarts: an app that
        # outlived smrd (only the smrd container restarted) still holds its state.
        self.record_path = record_path
        self.enabled = is_local_host(host)
        self.identity: Optional[AppIdentity] = None  # the app being fed, once verified
        self._query = ListenerQuery()
        # check() runs in close mode's worker thread, the rest on the event loop; they never
        # overlap in practice (the executor awaits the adapter), the lock makes sure.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ looking

    def listening(self) -> Optional[frozenset]:
        """Inodes of the sockets listening on the port now (empty: none), or None if this
        process cannot read its sockets at all."""
        with self._lock:
            found = self._query.listeners(self.port)
        return None if found is None else frozenset(found)

    def current(self) -> Optional[AppIdentity]:
        """The identity of the app listening now, or None if nothing does (or it cannot be seen)."""
        sockets = self.listening()
        return self._identify(sockets) if sockets else None

    def _identify(self, sockets: frozenset) -> AppIdentity:
        # The holder's pid: the process with one of the sockets among its open files. Runs once
        # per new app, never per connection. It reads every process's descriptors (a few ms), not
        # /proc/net/tcp (psutil.net_connections): in close mode this host holds tens of thousands
        # of connections in TIME_WAIT, one per request of the last minute, and parsing them took
        # about a second, in the worker thread, holding the GIL. A socket held by a process we
        # may not inspect (another user) leaves the pid unknown: restarts are still seen, the app
        # cannot be ended.
        names = {f"socket:[{inode}]" for inode in sockets}
        try:
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        except OSError:
            return AppIdentity(sockets)
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") not in names:
                        continue
                except OSError:
                    continue  # closed meanwhile
                try:
                    return AppIdentity(sockets, pid, psutil.Process(pid).create_time())
                except psutil.Error:
                    break  # gone meanwhile
        return AppIdentity(sockets)

    def processes(self, identity: AppIdentity) -> list:
        """The app's process (if it is still the one of `identity`) and its descendants."""
        if identity.pid is None:
            return []
        try:
            proc = psutil.Process(identity.pid)
            if proc.create_time() != identity.create_time:
                return []
            return [proc] + proc.children(recursive=True)
        except psutil.Error:
            return []

    def dead(self, identity: AppIdentity) -> bool:
        """Is the process of `identity` known to have exited (gone, or a zombie)? False when it
        runs or cannot be seen. Its listening socket may outlive it by a moment while it exits."""
        if identity.pid is None:
            return False
        try:
            proc = psutil.Process(identity.pid)
            if proc.create_time() != identity.create_time or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False
        return _exiting(identity.pid)

    # ------------------------------------------------------------------ the rule

    def check(self) -> Optional[frozenset]:
        """Called on a new connection to the app, before anything is written on it. Returns the
        inode of the one socket the app being fed listens on (the adapter's close mode verifies
        the next connections against it with the kernel's exact listener lookup, for a bounded
        time, and calls this again on any other answer), or None: check every connection here
        (several listening sockets, or an app on another host: nothing to verify)."""
        if not self.enabled:
            return None
        sockets = self.listening()
        if sockets is None:
            raise AppUnverified(f"cannot read this host's sockets to tell which process listens on "
                                f"app port {self.port}")
        if not sockets:
            raise AppUnverified(f"nothing listens on app port {self.port} any more (the app that "
                                f"accepted the connection is going away)")
        old = self.identity
        if old is None:
            self.adopt(self._identify(sockets))
        elif sockets != old.sockets:
            new = self._identify(sockets)
            raise AppRestarted(f"another socket listens on app port {self.port}: {new.describe()}, "
                               f"was {old.describe()}", new, old)
        return sockets if len(sockets) == 1 else None

    def adopt(self, identity: AppIdentity) -> None:
        """From now on, `identity` is the app being fed."""
        self.identity = identity
        self._record(identity)
        log.debug("feeding the app %s", identity.describe())

    def forget(self) -> None:
        """The next app to listen is taken as a new, empty one (after smrd ended the old one)."""
        self.identity = None

    # ------------------------------------------------------------------ across smrd restarts

    def _record(self, identity: AppIdentity) -> None:
        if self.record_path is None:
            return
        tmp = self.record_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"sockets": sorted(identity.sockets), "pid": identity.pid,
                           "create_time": identity.create_time}, f)
            os.replace(tmp, self.record_path)  # no fsync: a machine crash takes the app with it
        except OSError as e:
            log.warning("cannot record the app's identity in %s: %s", self.record_path, e)

    def fed_before(self) -> Optional[AppIdentity]:
        """The app listening now, if it is the one an earlier smrd process fed (so it is not
        empty); else None."""
        if self.record_path is None or not self.enabled:
            return None
        try:
            with open(self.record_path) as f:
                rec = json.load(f)
            sockets = frozenset(int(i) for i in rec.get("sockets", ()))
            pid = rec.get("pid")
            recorded = AppIdentity(sockets, None if pid is None else int(pid),
                                   None if rec.get("create_time") is None else float(rec["create_time"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        now = self.current()
        if now is None:
            return None
        if recorded.sockets:
            return now if now.sockets == recorded.sockets else None
        # A record from before sockets were recorded: the process's (pid, start time).
        return now if now.same_process(recorded) else None

    def close(self) -> None:
        self._query.close()
