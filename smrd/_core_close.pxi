# _core_close.pxi: close framing's exchanges with the app (CloseLink, CloseRun); included by smrd/_core_cache.pxi (one extension, several source files).
#
# The one part of the core that does I/O, and only this: the app adapter's worker thread hands it
# a batch of requests and it runs one TCP connection per request to the local app, strictly one
# request at a time, without the GIL. It lives here because this is the compiled module: in Python
# each exchange cost about twice the kernel's own work for it, most of it taking the GIL back
# after every system call (against the demo app, batches of 20, with the identity check: ~115 µs
# of the adapter's CPU per request in Python, ~37 here). smrd/_core_py.py holds the pure-Python
# twin, with the same outcomes for the same app behaviour (tests/unit/test_close_link.py runs both
# against the same apps).
# Owns: connecting, verifying each connection before anything is written on it (through the
# caller's check, or the kernel's exact listener lookup against what check last vouched for),
# writing a request, half-closing, reading the reply to EOF within the deadline, and opening the
# next connection while a reply is awaited.
# Never: writes on a connection before the previous reply is complete, writes on one it has not
# verified, lets a connection it will not use look like a request to the app (those are reset,
# never closed with a FIN, which the app would read as the empty request), decides anything about
# what a failure means (it reports; smrd.replica.app_adapter decides), or touches asyncio.

from libc.stdlib cimport calloc

cdef extern from *:
    """
    #include <errno.h>
    #include <poll.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    #ifdef __linux__
    #include <linux/netlink.h>
    #include <linux/sock_diag.h>
    #include <linux/inet_diag.h>
    #endif
    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0
    #endif

    static double smrd_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }

    /* Waits until fd has one of `events` or deadline passes: 1 ready (*revents set), 0 the
     * deadline passed, -1 poll failed (errno). A deadline already past still looks once. */
    static int smrd_wait(int fd, short events, double deadline, short *revents) {
        struct pollfd p;
        double left;
        int ms, r;
        for (;;) {
            left = deadline - smrd_now();
            ms = left <= 0 ? 0 : (int)(left * 1000.0 + 0.999);
            p.fd = fd;
            p.events = events;
            p.revents = 0;
            r = poll(&p, 1, ms);
            if (r < 0 && errno == EINTR)
                continue;
            if (r > 0)
                *revents = p.revents;
            return r;
        }
    }

    /* A non-blocking socket with its connect to sa started (on loopback it is usually complete
     * when connect returns), or -1 with *err: the errno of a connect that failed at once. */
    static int smrd_start_connect(const void *address, socklen_t len, int *err) {
        const struct sockaddr *sa = (const struct sockaddr *)address;
        int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            *err = errno;
            return -1;
        }
        if (connect(fd, sa, len) == 0 || errno == EINPROGRESS || errno == EINTR)
            return fd;
        *err = errno;
        close(fd);
        return -1;
    }

    /* Has fd's connect completed? 1 yes, 0 not by deadline, -1 it failed (*err). */
    static int smrd_connected(int fd, double deadline, int *err) {
        short revents = 0;
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        int r = smrd_wait(fd, POLLOUT, deadline, &revents);
        if (r == 0)
            return 0;
        if (r < 0) {
            *err = errno;
            return -1;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0) {
            *err = errno;
            return -1;
        }
        if (soerr) {
            *err = soerr;
            return -1;
        }
        return 1;
    }

    /* Closes a connection nothing was written on with a reset: a FIN would reach the app as
     * the empty request. */
    static void smrd_discard(int fd) {
        struct linger lg;
        lg.l_onoff = 1;
        lg.l_linger = 0;
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(fd);
    }

    /* Has the app already closed (or reset) a connection nothing was written on? */
    static int smrd_closed_at_once(int fd) {
        char c;
        ssize_t r;
        do {
            r = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r > 0)
            return 0;  /* bytes before any request: the exchange finds the broken contract */
        if (r == 0)
            return 1;
        return errno != EAGAIN && errno != EWOULDBLOCK;
    }

    /* The inode of the TCP socket that a new connection to addr:port from this host would reach
     * now (the kernel's own listener lookup, as for an arriving SYN: one hash lookup, not a dump
     * of every listener), with its state in *state; -1 when the kernel does not say. *nl is the
     * sock_diag socket, opened on first use. */
    static long long smrd_reached(int *nl, int family, const unsigned char *addr,
                                  unsigned short port, unsigned int scope, unsigned int *seq,
                                  unsigned int *state) {
    #ifdef __linux__
        struct {
            struct nlmsghdr nlh;
            struct inet_diag_req_v2 r;
        } req;
        union {
            struct nlmsghdr h;
            char buf[8192];
        } u;
        struct nlmsghdr *h;
        struct inet_diag_msg *msg;
        ssize_t n;
        int tries;
        if (*nl < 0) {
            *nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
            if (*nl < 0)
                return -1;
        }
        memset(&req, 0, sizeof req);
        req.nlh.nlmsg_len = sizeof req;
        req.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
        req.nlh.nlmsg_flags = NLM_F_REQUEST;
        req.nlh.nlmsg_seq = ++*seq;
        req.r.sdiag_family = (unsigned char)family;
        req.r.sdiag_protocol = IPPROTO_TCP;
        req.r.idiag_states = ~0U;
        req.r.id.idiag_sport = htons(port);
        /* The remote end: the app's own address with port 0, which no connection has, so the
         * lookup cannot stop at an established socket and finds the listener. */
        memcpy(req.r.id.idiag_src, addr, family == AF_INET ? 4 : 16);
        memcpy(req.r.id.idiag_dst, addr, family == AF_INET ? 4 : 16);
        req.r.id.idiag_if = scope;
        req.r.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
        req.r.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
        if (send(*nl, &req, sizeof req, 0) != (ssize_t)sizeof req)
            return -1;
        /* The kernel answers within send(); an answer to an earlier query that was not read
         * (none should be) is skipped by its sequence number. */
        for (tries = 0; tries < 4; tries++) {
            n = recv(*nl, u.buf, sizeof u.buf, MSG_DONTWAIT);
            if (n < 0)
                return -1;
            h = &u.h;
            if (!NLMSG_OK(h, n))
                return -1;
            if (h->nlmsg_seq != *seq)
                continue;
            if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY
                    || h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
                return -1;
            msg = (struct inet_diag_msg *)NLMSG_DATA(h);
            *state = msg->idiag_state;
            return (long long)msg->idiag_inode;
        }
        return -1;
    #else
        return -1;
    #endif
    }

    /* Writes p[0:n] and half-closes by deadline: 0 done, 1 timed out, -1 failed (*err). */
    static int smrd_send_request(int fd, const char *p, Py_ssize_t n, double deadline, int *err) {
        Py_ssize_t off = 0;
        ssize_t r;
        short revents;
        while (off < n) {
            r = send(fd, p + off, (size_t)(n - off), MSG_NOSIGNAL | MSG_DONTWAIT);
            if (r >= 0) {
                off += r;
                continue;
            }
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                *err = errno;
                return -1;
            }
            if (smrd_now() >= deadline)
                return 1;
            r = smrd_wait(fd, POLLOUT, deadline, &revents);
            if (r == 0)
                return 1;
            if (r < 0) {
                *err = errno;
                return -1;
            }
        }
        if (shutdown(fd, SHUT_WR) < 0) {
            *err = errno;
            return -1;
        }
        return 0;
    }

    /* Reads the reply to EOF by deadline into a malloc'ed *out (*len bytes): 0 done, 1 timed
     * out, 2 more than max bytes (*len: how many had arrived), 3 out of memory, -1 failed
     * (*err). The deadline is checked after every read too: an app cannot keep an exchange
     * alive by trickling bytes. */
    static int smrd_read_reply(int fd, Py_ssize_t max, double deadline, char **out,
                               Py_ssize_t *len, int *err) {
        char *buf = NULL, *grown;
        Py_ssize_t have = 0, cap = 0, want;
        ssize_t r;
        short revents;
        int first = 1;
        *out = NULL;
        *len = 0;
        for (;;) {
            if (!first) {
                if (have == cap) {
                    want = cap ? cap * 2 : 4096;
                    if (want > max + 65536)
                        want = max + 65536;
                    grown = (char *)realloc(buf, (size_t)(want > 0 ? want : 1));
                    if (grown == NULL) {
                        free(buf);
                        return 3;
                    }
                    buf = grown;
                    cap = want;
                }
                r = recv(fd, buf + have, (size_t)(cap - have), MSG_DONTWAIT);
                if (r > 0) {
                    have += r;
                    if (have > max) {
                        free(buf);
                        *len = have;
                        return 2;
                    }
                    if (smrd_now() >= deadline) {
                        free(buf);
                        return 1;
                    }
                    continue;
                }
                if (r == 0)
                    break;
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    free(buf);
                    *err = errno;
                    return -1;
                }
                if (smrd_now() >= deadline) {
                    free(buf);
                    return 1;
                }
            }
            /* Right after the request nothing can have come yet: wait before the first read. */
            first = 0;
            r = smrd_wait(fd, POLLIN, deadline, &revents);
            if (r == 0) {
                free(buf);
                return 1;
            }
            if (r < 0) {
                free(buf);
                *err = errno;
                return -1;
            }
        }
        *out = buf;
        *len = have;
        return 0;
    }
    """
    double smrd_now() nogil
    int smrd_start_connect(const void *sa, unsigned int length, int *err) nogil
    int smrd_connected(int fd, double deadline, int *err) nogil
    void smrd_discard(int fd) nogil
    int smrd_closed_at_once(int fd) nogil
    long long smrd_reached(int *nl, int family, const unsigned char *addr, unsigned short port,
                           unsigned int scope, unsigned int *seq, unsigned int *state) nogil
    int smrd_send_request(int fd, const char *p, Py_ssize_t n, double deadline, int *err) nogil
    int smrd_read_reply(int fd, Py_ssize_t max, double deadline, char **out, Py_ssize_t *length,
                        int *err) nogil
    int c_close "close" (int fd) nogil

import socket as _socket
import sys as _sys

cdef enum:
    _MAX_ADDRS = 8      # addresses a host name may resolve to that are tried in turn
    _MAX_INODES = 8     # listening sockets a check may vouch for at once
    _TCP_LISTEN = 10
    _SOCKADDR_MAX = 28  # sizeof(struct sockaddr_in6)


cdef class CloseRun:
    """What one CloseLink.exchange() call did, for the caller to act on. ``stop`` is the one
    field the caller writes while a call runs (from another thread): no further exchange starts.

    ``failed``: the connection for request len(replies) could not be used, nothing was written:
    ("connect", errno or message), ("connect-timeout", None) or ("closed", None).
    ``lost``: request len(replies) was written and its reply did not come whole: ("timeout",
    None), ("error", errno) or ("too-large", bytes received); it is in doubt.
    ``raised``: what check raised (nothing was written on that connection)."""
    cdef public bint stop
    cdef public Py_ssize_t connections
    cdef public bint timed_out
    cdef public object failed
    cdef public object lost
    cdef public object raised

    def __init__(self):
        self.stop = False
        self.connections = 0
        self.timed_out = False
        self.failed = None
        self.lost = None
        self.raised = None


cdef class CloseLink:
    """Close framing's exchanges with one app: ``exchange()`` runs requests on it, one connection
    each, strictly one at a time, without the GIL between checks.

    ``addresses``: [(family, sockaddr)] as socket.getaddrinfo gives them (AF_INET / AF_INET6),
    tried in turn for each connection. ``timeout_s`` bounds a connect, and the writing of a
    request with its whole reply. ``max_reply`` bounds a reply. ``recheck_s``: how long what check
    vouched for (the listening sockets' inodes) is trusted before check is asked again.
    ``ahead``: open the next request's connection while a reply is awaited."""
    cdef readonly object addresses
    cdef readonly double timeout_s
    cdef readonly Py_ssize_t max_reply
    cdef readonly double recheck_s
    cdef readonly bint ahead
    cdef int naddr
    cdef unsigned char sa[_MAX_ADDRS][_SOCKADDR_MAX]
    cdef unsigned int salen[_MAX_ADDRS]
    cdef int family[_MAX_ADDRS]
    cdef unsigned char host[_MAX_ADDRS][16]
    cdef unsigned short port[_MAX_ADDRS]
    cdef unsigned int scope[_MAX_ADDRS]

    def __init__(self, addresses, double timeout_s, Py_ssize_t max_reply, double recheck_s=0.05,
                 bint ahead=True):
        cdef Py_ssize_t i
        cdef bytes raw, packed
        addresses = list(addresses)
        if not 0 < len(addresses) <= _MAX_ADDRS:
            raise ValueError(f"between 1 and {_MAX_ADDRS} addresses, not {len(addresses)}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        if max_reply < 0:
            raise ValueError(f"max_reply must be non-negative, not {max_reply!r}")
        for i, (fam, sockaddr) in enumerate(addresses):
            raw = _socket.inet_pton(fam, sockaddr[0].split("%")[0])
            if fam == _socket.AF_INET:
                packed = (int(fam).to_bytes(2, _sys.byteorder) + int(sockaddr[1]).to_bytes(2, "big")
                          + raw + bytes(8))
                self.scope[i] = 0
            elif fam == _socket.AF_INET6:
                packed = (int(fam).to_bytes(2, _sys.byteorder) + int(sockaddr[1]).to_bytes(2, "big")
                          + int(sockaddr[2]).to_bytes(4, "big") + raw
                          + int(sockaddr[3]).to_bytes(4, _sys.byteorder))
                self.scope[i] = sockaddr[3]
            else:
                raise ValueError(f"address family {fam!r} is neither AF_INET nor AF_INET6")
            memcpy(self.sa[i], PyBytes_AS_STRING(packed), len(packed))
            self.salen[i] = len(packed)
            self.family[i] = fam
            memcpy(self.host[i], PyBytes_AS_STRING(raw), len(raw))
            self.port[i] = sockaddr[1]
        self.naddr = len(addresses)
        self.addresses = addresses
        self.timeout_s = timeout_s
        self.max_reply = max_reply
        self.recheck_s = recheck_s
        self.ahead = ahead

    def exchange(self, requests, list replies, CloseRun run, check=None):
        """Runs requests[len(replies):] in order, one connection each, appending the replies,
        until all are answered, one cannot be (run.failed, run.lost, run.raised say why), or
        run.stop. Every connection is verified before anything is written on it: check() is
        called after it connected (and must raise if it may not be used); when check returns the
        inodes of the listening sockets it vouches for, the connections after it are verified by
        the kernel's exact listener lookup against those instead, for recheck_s, and any answer
        but one of them goes back to check."""
        cdef Py_ssize_t start = len(replies), count, i, k
        cdef tuple todo
        cdef const char **req = NULL
        cdef Py_ssize_t *reqlen = NULL
        cdef char **out = NULL
        cdef Py_ssize_t *outlen = NULL
        cdef Py_ssize_t done = 0
        cdef int fd = -1, nxt = -1, nl = -1, err = 0, r, a, used = -1
        cdef unsigned int seq = 0, state = 0
        cdef long long inode
        cdef long long trusted[_MAX_INODES]
        cdef int ntrusted = -1           # -1: nothing vouched for: ask check
        cdef double trusted_until = 0.0, deadline
        cdef bint has_check = check is not None, fresh, ok
        cdef object spec
        todo = tuple(requests[start:])  # held: the caller's list may go while this runs
        count = len(todo)
        if count == 0:
            return
        for i in range(count):
            if not PyBytes_CheckExact(todo[i]):
                raise TypeError(f"requests must be bytes, not {type(todo[i]).__name__}")
        req = <const char **>malloc(count * sizeof(char *))
        reqlen = <Py_ssize_t *>malloc(count * sizeof(Py_ssize_t))
        out = <char **>calloc(count, sizeof(char *))
        outlen = <Py_ssize_t *>calloc(count, sizeof(Py_ssize_t))
        if req == NULL or reqlen == NULL or out == NULL or outlen == NULL:
            free(req)
            free(reqlen)
            free(out)
            free(outlen)
            raise MemoryError()
        for i in range(count):
            req[i] = PyBytes_AS_STRING(todo[i])
            reqlen[i] = PyBytes_GET_SIZE(todo[i])
        try:
            with nogil:
                i = 0
                while i < count and not run.stop:
                    # -- a connection: the one opened ahead if it is up, else a fresh one
                    fd = -1
                    fresh = False
                    if nxt >= 0:
                        if smrd_connected(nxt, 0.0, &err) == 1:
                            fd = nxt
                        else:
                            smrd_discard(nxt)
                        nxt = -1
                    if fd < 0:
                        fresh = True
                        err = -1  # -1: no address answered in time
                        for a in range(self.naddr):
                            deadline = smrd_now() + self.timeout_s
                            fd = smrd_start_connect(self.sa[a], self.salen[a], &err)
                            if fd < 0:
                                continue
                            r = smrd_connected(fd, deadline, &err)
                            if r == 1:
                                used = a
                                break
                            smrd_discard(fd)
                            fd = -1
                            if r == 0:
                                err = -1
                        if fd < 0:
                            with gil:
                                if err == -1:
                                    run.timed_out = True
                                    run.failed = ("connect-timeout", None)
                                else:
                                    run.failed = ("connect", err)
                            break
                    run.connections += 1
                    # -- verified before anything is written on it
                    if has_check:
                        ok = False
                        if ntrusted >= 0 and smrd_now() < trusted_until:
                            inode = smrd_reached(&nl, self.family[used], self.host[used],
                                                 self.port[used], self.scope[used], &seq, &state)
                            if inode >= 0 and state == _TCP_LISTEN:
                                for k in range(ntrusted):
                                    if trusted[k] == inode:
                                        ok = True
                                        break
                        if not ok:
                            with gil:
                                try:
                                    spec = check()
                                except BaseException as exc:
                                    run.raised = exc
                                    spec = None
                                    ok = False
                                else:
                                    ok = True
                                    ntrusted = _trusted(spec, trusted)
                                    trusted_until = smrd_now() + self.recheck_s
                            if not ok:
                                smrd_discard(fd)
                                fd = -1
                                break
                    if smrd_closed_at_once(fd):
                        smrd_discard(fd)
                        fd = -1
                        if fresh:
                            with gil:
                                run.failed = ("closed", None)
                            break
                        continue  # the one opened ahead went stale: a fresh one, same request
                    if run.stop:
                        smrd_discard(fd)
                        fd = -1
                        break
                    # -- the exchange
                    deadline = smrd_now() + self.timeout_s
                    r = smrd_send_request(fd, req[i], reqlen[i], deadline, &err)
                    if r == 0:
                        if self.ahead and i + 1 < count and not run.stop:
                            nxt = smrd_start_connect(self.sa[used], self.salen[used], &err)
                        r = smrd_read_reply(fd, self.max_reply, deadline, &out[i], &outlen[i],
                                            &err)
                    c_close(fd)  # after EOF, or abandoned: never linger, never read again
                    fd = -1
                    if r != 0:
                        with gil:
                            if r == 1:
                                run.timed_out = True
                                run.lost = ("timeout", None)
                            elif r == 2:
                                run.lost = ("too-large", outlen[i])
                                outlen[i] = 0
                            elif r == -1:
                                run.lost = ("error", err)
                            else:
                                run.lost = ("error", "out of memory")
                        break
                    i += 1
                    done = i
        finally:
            if fd >= 0:
                smrd_discard(fd)
            if nxt >= 0:
                smrd_discard(nxt)
            if nl >= 0:
                c_close(nl)
            try:
                for k in range(done):
                    replies.append(PyBytes_FromStringAndSize(out[k], outlen[k]))
            finally:
                for k in range(count):
                    free(out[k])
                free(out)
                free(outlen)
                free(req)
                free(reqlen)


cdef int _trusted(object spec, long long *trusted) noexcept:
    """How many listening-socket inodes spec vouches for, copied to trusted; -1: none (check is
    asked again for the next connection)."""
    cdef int n = 0
    if spec is None:
        return -1
    try:
        items = list(spec)
        if len(items) > _MAX_INODES:
            return -1
        for item in items:
            if not PyLong_CheckExact(item) or item < 0:
                return -1
            trusted[n] = item
            n += 1
    except Exception:
        return -1
    return n
