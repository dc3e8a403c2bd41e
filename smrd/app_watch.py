# Which process is the app: the one listening on the app's port, identified by (pid, start
# time) through psutil. In a Kubernetes pod with shareProcessNamespace: true the smrd container
# sees the app container's processes; locally it sees everything its user may see.
# Owns: noticing that the app was replaced by a new (empty) process. Never: touches the app,
# or guesses: when it cannot see the app's process it says so (identity None) and the replica
# falls back to stopping execution on any doubt.
import logging

import psutil

from .app_adapter import AppError

log = logging.getLogger(__name__)


class AppRestarted(AppError):
    """The app's process changed since requests were last executed on it: its state is gone."""


class AppWatch:
    def __init__(self, port: int):
        self.port = port
        self.identity = None     # (pid, create_time) of the app we have been feeding
        self._proc = None
        self.visible = True      # False once we learned psutil cannot see the app's process

    def find(self):
        """(pid, create_time) of the process listening on the port now, or None."""
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.AccessDenied, PermissionError, OSError):
            return None
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port and c.pid:
                try:
                    return (c.pid, psutil.Process(c.pid).create_time())
                except psutil.Error:
                    return None
        return None

    def adopt(self) -> bool:
        """Take the current listener as the app being fed. False if it cannot be seen."""
        found = self.find()
        if found is None:
            if self.visible:
                self.visible = False
                log.warning("cannot see the process listening on app port %d (different user or "
                            "PID namespace?): an app restart cannot be told from a dropped "
                            "connection, so execution stops on any doubt", self.port)
            return False
        self.visible = True
        self.identity = found
        self._proc = psutil.Process(found[0])
        return True

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
