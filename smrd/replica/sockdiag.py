"""Which TCP sockets listen on a port, as the kernel says: Linux's sock_diag netlink interface
(what `ss -ltn` uses), with /proc/net/tcp{,6} as the fallback.

Owns: one question, "the inodes (and owner uids) of the sockets in LISTEN state on port P in this
network namespace", answered from the kernel without looking at any process. A listening socket's
inode is unique while it exists and dies with the process that holds it: a killed app's socket is
gone even while the process itself lingers as a zombie, and a new app's socket has a new inode.
That makes the inode the identity of "the app listening now" (smrd.replica.app_watch).

Never: maps sockets to processes (that needs a scan of every process's file descriptors:
smrd.replica.app_watch does it once per new app, not per connection), or raises for an answer it cannot
get: `listeners()` returns None when neither source is readable.

Cost: the netlink query asks the kernel for listening sockets only, on this port (the kernel
filters listeners by the source port of the request's socket id), so a machine with thousands of
connections in TIME_WAIT (close framing makes them) answers as fast as an idle one; reading
/proc/net/tcp would copy every one of them. What it still costs, ~15 µs of kernel time per address
family here, is the walk over every bucket of the kernel's listening hash table that a dump makes:
too much for every connection in close framing, whose worker (smrd.core's CloseLink) asks the
kernel's exact lookup instead (one socket, one hash lookup) against what this dump last found
(smrd.replica.app_watch says when).
"""
import socket
import struct

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (sport and dport in
# network order, src[4], dst[4], interface, cookie[2]).
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct(">HH16s16sIQ")
# inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_SIZE = _MSG.size + _SOCKID.size + _MSG_TAIL.size


class _Netlink:
    """One NETLINK_SOCK_DIAG socket, opened on first use and kept (a query is then two system
    calls per address family)."""

    def __init__(self):
        self.sock = None
        self.seq = 0
        self.broken = False

    def listening(self, port: int):
        """{inode: uid} of the sockets listening on `port`, or None if netlink cannot answer."""
        if self.broken:
            return None
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                          _NETLINK_SOCK_DIAG)
            found = {}
            for family in (socket.AF_INET, socket.AF_INET6):
                self._dump(family, port, found)
            return found
        except (OSError, AttributeError, ValueError, struct.error):
            # No netlink here (not Linux, a seccomp filter, an old kernel): say so once and let
            # the caller use /proc.
            self.close()
            self.broken = True
            return None

    def _dump(self, family: int, port: int, found: dict) -> None:
        self.seq += 1
        seq = self.seq
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN) + \
            _SOCKID.pack(port, 0, bytes(16), bytes(16), 0, 0)
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY,
                                      _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, msg_seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise ValueError("malformed netlink message")
                start, offset = offset + _NLMSGHDR.size, offset + ((length + 3) & ~3)
                if msg_seq != seq:
                    continue  # an answer to an earlier query that we stopped reading
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, start)
                    if errno == 0:
                        continue
                    raise OSError(-errno, "sock_diag query failed")
                if kind != _SOCK_DIAG_BY_FAMILY or length - _NLMSGHDR.size < _MSG_SIZE:
                    continue
                _, state, _, _ = _MSG.unpack_from(data, start)
                sport = _SOCKID.unpack_from(data, start + _MSG.size)[0]
                _, _, _, uid, inode = _MSG_TAIL.unpack_from(data, start + _MSG.size + _SOCKID.size)
                # The kernel filters by both already; kept as a guard on what it sends.
                if state == _TCP_LISTEN and sport == port:
                    found[inode] = uid

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _from_proc(port: int):
    """{inode: uid} from /proc/net/tcp and tcp6, or None if neither is readable."""
    found, read = {}, False
    want = f"{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # sl local_address rem_address st ... uid timeout inode
                    if len(fields) > 9 and fields[3] == "0A" and fields[1].rsplit(":", 1)[1] == want:
                        found[int(fields[9])] = int(fields[7])
            read = True
        except (OSError, ValueError, IndexError):
            continue
    return found if read else None


class ListenerQuery:
    """listeners(port) -> {inode: uid} of the sockets listening on port now, or None when this
    process can learn nothing about sockets at all."""

    def __init__(self):
        self._netlink = _Netlink()

    def listeners(self, port: int):
        found = self._netlink.listening(port)
        return found if found is not None else _from_proc(port)

    @property
    def source(self) -> str:
        return "/proc/net/tcp" if self._netlink.broken else "netlink sock_diag"

    def close(self):
        self._netlink.close()
