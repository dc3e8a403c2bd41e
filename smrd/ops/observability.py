"""Observability for one smrd process: Prometheus /metrics, /healthz and /readyz.

Owns: a private CollectorRegistry per process (tests run several in one interpreter, so the
global registry is never touched), a collector that turns the driver's plain counters into
Prometheus series *at scrape time*, three cheap histograms the drivers feed, the psutil figures
of this process, and a small HTTP/1.1 server on the driver's own asyncio loop.
Never: sits on the hot path (the drivers keep counting in their dicts; nothing here runs per
request except the optional observe_* calls, ~0.5 µs each), starts a thread (a handler that
answers on the driver's loop is what makes /healthz mean "the loop is responsive"), decides
readiness (the driver's ready() callback does; docs/operations.md states the rules), or lets a
misbehaving HTTP client hold anything for longer than request_timeout_s.

Threads: the observe_* methods and the scrape both run on the driver's loop thread, which is
why the histograms need no lock. Calling observe_* from another thread is not supported.
"""
import asyncio
import bisect
import ipaddress
import logging
from typing import Callable, NamedTuple, Optional, Tuple

import psutil

from ..__version__ import __version__
from ..framing.errors import FramingError
from ..framing.http import parse_field, parse_request_line

log = logging.getLogger(__name__)

# prometheus_client (with http.server, email and wsgiref under it) is a fifth of an smrd
# process's import time, and nothing of it is needed before the first scrape: it is imported
# then, by _load_prometheus, which binds these names.
CONTENT_TYPE_LATEST = CollectorRegistry = generate_latest = None
CounterMetricFamily = GaugeMetricFamily = HistogramMetricFamily = floatToGoString = None


def _load_prometheus() -> None:
    global CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    global CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, floatToGoString
    if CollectorRegistry is not None:
        return
    import prometheus_client as pc
    import prometheus_client.core as core
    import prometheus_client.utils as utils
    CONTENT_TYPE_LATEST, generate_latest = pc.CONTENT_TYPE_LATEST, pc.generate_latest
    CounterMetricFamily, GaugeMetricFamily = core.CounterMetricFamily, core.GaugeMetricFamily
    HistogramMetricFamily, floatToGoString = core.HistogramMetricFamily, utils.floatToGoString
    CollectorRegistry = pc.CollectorRegistry  # last: it marks the names as bound

ROLES = {"server": "replica", "client": "gateway"}  # role -> name of its id label
REPLICA_STATUSES = ("normal", "view-change")        # smrd.protocol.replica NORMAL, VIEW_CHANGE

# Requests per decided batch: powers of two up to past the largest batch_max_requests in use.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Seconds: from a loopback round trip to an election timeout and a gateway deadline (10 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
# Seconds of one fsync: from tmpfs and NVMe (tens of µs) to a disk in trouble.
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 5.0)

MAX_LINE = 8192          # request line or one header line; a scraper sends a few hundred bytes
MAX_HEADERS = 100
MAX_CONNECTIONS = 64     # Prometheus and the kubelet need a handful; the rest is abuse


def _num(v) -> float:
    return 0.0 if v is None else float(v)


def _flag(v) -> float:
    # `halted` is None or the reason text; `app_ready` a bool.
    return 1.0 if v else 0.0


class Series(NamedTuple):
    key: str          # key in the driver's snapshot dict
    name: str         # metric name; a counter's "_total" is added by the exposition
    kind: str         # "counter" | "gauge"
    help: str
    optional: bool = False   # missing from the snapshot is expected (feature not there yet)
    convert: Callable = _num


C, G = "counter", "gauge"

SERVER_SERIES = (
    Series("requests_received", "smrd_requests_received", C,
           "Requests received from gateways, every copy (retransmissions included)."),
    Series("requests_executed", "smrd_requests_executed", C, "Requests executed on the local app."),
    Series("requests_deduplicated", "smrd_requests_deduplicated", C,
           "Decided requests not executed because they already were (answered from the reply cache) "
           "or were refused (too old, unknown session)."),
    Series("requests_dropped", "smrd_requests_dropped", C,
           "Requests dropped because the pending queue was full (the gateway retransmits)."),
    Series("requests_forwarded", "smrd_requests_forwarded", C, "Requests forwarded to the leader."),
    Series("requests_relayed", "smrd_requests_relayed", C,
           "Requests a gateway sent to this follower alone (taking it for the leader), passed on to the leader."),
    Series("bad_messages", "smrd_bad_messages", C, "Malformed or unauthorised frames dropped."),
    Series("stale_messages", "smrd_stale_messages", C, "Protocol messages ignored as belonging to an old view."),
    Series("view_changes", "smrd_view_changes", C, "View changes this replica started or joined."),
    Series("catchup_requests", "smrd_catchup_requests", C, "Catch-up requests this replica sent."),
    Series("app_errors", "smrd_app_errors", C, "Failed attempts to talk to the local app."),
    Series("app_timeouts", "smrd_app_timeouts", C, "Local app replies that did not come in time."),
    Series("app_reconnects", "smrd_app_reconnects", C, "Reconnections to the local app."),
    Series("app_retries", "smrd_app_retries", C, "Retries while the local app was unreachable."),
    Series("app_ready", "smrd_app_up", G,
           "1 unless the last attempt to reach the local app failed, else 0.", convert=_flag),
    Series("halted", "smrd_execution_halted", G,
           "1 while execution is halted: the app could not be reset (no permission to end it, no new "
           "app within app_restart_timeout_s, resets failing in a row); the reason is in /readyz and "
           "the log (event=execution_halted). smrd keeps retrying by itself.", convert=_flag),
    Series("can_execute", "smrd_execution_ready", G,
           "1 while this replica can execute (its app accounted for and answering); 0 while it "
           "is halted, resets or rebuilds its app, or the app is down.", convert=_flag),
    Series("app_resets", "smrd_app_resets", C,
           "Resets of an app whose state smrd could not account for (smrd restarted while the app "
           "kept running, a request failed midway, a hook failed, a divergence): restored from a "
           "checkpoint, or ended and started again, then replayed."),
    Series("execution_halts", "smrd_execution_halts", C, "Times execution halted (see smrd_execution_halted)."),
    Series("divergences_reported", "smrd_divergences_reported", C,
           "Gateway reports that this replica's reply disagreed with a majority's (each resets the app)."),
    Series("view", "smrd_view", G, "Current view (regency) number."),
    Series("leader", "smrd_leader_id", G, "Replica id of the current view's leader."),
    Series("commit", "smrd_commit_instance", G, "Highest consensus instance decided without gaps."),
    Series("known_commit", "smrd_known_commit_instance", G,
           "Highest commit point heard of from any replica (the catch-up target)."),
    Series("executed", "smrd_executed_instance", G, "Highest instance whose requests were executed and answered."),
    Series("pending", "smrd_pending_requests", G, "Requests received and not yet proposed."),
    Series("log_bytes", "smrd_log_bytes", G, "Size of the write-ahead log on disk."),
    Series("log_records", "smrd_log_records", G, "Records in the write-ahead log."),
    Series("wal_bytes_written", "smrd_wal_written_bytes", C, "Bytes written to the write-ahead log by this process."),
    Series("wal_records_written", "smrd_wal_written_records", C, "Records written to the write-ahead log by this process."),
    Series("wal_syncs", "smrd_wal_syncs", C, "Group commits (one write, one fsync under durability=fsync)."),
    Series("state_transfer_bytes", "smrd_state_transfer_bytes", G,
           "Bytes received in the current (or last) state transfer; 0 when none.", optional=True),
    Series("state_transfer_size", "smrd_state_transfer_size_bytes", G,
           "Total bytes of the current (or last) state transfer; 0 when none.", optional=True),
    Series("checkpoint", "smrd_checkpoint_instance", G,
           "Instance of the newest stored checkpoint (0: none; needs snapshot hooks).", optional=True),
    Series("low", "smrd_log_first_instance", G,
           "The in-memory log starts after this instance (older ones are only in checkpoints).",
           optional=True),
    Series("transfer_served_bytes", "smrd_state_transfer_served_bytes", C,
           "Checkpoint bytes this replica sent to peers catching up.", optional=True),
    Series("transfers_completed", "smrd_state_transfers", C,
           "State transfers this replica completed (checkpoints fetched and installed).", optional=True),
    Series("app_restarts", "smrd_app_restarts", C,
           "App restarts detected (its state was rebuilt by replaying the log)."),
    Series("connections_refused", "smrd_connections_refused", C,
           "Connections refused by CURVE authentication (unlisted or missing key)."),
    Series("messages_sent", "smrd_messages_sent", C,
           "ZeroMQ messages this replica sent (to peers and gateways; each costs a wake-up of "
           "ZeroMQ's I/O thread, so messages per request is what batching is for).", optional=True),
    Series("messages_received", "smrd_messages_received", C,
           "ZeroMQ messages this replica received (from peers and gateways).", optional=True),
    Series("n", "smrd_cluster_replicas", G, "Replicas in the configuration."),
    Series("membership_index", "smrd_membership_index", G,
           "Membership changes applied since the bootstrap membership (its index).", optional=True),
    Series("membership_voters", "smrd_voters", G, "Voters in the applied membership.", optional=True),
    Series("membership_learners", "smrd_learners", G, "Learners in the applied membership.", optional=True),
    Series("membership_changes", "smrd_membership_changes", C,
           "Membership changes this replica applied (live or replaying its log).", optional=True),
    Series("membership_refused", "smrd_membership_changes_refused", C,
           "Membership changes this replica refused as the leader, before ordering them.", optional=True),
)

# What a replica is in the replica group (smrd.protocol.membership roles).
MEMBER_ROLES = ("voter", "learner", "none")

GATEWAY_SERIES = (
    Series("requests", "smrd_requests_received", C, "Requests received from outside clients."),
    Series("replies", "smrd_requests_replied", C, "Requests answered with the replicas' reply."),
    Series("retransmits", "smrd_requests_retransmitted", C, "Requests sent to the replicas again after a timeout."),
    Series("timeouts", "smrd_requests_timed_out", C, "Requests that got no reply within the deadline."),
    Series("errors", "smrd_request_errors", C,
           "Requests answered with an smrd error (malformed, too large, refused by the replicas)."),
    Series("divergences", "smrd_divergences", C, "Replies from different replicas that differed for one request."),
    Series("connections", "smrd_client_connections", C, "Outside client connections accepted."),
    Series("inflight", "smrd_requests_inflight", G, "Requests sent to the replicas and not yet answered."),
    Series("bad_messages", "smrd_bad_messages", C, "Malformed frames from replicas dropped."),
    Series("replicas_reachable", "smrd_replicas_reachable", G, "Replicas that answered recently."),
    Series("replicas_not_executing", "smrd_replicas_not_executing", G,
           "Replicas that said they cannot execute now (new requests go to every replica then).",
           optional=True),
    Series("n", "smrd_cluster_replicas", G, "Replicas in the configuration."),
)


class Histogram:
    """A fixed-bucket histogram without a lock (loop thread only): observe() is one bisect,
    one list increment and one float addition, ~0.35-0.45 µs; prometheus_client's Histogram
    takes a lock per observation and cost ~2.3 µs on the same machine (CPython 3.11, timeit)."""

    __slots__ = ("name", "help", "bounds", "counts", "sum")

    def __init__(self, name: str, help: str, bounds):
        self.name = name
        self.help = help
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is (last bound, +Inf)
        self.sum = 0.0

    def observe(self, value, _bisect=bisect.bisect_left) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' "le" (less or equal).
        self.counts[_bisect(self.bounds, value)] += 1
        self.sum += value

    def family(self, label_names, label_values):
        buckets, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", total + self.counts[-1]))
        fam = HistogramMetricFamily(self.name, self.help, labels=label_names)
        fam.add_metric(label_values, buckets, self.sum)
        return fam


def _ignore(value) -> None:
    """observe_* of a histogram the role does not have (see Observability)."""


class _Collector:
    # A separate object so that the registry sees only collect(), nothing else of Observability.
    def __init__(self, obs: "Observability"):
        self._obs = obs

    def collect(self):
        return self._obs._collect()


class Observability:
    """Metrics and health of one smrd process.

    role: "server" (series labelled role="server", replica=ID) or "client" (role="client",
    gateway=ID). snapshot(): the driver's current numbers, a flat dict (keys: the `key` of each
    SERVER_SERIES or GATEWAY_SERIES entry, plus "status" for a server; other keys are ignored,
    a missing one is exported as 0 and logged once); called at each scrape, on the loop.
    ready(): (bool, reason); called at each /readyz and each scrape.

    Hot-path methods (bound once, so a call is a plain function call):
      server: observe_batch(requests_in_batch), observe_consensus_latency(seconds),
              observe_wal_fsync(seconds) (from the thread that syncs the log, if not the loop's:
              one writer at a time, under the log's sync lock)
      client: observe_request_latency(seconds)
    The other role's methods accept and ignore their argument.
    """

    def __init__(self, role: str, node_id: int, snapshot: Callable[[], dict],
                 ready: Callable[[], Tuple[bool, str]], *, request_timeout_s: float = 10.0):
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, not {role!r}")
        self.role = role
        self.node_id = int(node_id)
        self._snapshot = snapshot
        self._ready = ready
        self.request_timeout_s = request_timeout_s
        self.label_names = ["role", ROLES[role]]
        self.label_values = [role, str(self.node_id)]
        self.series = SERVER_SERIES if role == "server" else GATEWAY_SERIES
        self._warned_missing = set()
        self._ready_failures = 0
        # Created once: psutil.Process caches what it can (create time, page size) between calls.
        self._process = psutil.Process()

        self.batch = self.consensus_latency = self.request_latency = self.wal_fsync = None
        self.observe_batch = self.observe_consensus_latency = self.observe_request_latency = _ignore
        self.observe_wal_fsync = _ignore
        if role == "server":
            self.batch = Histogram("smrd_batch_requests", "Requests per decided batch.", BATCH_BUCKETS)
            self.consensus_latency = Histogram(
                "smrd_consensus_latency_seconds",
                "Time from proposing a batch to its decision, per batch.", LATENCY_BUCKETS)
            self.wal_fsync = Histogram(
                "smrd_wal_fsync_seconds",
                "Time of each write-ahead-log fsync (durability=fsync; none otherwise).", FSYNC_BUCKETS)
            self.observe_batch = self.batch.observe
            self.observe_consensus_latency = self.consensus_latency.observe
            self.observe_wal_fsync = self.wal_fsync.observe
        else:
            self.request_latency = Histogram(
                "smrd_request_latency_seconds",
                "Time from receiving an outside request to having its reply, per request.",
                LATENCY_BUCKETS)
            self.observe_request_latency = self.request_latency.observe

        self._registry = None  # created at the first scrape (see _load_prometheus)

        self.port: Optional[int] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._handlers = set()

    # ------------------------------------------------------------------ readiness

    def check_ready(self) -> Tuple[bool, str]:
        """ready(), made safe: a failing callback reads as "not ready", with why."""
        try:
            ok, reason = self._ready()
            return bool(ok), str(reason)
        except Exception as e:
            self._ready_failures += 1
            # Probes come every few seconds: log the first failures, then rarely.
            if self._ready_failures <= 3 or self._ready_failures % 100 == 0:
                log.exception("readiness callback failed (%d times)", self._ready_failures)
            return False, f"readiness check failed: {e!r}"

    # ------------------------------------------------------------------ metrics

    @property
    def registry(self):
        if self._registry is None:
            _load_prometheus()
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
        return self._registry

    def render(self) -> bytes:
        """The /metrics body (Prometheus text format)."""
        registry = self.registry  # first: it binds generate_latest at the first scrape
        return generate_latest(registry)

    def _collect(self):
        names, values = self.label_names, self.label_values
        snap = self._snapshot()
        missing = [s.key for s in self.series if s.key not in snap and not s.optional]
        if self.role == "server":
            missing += [k for k in ("status",) if k not in snap]
        new = set(missing) - self._warned_missing
        if new:
            # A missing key is an integration bug, not a reason to fail the scrape: say so once.
            self._warned_missing |= new
            log.warning("metrics snapshot lacks %s; exported as 0", ", ".join(sorted(new)))
        for s in self.series:
            cls = CounterMetricFamily if s.kind == C else GaugeMetricFamily
            fam = cls(s.name, s.help, labels=names)
            fam.add_metric(values, s.convert(snap.get(s.key)))
            yield fam

        if self.role == "server":
            yield from self._server_families(snap, names, values)
            yield self.batch.family(names, values)
            yield self.consensus_latency.family(names, values)
            yield self.wal_fsync.family(names, values)
        else:
            yield self.request_latency.family(names, values)

        ready = GaugeMetricFamily("smrd_ready", "1 while /readyz answers 200, else 0.", labels=names)
        ready.add_metric(values, 1.0 if self.check_ready()[0] else 0.0)
        yield ready
        info = GaugeMetricFamily("smrd_build_info", "Always 1; the version is in the labels.",
                                 labels=names + ["version"])
        info.add_metric(values + [__version__], 1.0)
        yield info
        yield from self._process_families(names, values)

    def _server_families(self, snap, names, values):
        status = snap.get("status")
        fam = GaugeMetricFamily("smrd_replica_status",
                                "1 for the replica's current status, 0 for the others.",
                                labels=names + ["status"])
        for st in REPLICA_STATUSES + (() if status in REPLICA_STATUSES or status is None else (str(status),)):
            fam.add_metric(values + [st], 1.0 if st == status else 0.0)
        yield fam
        member = snap.get("role")
        if member in MEMBER_ROLES:
            fam = GaugeMetricFamily("smrd_membership_role",
                                    "1 for what this replica is in the replica group (voter, learner, "
                                    "none), 0 for the others.", labels=names + ["member"])
            for r in MEMBER_ROLES:
                fam.add_metric(values + [r], 1.0 if r == member else 0.0)
            yield fam
        fam = GaugeMetricFamily("smrd_is_leader", "1 while this replica leads a view in normal status.",
                                labels=names)
        leads = status == "normal" and snap.get("leader") == self.node_id and snap.get("role", "voter") == "voter"
        fam.add_metric(values, 1.0 if leads else 0.0)
        yield fam
        done, size = _num(snap.get("state_transfer_bytes")), _num(snap.get("state_transfer_size"))
        fam = GaugeMetricFamily("smrd_state_transfer_progress_ratio",
                                "Fraction of the current (or last) state transfer received; 0 when none.",
                                labels=names)
        fam.add_metric(values, min(done / size, 1.0) if size > 0 else 0.0)
        yield fam

    def _process_families(self, names, values):
        p = self._process
        try:
            with p.oneshot():
                cpu = p.cpu_times()
                rss = p.memory_info().rss
                threads = p.num_threads()
                fds = p.num_fds() if hasattr(p, "num_fds") else None
                start = p.create_time()
        except psutil.Error as e:  # should not happen for our own process; never fail a scrape
            log.debug("psutil failed: %s", e)
            return
        fam = CounterMetricFamily("smrd_process_cpu_seconds", "CPU time used by this process.",
                                  labels=names + ["mode"])
        fam.add_metric(values + ["user"], cpu.user)
        fam.add_metric(values + ["system"], cpu.system)
        yield fam
        for name, help, value in (
                ("smrd_process_resident_memory_bytes", "Resident memory of this process.", rss),
                ("smrd_process_threads", "Threads of this process.", threads),
                ("smrd_process_open_fds", "Open file descriptors of this process.", fds),
                ("smrd_process_start_time_seconds", "Start time of this process, Unix seconds.", start)):
            if value is not None:
                fam = GaugeMetricFamily(name, help, labels=names)
                fam.add_metric(values, float(value))
                yield fam

    # ------------------------------------------------------------------ HTTP

    async def start(self, host: Optional[str], port: int) -> int:
        """Listen on host:port (port 0: any free port); returns the bound port (also self.port).
        host None, "", "*" or a DNS name binds every interface: the kubelet probes the pod's IP,
        and a pod's own DNS name may not resolve yet (the same rule as the replica's ports).
        Raises OSError when the port cannot be bound."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = await asyncio.start_server(self._serve, _bind_host(host), port,
                                                  limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health on port %d: /metrics, /healthz, /readyz", self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop open connections. Safe to call twice or before start()."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client left, or would not read its reply in time
        except asyncio.CancelledError:  # stop(): drop the connection now
            writer.transport.abort()
            raise
        except Exception:
            log.exception("metrics/health connection failed")
        finally:
            self._handlers.discard(task)
            # close() flushes what drain() left in the buffer (under 64 KiB); a client that does
            # not read it loses the connection after request_timeout_s all the same.
            writer.close()
            asyncio.get_running_loop().call_later(self.request_timeout_s, writer.transport.abort)

    async def _converse(self, reader, writer) -> None:
        while True:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    head = await _read_head(reader)
            except TimeoutError:
                return  # idle keep-alive or a slow client: it holds nothing longer than this
            if head is None:
                return
            if isinstance(head, _BadRequest):
                await self._respond(writer, "GET", 400, f"bad request: {head}\n".encode(), close=True)
                await self._linger(reader, writer)
                return
            method, target, version, headers = head
            unread = _has_body(headers)
            status, body, ctype, extra = self._route(method, target)
            unread = unread or status == 405  # it may carry a body we do not read
            close = unread or _wants_close(version, headers)
            await self._respond(writer, method, status, body, ctype, extra, close)
            if unread:
                await self._linger(reader, writer)
            if close:
                return

    async def _linger(self, reader, writer) -> None:
        # Closing a socket with unread input makes the kernel send RST, and an RST can destroy
        # the reply before the client reads it. So: half-close, swallow what the client still
        # sends (bounded in bytes and time), then close.
        if not writer.can_write_eof():
            return
        writer.write_eof()
        try:
            async with asyncio.timeout(min(self.request_timeout_s, 2.0)):
                for _ in range(64):
                    if not await reader.read(65536):
                        return
        except TimeoutError:
            pass

    def _route(self, method: str, target: str):
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed: use GET\n", "text/plain; charset=utf-8", ("Allow: GET, HEAD",)
        path = target.split("?", 1)[0]
        if path == "/metrics":
            try:
                return 200, self.render(), CONTENT_TYPE_LATEST, ()
            except Exception as e:  # a snapshot() bug: say so rather than serve a partial page
                log.exception("collecting metrics failed")
                return 500, f"collecting metrics failed: {e!r}\n".encode(), "text/plain; charset=utf-8", ()
        if path == "/healthz":
            # Answering at all is the check: this handler runs on the driver's loop.
            return 200, b"ok\n", "text/plain; charset=utf-8", ()
        if path == "/readyz":
            ok, reason = self.check_ready()
            if ok:
                return 200, b"ready\n", "text/plain; charset=utf-8", ()
            text = " ".join(reason.split()) or "not ready"  # one line, whatever the driver wrote
            return 503, f"not ready: {text}\n".encode(), "text/plain; charset=utf-8", ()
        return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8", ()

    async def _respond(self, writer, method, status, body, ctype="text/plain; charset=utf-8",
                       extra=(), close=False) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}", "Cache-Control: no-store",
                 f"Connection: {'close' if close else 'keep-alive'}", *extra, "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        if method != "HEAD":
            writer.write(body)
        async with asyncio.timeout(self.request_timeout_s):
            await writer.drain()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


class _BadRequest(str):
    """What was wrong with a request head (the 400 reply says it)."""


async def _read_head(reader: asyncio.StreamReader):
    """(method, target, version, {lower-case name: value}), None if the client went away before
    a whole head, or a _BadRequest. The grammar is smrd.framing.http's; the policy is a probe's:
    no Host needed, no body read."""
    try:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            line = await reader.readline()  # RFC 9112 2.2: ignore one empty line before a request
        if not line.endswith(b"\n"):
            return None
        method, target, minor = parse_request_line(line.rstrip(b"\r\n"))
        if not target.startswith(b"/"):
            return _BadRequest("the target must be a path")
        headers = {}
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                return None
            if line in (b"\r\n", b"\n"):
                return method.decode(), target.decode("latin-1"), f"HTTP/1.{minor}", headers
            name, value = parse_field(line.rstrip(b"\r\n"))
            headers[name.decode().lower()] = value.decode("latin-1")
        return _BadRequest("too many header lines")
    except FramingError as exc:
        return _BadRequest(str(exc))
    except ValueError:  # StreamReader: a line longer than MAX_LINE
        return _BadRequest("request line or header too long")


def _wants_close(version: str, headers: dict) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


def _has_body(headers: dict) -> bool:
    # We never read request bodies; after one we cannot find the next request, so close.
    return "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")


def _bind_host(host: Optional[str]) -> Optional[str]:
    if host in (None, "", "*"):
        return None
    if host == "localhost":
        return host
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None  # a DNS name (a pod's own name): every interface, as smrd.replica.driver does
