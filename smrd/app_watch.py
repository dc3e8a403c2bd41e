# Which process is the app: the one listening on the app's port, identified by (pid, start
# time) through psutil. In a Kubernetes pod with shareProcessNamespace: true the smrd container
# sees the app container's processes; locally it sees everything its user may see.
# Owns: noticing that the app was replaced by a new (empty) process. Never: touches the app,
# or guesses: when it cannot see the app's process it says so (identity None) and the replica
# falls back to stopping execution on any doubt.
import json
import logging
import os

import psutil

from .app_adapter import AppError

log = logging.getLogger(__name__)


ABSENT = "absent"   # nothing listens on the port
HIDDEN = "hidden"   # something listens, but psutil cannot tell which process
# Connections that succeed while no listener is seen: once is an app dying as we connected; this
# many in a row means we cannot see its socket at all (another network namespace), and looking
# again on every connection (every request, in close mode) would cost a scan of all sockets each.
ABSENT_LIMIT = 3


class AppRestarted(AppError):
    """The app's process changed since requests were last executed on it: its state is gone."""


class AppWatch:
    def __init__(self, port: int, record_path: str = None):
        self.port = port
        # Where the identity of the app process we fed is kept across our own restarts: an app
        # that outlived smrd (only the smrd container restarted) still holds its state.
        self.record_path = record_path
        self.identity = None     # (pid, create_time) of the app we have been feeding
        self._proc = None
        self.visible = True      # False once we learned psutil cannot see the app's process
        self._absent = 0         # connections in a row that found nothing listening

    def find(self):
        """(pid, create_time) of the process listening on the port now, or None."""
        found = self._listener()
        return found if isinstance(found, tuple) else None

    def _listener(self):
        """(pid, create_time) of the listener; ABSENT if nothing listens on the port (an app
        dying or not up yet); HIDDEN if something listens but its process cannot be seen."""
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.AccessDenied, PermissionError, OSError):
            return HIDDEN
        hidden = False
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port:
                if not c.pid:
                    hidden = True
                    continue
                try:
                    return (c.pid, psutil.Process(c.pid).create_time())
                except psutil.Error:
                    hidden = True
        return HIDDEN if hidden else ABSENT

    def adopt(self) -> bool:
        """Take the current listener as the app being fed. False if there is none (tried again
        on the next connection) or it cannot be seen (given up: see check)."""
        found = self._listener()
        if found is ABSENT:
            # We just connected, so the app that accepted is going away: not a reason to stop
            # watching for good (a CI run once lost restart detection to this race).
            self._absent += 1
            if self._absent < ABSENT_LIMIT:
                return False
            found = HIDDEN
        if found is HIDDEN:
            if self.visible:
                self.visible = False
                log.warning("cannot see the process listening on app port %d (different user, PID "
                            "or network namespace?): an app restart cannot be told from a dropped "
                            "connection, so execution stops on any doubt", self.port)
            return False
        try:
            proc = psutil.Process(found[0])
        except psutil.Error:
            return False  # gone since: as ABSENT
        self.visible = True
        self._absent = 0
        self.identity = found
        self._proc = proc
        self._record(found)
        return True

    def _record(self, identity) -> None:
        if self.record_path is None:
            return
        tmp = self.record_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"pid": identity[0], "create_time": identity[1]}, f)
            os.replace(tmp, self.record_path)  # no fsync: a machine crash takes the app with it
        except OSError as e:
            log.warning("cannot record the app's identity in %s: %s", self.record_path, e)

    def fed_before(self):
        """(pid, create_time) if the app listening now is the very process an earlier smrd
        incarnation fed requests to (so it is not empty), else None."""
        if self.record_path is None:
            return None
        try:
            with open(self.record_path) as f:
                rec = json.load(f)
            recorded = (int(rec["pid"]), float(rec["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        found = self.find()
        return found if found == recorded else None

    def same(self) -> bool:
        """Is the app still the process we adopted? (True when we never could tell.)"""
        if self.identity is None:
            return True
        # is_running() re-reads the process's start time and compares it with the one psutil
        # cached at adopt(): one /proc read per new connection (close mode: per request).
        try:
            return self._proc.is_running()
        except psutil.Error:
            return False

    def check(self) -> None:
        """Called on every new connection to the app, before anything is written on it."""
        if self.identity is None:
            if self.visible:
                self.adopt()
        elif not self.same():
            raise AppRestarted(f"the app's process changed (was pid {self.identity[0]})")
