"""The one typed configuration of a smrd process.

Owns: the declaration of every setting (the `Settings` dataclass below: each field carries its
type, default, unit, help and checks, once), the layering settings file (TOML) < environment
(SMRD_<NAME>) < command-line flags (--name-with-dashes), validation (per value and across values,
including against hosts.conf), and the generated views of the table (argparse flags, the docs
table, the commented example file).
Must never: start anything, open sockets, resolve names, or hand out a Config it could not fully
validate. Errors are ConfigError with one line naming the source (file:line, env var or flag)
and the fix. Warnings (legal but unwise) are returned for the caller to log.
"""
import argparse
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .hosts import GatewayAddr, Hosts, ReplicaAddr, check_host, did_you_mean, load_hosts
from .values import KiB, MiB, _human, parse_value

ENV_PREFIX = "SMRD_"
# SMRD_* variables that belong to other parts of smrd, not to this table; never "unknown".
FOREIGN_ENV = frozenset({"SMRD_NO_EXTENSIONS", "SMRD_SIM_SEEDS", "SMRD_STATEFULSET", "SMRD_TRACE"})
# A batch travels inside one frame whose payload _core caps at 64 MiB; half leaves room for headers.
MAX_BATCH_BYTES = 32 * MiB
# "Far below": a retransmission must stop long before the session (and its cached replies) expire.
SESSION_TTL_MARGIN = 10
_META = "smrd.setting"
# Settings that name files; in a settings file they are relative to that file.
PATH_SETTINGS = ("hosts", "data_dir", "curve_secret_key", "curve_public_keys")


def setting(
    default: Any,
    help: str,
    *,
    group: str,
    unit: str = "",
    choices: tuple[str, ...] = (),
    min: int | None = None,
    max: int | None = None,
    check: Callable[[Any], str | None] | None = None,
    in_file: bool = True,
    short: str | None = None,
    metavar: str | None = None,
    shown_default: str | None = None,
) -> Any:
    """Declare one setting as a dataclass field; everything else is generated from it."""
    meta = dict(
        help=help, group=group, unit=unit, choices=choices, min=min, max=max, check=check,
        in_file=in_file, short=short, metavar=metavar, shown_default=shown_default,
    )
    return field(default=default, metadata={_META: meta})


def _check_host(value: str) -> str | None:
    return check_host(value, listen=False)


def _check_header_names(value: str) -> str | None:
    for name in value.split(","):
        name = name.strip()
        if name and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            return f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)"
    return None


def data_paths(value: str) -> tuple[str, ...]:
    """app_data_paths as a tuple of paths."""
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _check_data_paths(value: str) -> str | None:
    for path in data_paths(value):
        if not os.path.isabs(path):
            return f"{path!r} is not an absolute path"
        if os.path.normpath(path) == "/":
            return "'/' would empty the whole file system"
    return None


def _not_empty(value: str) -> str | None:
    return "the value is empty" if not value.strip() else None


@dataclass(frozen=True)
class Settings:
    # --- role: what this process is ------------------------------------------------------------
    role: str | None = setting(
        None, "server: a replica beside the app; client: a gateway that outside clients reach. "
        "Required to run.", group="role", choices=("server", "client"), shown_default="none (required to run)")
    id: int | None = setting(
        None, "Replica id (role server, required) or gateway id (role client; default: the lowest "
        "gateway id in the hosts file).", group="role", min=0, max=65535, metavar="N",
        shown_default="none (required for role server)")
    hosts: str | None = setting(
        None, "Path of the hosts file (replicas and gateways). Relative paths in the settings file "
        "are relative to that file.", group="role", short="-c", metavar="PATH", check=_not_empty,
        shown_default="none (required)")
    settings: str | None = setting(
        None, "Path of the TOML settings file (flat keys). Optional.", group="role", in_file=False,
        metavar="FILE", check=_not_empty, shown_default="none")
    data_dir: str | None = setting(
        None, "Directory for the write-ahead log and checkpoints (role server).", group="role",
        metavar="DIR", check=_not_empty, shown_default="./smrd-data/replica-<id>")
    # --- consensus -----------------------------------------------------------------------------
    batch_max_requests: int = setting(
        1024, "Most requests the leader puts in one batch.", group="consensus", unit="requests",
        min=1, max=1_000_000)
    batch_max_bytes: int = setting(
        1 * MiB, "Most payload bytes in one batch (a larger single request is refused, see "
        "max_request_bytes).", group="consensus", unit="bytes", min=1 * KiB, max=MAX_BATCH_BYTES)
    window: int = setting(
        4, "Pipelining window W: consensus instances in flight at once (1 = BFT-SMaRt's sequential "
        "order).", group="consensus", unit="instances", min=1, max=1024)
    tick_ms: int = setting(
        10, "Timer resolution of the protocol core; the timeouts below are whole multiples of it.",
        group="consensus", unit="ms", min=1, max=1000)
    heartbeat_ms: int = setting(
        50, "Leader heartbeat interval.", group="consensus", unit="ms", min=1, max=60_000)
    election_timeout_ms: int = setting(
        500, "Silence from the leader after which a replica moves to the next view.",
        group="consensus", unit="ms", min=1, max=600_000)
    request_timeout_ms: int = setting(
        1000, "A pending request not ordered within this time makes replicas suspect the leader.",
        group="consensus", unit="ms", min=1, max=600_000)
    # --- sessions and exactly-once -------------------------------------------------------------
    reply_quorum: int = setting(
        1, "Matching replies the gateway waits for before answering (crash mode: 1; at most n). "
        "With 1 the gateway sends new requests to the leader alone; with more, to every replica.",
        group="sessions", unit="replies", min=1, max=64)
    reply_cache_size: int = setting(
        1024, "Replies kept per client session (k) to answer retransmissions exactly once.",
        group="sessions", unit="replies", min=1, max=1_000_000)
    session_ttl_s: int = setting(
        3600, "Idle client sessions expire after this (leader time, so all replicas agree).",
        group="sessions", unit="s", min=1, max=30 * 86400)
    # --- gateway -------------------------------------------------------------------------------
    gateway_request_deadline_ms: int = setting(
        10_000, "The gateway gives up on a request (and answers with an error) after this.",
        group="gateway", unit="ms", min=1, max=3_600_000)
    gateway_retransmit_ms: int = setting(
        500, "The gateway resends an unanswered request after this.", group="gateway", unit="ms",
        min=1, max=3_600_000)
    max_inflight_per_gateway: int = setting(
        4096, "Requests one gateway keeps in flight; more wait (back-pressure).", group="gateway",
        unit="requests", min=1, max=1_000_000)
    divergence_check_every: int = setting(
        16, "With reply_quorum 1, one batch of new requests in this many goes to every replica "
        "instead of the leader alone, so that their replies are compared and an app that is not "
        "deterministic shows in smrd_divergences_total; 0: never (only retransmissions are compared).",
        group="gateway", unit="batches", min=0, max=1_000_000)
    # --- the app -------------------------------------------------------------------------------
    app_host: str = setting(
        "127.0.0.1", "Address of the local app (same pod).", group="app", metavar="HOST",
        check=_check_host)
    app_port: int = setting(7000, "TCP port of the local app.", group="app", min=1, max=65535)
    framing: str = setting(
        "line", "How requests and replies are delimited, towards the app and outside clients: "
        "close: one connection per request; line: newline-delimited; length: 4-byte big-endian "
        "length prefix; http: HTTP/1.1; resp: RESP2 (Redis).", group="app",
        choices=("close", "line", "length", "http", "resp"))
    volatile_reply_headers: str = setting(
        "Date", "With framing=http: reply headers (comma-separated names, any case) that may differ "
        "between replicas without being divergence, such as a Date stamped from each server's clock. "
        "Replies are compared without them; a client still gets one replica's reply unchanged. "
        "Empty: every byte counts.", group="app", metavar="NAMES", check=_check_header_names)
    app_timeout_ms: int = setting(
        5000, "An app reply slower than this counts as an app failure (the request is retried, "
        "never dropped).", group="app", unit="ms", min=1, max=3_600_000)
    max_request_bytes: int = setting(
        1 * MiB, "Largest single request accepted from a client.", group="app", unit="bytes",
        min=1, max=MAX_BATCH_BYTES)
    snapshot_request: str = setting(
        "", "Snapshot hook: a request in the app's framing whose reply is the app's whole state "
        "(for the demo hashmap: SNAPSHOT). With restore_request set, smrd takes a checkpoint every "
        "checkpoint_every requests, truncates its log before it, and gives a replica that is far "
        "behind or has an empty disk the checkpoint instead of the whole log. Replicas must produce "
        "the same bytes for the same state (they are compared by hash). Empty: no hooks; the log "
        "is kept whole (closed segments zstd-compressed) and replayed. See docs/app-contract.md.",
        group="app", metavar="REQUEST", shown_default='"" (no hooks)')
    restore_request: str = setting(
        "", "Restore hook: the request that replaces the app's state, with {state} where the snapshot "
        "reply goes (for the demo hashmap: RESTORE {state}).", group="app", metavar="TEMPLATE",
        shown_default='"" (no hooks)')
    restore_ok: str = setting(
        "OK", "The restore hook's reply must start with this, or the restore counts as failed "
        "(the replica stops rather than serve from an app in an unknown state).", group="app",
        metavar="PREFIX")
    app_data_paths: str = setting(
        "", "Files or directories, comma-separated absolute paths, where the app keeps state of its "
        "own (a database file, an append-only log). When smrd must reset an app whose state it cannot "
        "account for and there are no snapshot hooks, it ends the app's process and empties these "
        "(a directory keeps itself and loses its contents) before the app's supervisor starts it "
        "again, so that the new app starts empty. An app that restarts by itself with such files "
        "is reset the same way before anything is replayed into it. smrd needs write access to them "
        "(in Kubernetes: mount the app's volume into the smrd container too). Empty: the app keeps "
        "nothing on disk. See docs/app-contract.md.", group="app", metavar="PATHS",
        check=lambda v: _check_data_paths(v), shown_default='"" (the app keeps no files)')
    app_restart_timeout_s: int = setting(
        30, "After smrd ended the app to reset it, how long it waits for the app's supervisor to start "
        "a new one before it reports itself halted (it keeps waiting, and executes again as soon as "
        "a new app listens).", group="app", unit="s", min=1, max=86_400)
    checkpoint_every: int = setting(
        100_000, "With snapshot hooks: requests between checkpoints (every replica checkpoints at "
        "the same instances; all must use the same value). Ignored without hooks.", group="app",
        unit="requests", min=1, max=1_000_000_000)
    state_transfer_rate_mb: int = setting(
        64, "A replica serves checkpoint bytes to a peer that is catching up at most this fast, so "
        "that the transfer never stalls ordering.", group="app", unit="MB/s", min=1, max=100_000)
    # --- storage and transport -----------------------------------------------------------------
    durability: str = setting(
        "fsync", "fsync: persist before acting (safe); nosync: write without fsync (a power loss "
        "can lose decided requests); memory: no disk (tests only).", group="storage",
        choices=("fsync", "nosync", "memory"))
    log_memory_bytes: int = setting(
        16 * MiB, "Decided values kept in memory (the newest); older ones are read back from the "
        "log files when a peer catches up or the app is rebuilt, so memory stays bounded however "
        "long the log grows (durability memory keeps everything: it has no files). The default keeps "
        "about 20 s of a busy replica's history (a replica's RSS stays near 55 MB); raise it if "
        "peers often fall further behind and disk reads are slow.",
        group="storage", unit="bytes", min=4 * KiB, max=1024 * 1024 * MiB)
    log_segment_bytes: int = setting(
        64 * MiB, "Size at which the write-ahead log starts a new segment file. Closed segments are "
        "zstd-compressed, and deleted once a checkpoint covers them.", group="storage", unit="bytes",
        min=4 * KiB, max=4096 * MiB)
    hwm: int = setting(
        10_000, "ZeroMQ high-water mark per socket (0 = unlimited).", group="storage",
        unit="messages", min=0, max=10_000_000)
    new_cluster: bool = setting(
        False, "Role server: treat an empty log as a brand-new cluster and skip recovery. By "
        "default an empty log means 'ask the others first' (a lost disk must not vote before it "
        "learned the cluster's state), which needs a quorum of the OTHER replicas to answer; set "
        "this only to bootstrap a new cluster while some replicas are not up yet, never for a "
        "replica that is replacing one with a lost disk.", group="storage")
    # --- membership ----------------------------------------------------------------------------
    voters: tuple | None = setting(
        None, "Role server: the bootstrap voters, the replica ids (of the hosts file) that vote when "
        "the cluster starts for the very first time, e.g. 0,1,2 (TOML: [0, 1, 2]). The other replicas "
        "of the hosts file are candidates that can join later (auto_join, smrd admin join). It must be "
        "the same on every replica, and it only matters until the first membership change: from then "
        "on the membership is part of the replicated state (it travels in the log and in checkpoints) "
        "and this setting is ignored. See docs/membership.md.", group="membership", metavar="IDS",
        shown_default="all replicas of the hosts file")
    auto_join: bool = setting(
        False, "Role server: a replica that is not a voter asks to join when it starts: it becomes a "
        "learner, catches up without voting, and is promoted to voter once it holds what the leader "
        "holds (what a new StatefulSet pod does on a scale-out). A member that restarts changes "
        "nothing. A replica that is not a member and has auto_join off waits for smrd admin join.",
        group="membership")
    # --- security ------------------------------------------------------------------------------
    # Off by default only because it must be: a default that needs keys could not start with zero
    # configuration, and keys cannot exist before `smrd keygen` makes them (docs/security.md).
    curve_secret_key: str = setting(
        "", "Path of this process's CURVE secret key file (NAME.key, written by smrd keygen). Set, "
        "every smrd-to-smrd channel is encrypted and only keys in curve_public_keys may connect; "
        "empty, CURVE is off and that traffic is neither encrypted nor authenticated. In the path, "
        "<name> becomes replica-<id> (role server) or gateway-<id> (role client) and <id> the "
        "process's id, so one settings file serves every process. See docs/security.md.",
        group="security", metavar="FILE", shown_default='"" (CURVE off)')
    curve_public_keys: str = setting(
        "", "Directory of the public keys allowed to connect (the allow-list: every NAME.pub in it). "
        "It must hold replica-<id>.pub for every replica in the hosts file: that is how a process "
        "learns each replica's public key. Only replica-* keys are accepted on peer ports. Re-read "
        "when its files change. Required exactly when curve_secret_key is set.",
        group="security", metavar="DIR", shown_default='"" (CURVE off)')
    # --- observability -------------------------------------------------------------------------
    log_level: str = setting(
        "info", "Log level; debug also prints tracebacks of internal errors.", group="observability",
        choices=("debug", "info", "warning", "error", "critical"))
    log_format: str = setting(
        "text", "Log format: text for people, json for log collectors.", group="observability",
        choices=("text", "json"))
    metrics_port: int = setting(
        0, "Prometheus /metrics and /healthz port. A non-zero value wins over the hosts file; 0 = "
        "use the metrics= option of this process's hosts-file line, else metrics are off.",
        group="observability", min=0, max=65535, metavar="PORT")


GROUPS = {
    "role": "Role and paths",
    "consensus": "Consensus",
    "sessions": "Sessions and exactly-once",
    "gateway": "Gateway",
    "app": "The app",
    "storage": "Storage and transport",
    "membership": "Membership",
    "security": "Security (CURVE)",
    "observability": "Observability",
}


@dataclass(frozen=True)
class Spec:
    """One setting's declaration, read back from its `Settings` field."""

    name: str
    type: type  # int or str: the type of a value once parsed
    optional: bool  # None (unset) is a legal value
    default: Any
    help: str
    group: str
    unit: str
    choices: tuple[str, ...]
    min: int | None
    max: int | None
    check: Callable[[Any], str | None] | None
    in_file: bool
    short: str | None
    metavar: str | None
    shown_default: str | None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> str:
        return f"{self.short}/{self.flag}" if self.short else self.flag

    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        return _human(self, self.default)


def _specs() -> dict[str, Spec]:
    hints = typing.get_type_hints(Settings)
    out = {}
    for f in fields(Settings):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = bool(args) and len(args) < len(typing.get_args(hint))
        out[f.name] = Spec(name=f.name, type=args[0] if optional else hint, optional=optional,
                           default=f.default, **f.metadata[_META])
    return out


SETTINGS: dict[str, Spec] = _specs()


@dataclass(frozen=True)
class Source:
    """Where a value came from: default, file, env, flag, or derived (computed from others)."""

    kind: str
    where: str = ""  # "conf/smrd.toml:12", "SMRD_TICK_MS", "--tick-ms"

    def __str__(self) -> str:
        return f"{self.kind} {self.where}" if self.where else self.kind

    def locate(self, name: str) -> str:
        """The prefix of an error message about setting `name` from this source."""
        if self.kind == "file":
            return f"{self.where}: {name}"
        if self.kind == "env":
            return f"environment variable {self.where}"
        if self.kind == "flag":
            return f"flag {self.where}"
        return f"{name} ({self})"


DEFAULT = Source("default")


@dataclass(frozen=True)
class Config:
    settings: Settings
    hosts: Hosts
    sources: Mapping[str, Source]  # setting name -> where its effective value came from
    warnings: tuple[str, ...] = ()
    metrics_port: int = 0  # effective: the setting if non-zero, else the hosts file's; 0 = off
    security: Any = None  # smrd.net.security.Security (keys, allow-list) when CURVE is on, else None

    @property
    def role(self) -> str | None:
        return self.settings.role

    @property
    def id(self) -> int | None:
        return self.settings.id

    @property
    def replica(self) -> ReplicaAddr:
        """This replica's addresses (role server)."""
        if self.settings.role != "server" or self.settings.id is None:
            raise ConfigError("this process is not a replica; run with --role server --id N")
        return self.hosts.replica(self.settings.id)

    @property
    def gateway(self) -> GatewayAddr:
        """This gateway's listen address (role client)."""
        if self.settings.role != "client" or self.settings.id not in self.hosts.gateways:
            raise ConfigError("this process is not a gateway; run with --role client")
        return self.hosts.gateways[self.settings.id]

    def describe(self) -> str:
        """Every effective value with its source, on one line (for a debug log line)."""
        parts = [f"{name}={getattr(self.settings, name)!r} ({self.sources[name]})" for name in SETTINGS]
        parts.append(f"effective_metrics_port={self.metrics_port}")
        return "config: " + ", ".join(parts)


def load_config(
    flags: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    need_role: bool = True,
) -> Config:
    """Layer defaults < settings file < env < flags, validate everything once, return a Config.

    `flags`: an argparse Namespace (attributes named like settings are taken; others, such as a
    subcommand's own options, are ignored) or a dict {setting name: value}, where unknown names
    are errors. `need_role=False` is for tools (smrd status) that only need the hosts file.
    """
    env = os.environ if env is None else env
    layers: dict[str, tuple[Any, Source]] = {}

    from_flags = _flag_values(flags)
    from_env = _env_values(env)
    path_value, path_source = from_flags.get("settings") or from_env.get("settings") or (None, DEFAULT)
    if path_value is not None:
        layers.update(_file_values(path_value, path_source))
    layers.update(from_env)
    layers.update(from_flags)

    values = {name: spec.default for name, spec in SETTINGS.items()}
    sources = {name: DEFAULT for name in SETTINGS}
    for name, (value, source) in layers.items():
        values[name], sources[name] = value, source
    settings = Settings(**values)
    _cross_check(settings, sources)
    if need_role and settings.role is None:
        raise ConfigError(
            "no role given; pass --role server (a replica beside the app) or --role client (a gateway), "
            "or set SMRD_ROLE"
        )

    if settings.hosts is None:
        raise ConfigError(
            "no hosts file given; pass -c/--hosts PATH or set SMRD_HOSTS (conf/hosts.conf is an example)"
        )
    hosts = load_hosts(settings.hosts)
    settings, sources = _check_against_hosts(settings, sources, hosts)
    security, security_warnings = None, ()
    if settings.curve_secret_key:
        settings, security, security_warnings = _load_security(settings, sources, hosts)
    return Config(
        settings=settings, hosts=hosts, sources=sources,
        warnings=_voter_warnings(settings, hosts) + _warnings(settings, sources) + security_warnings,
        metrics_port=_effective_metrics_port(settings, hosts),
        security=security,
    )


# --- the three layers -------------------------------------------------------------------------

def _flag_values(flags: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, tuple[Any, Source]]:
    if flags is None:
        return {}
    if isinstance(flags, argparse.Namespace):
        raw = {k: v for k, v in vars(flags).items() if k in SETTINGS}
    else:
        raw = dict(flags)
        for name in raw:
            if name not in SETTINGS:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"flag {flag} is not a smrd setting{did_you_mean(flag, [s.flag for s in SETTINGS.values()])}; "
                    f"see smrd --help"
                )
    out = {}
    for name, value in raw.items():
        if value is None:
            continue  # not given
        spec = SETTINGS[name]
        source = Source("flag", spec.flags)
        out[name] = (parse_value(spec, value, source), source)
    return out


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[Any, Source]]:
    out = {}
    valid = [s.env for s in SETTINGS.values()]
    for key in sorted(env):
        if not key.startswith(ENV_PREFIX) or key in FOREIGN_ENV:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in SETTINGS:
            raise ConfigError(
                f"environment variable {key} is not a smrd setting{did_you_mean(key, valid)}; "
                f"unset it or fix its name (settings are listed in docs/configuration.md)"
            )
        source = Source("env", key)
        out[name] = (parse_value(SETTINGS[name], env[key], source), source)
    return out


def _file_values(path: str, via: Source) -> dict[str, tuple[Any, Source]]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found (from {via}); check the path or drop the option") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a settings file (from {via}); give the TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read settings file ({exc.strerror}); check the path and permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); the settings file must be TOML text"
        ) from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        loc = f"{path}:{m.group(1)}:{m.group(2)}" if m else f"{path}:{max(1, text.count(chr(10)) + 1)}"
        msg = msg[: m.start()] if m else re.sub(r"\s*\(at end of document\)$", " at end of file", msg)
        raise ConfigError(f"{loc}: invalid TOML: {msg}; settings are flat lines like: tick_ms = 10") from None

    base = os.path.dirname(path)
    valid = [name for name, spec in SETTINGS.items() if spec.in_file]
    out = {}
    for key, value in table.items():
        source = Source("file", f"{path}:{_line_of(text, key)}")
        if isinstance(value, dict):
            raise ConfigError(
                f"{source.where}: [{key}] is a table, but the settings file is flat; "
                f"write the keys at top level (name = value) without [sections]"
            )
        if key not in SETTINGS or not SETTINGS[key].in_file:
            why = ("names the settings file itself, which only --settings or SMRD_SETTINGS can do"
                   if key == "settings" else f"is not a smrd setting{did_you_mean(key, valid)}")
            raise ConfigError(f"{source.where}: key {key!r} {why}; fix or remove it")
        parsed = parse_value(SETTINGS[key], value, source)
        if key in PATH_SETTINGS and parsed and not os.path.isabs(parsed):
            parsed = os.path.join(base, parsed)  # paths in a file are relative to the file
        out[key] = (parsed, source)
    return out


def _line_of(text: str, key: str) -> int:
    m = re.search(rf'^[ \t]*["\']?{re.escape(key)}["\']?[ \t]*=', text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else 1


# --- across values ---------------------------------------------------------------------------

def _cross_check(s: Settings, sources: Mapping[str, Source]) -> None:
    def show(name: str) -> str:
        return f"{name}={getattr(s, name)} ({sources[name]})"

    for name in ("heartbeat_ms", "election_timeout_ms", "request_timeout_ms"):
        if getattr(s, name) % s.tick_ms:
            raise ConfigError(
                f"{show(name)} is not a multiple of {show('tick_ms')}: the core counts time in ticks, "
                f"so it would silently round; use a multiple of {s.tick_ms}"
            )
    if s.heartbeat_ms >= s.election_timeout_ms:
        raise ConfigError(
            f"{show('heartbeat_ms')} must be below {show('election_timeout_ms')}: otherwise followers "
            f"suspect a healthy leader between two heartbeats; lower heartbeat_ms or raise election_timeout_ms"
        )
    if s.gateway_retransmit_ms >= s.gateway_request_deadline_ms:
        raise ConfigError(
            f"{show('gateway_retransmit_ms')} must be below {show('gateway_request_deadline_ms')}: "
            f"otherwise the gateway gives up before it ever retransmits; lower the first or raise the second"
        )
    if s.gateway_request_deadline_ms * SESSION_TTL_MARGIN > s.session_ttl_s * 1000:
        raise ConfigError(
            f"{show('gateway_request_deadline_ms')} must be far below {show('session_ttl_s')} "
            f"(at most 1/{SESSION_TTL_MARGIN} of it): exactly-once relies on no retransmission outliving "
            f"its session, since a request retried after its session expired would execute twice; "
            f"lower the deadline or raise session_ttl_s"
        )
    if s.max_request_bytes > s.batch_max_bytes:
        raise ConfigError(
            f"{show('max_request_bytes')} must not exceed {show('batch_max_bytes')}: a request that fits "
            f"no batch could never be ordered; lower max_request_bytes or raise batch_max_bytes"
        )
    if bool(s.snapshot_request) != bool(s.restore_request):
        have, lack = (("snapshot_request", "restore_request") if s.snapshot_request
                      else ("restore_request", "snapshot_request"))
        raise ConfigError(
            f"{show(have)} is set but {lack} is not: snapshot hooks come in pairs (one takes the "
            f"app's state, the other puts it back); set {lack} too, or unset {have}"
        )
    if s.snapshot_request and s.framing in ("http", "resp"):
        raise ConfigError(
            f"{show('snapshot_request')} is set with framing={s.framing}: snapshot hooks work with "
            f"close, line and length framing (an {s.framing} request with the state spliced in "
            f"would need its length fields rewritten); unset the hooks, or use another framing"
        )
    if s.restore_request and "{state}" not in s.restore_request:
        raise ConfigError(
            f"{show('restore_request')} has no {{state}}: it must say where the snapshot goes, e.g. "
            f"'RESTORE {{state}}'"
        )
    if bool(s.curve_secret_key) != bool(s.curve_public_keys):
        have, lack = (("curve_secret_key", "curve_public_keys") if s.curve_secret_key
                      else ("curve_public_keys", "curve_secret_key"))
        raise ConfigError(
            f"{show(have)} is set but {lack} is not: CURVE needs both this process's secret key and the "
            f"allow-list of public keys, or neither; set {lack} too, or unset {have} to run without CURVE"
        )


def _check_against_hosts(
    s: Settings, sources: dict[str, Source], hosts: Hosts
) -> tuple[Settings, dict[str, Source]]:
    if s.reply_quorum > hosts.n:
        raise ConfigError(
            f"reply_quorum={s.reply_quorum} ({sources['reply_quorum']}) exceeds the {hosts.n} replicas in "
            f"{hosts.path}; the gateway would wait forever; use 1..{hosts.n}"
        )
    if s.voters is not None:
        missing = [v for v in s.voters if v not in hosts.replicas]
        if missing:
            raise ConfigError(
                f"voters={_human(SETTINGS['voters'], s.voters)} ({sources['voters']}): replica "
                f"{', '.join(map(str, missing))} {'is' if len(missing) == 1 else 'are'} not in {hosts.path} "
                f"(replica ids 0..{hosts.n - 1}); list only replicas of the hosts file, or add their lines"
            )
    if s.role is None:  # only reachable with need_role=False
        return s, sources
    if s.role == "server":
        if s.id is None:
            raise ConfigError(
                f"role server needs a replica id; pass --id N (or SMRD_ID) with N in 0..{hosts.n - 1} from {hosts.path}"
            )
        if s.id not in hosts.replicas:
            raise ConfigError(
                f"id {s.id} ({sources['id']}) is not a replica in {hosts.path} (replica ids are "
                f"0..{hosts.n - 1}); use one of those or add a replica line"
            )
        if s.data_dir is None:
            s = replace(s, data_dir=f"./smrd-data/replica-{s.id}")
        rep = hosts.replicas[s.id]
        if s.metrics_port in (rep.peer_port, rep.client_port):
            raise ConfigError(
                f"metrics_port={s.metrics_port} ({sources['metrics_port']}) collides with replica {s.id}'s "
                f"peer or client port in {hosts.path}:{rep.line}; pick another port"
            )
        return s, sources
    # role client: a gateway
    if not hosts.gateways:
        raise ConfigError(
            f"{hosts.path}: role client needs a gateway line ('gateway ID HOST PORT'); add one"
        )
    if s.id is None:
        sources = {**sources, "id": Source("derived", "lowest gateway id")}
        return replace(s, id=next(iter(hosts.gateways))), sources
    if s.id not in hosts.gateways:
        raise ConfigError(
            f"id {s.id} ({sources['id']}) is not a gateway in {hosts.path} (gateway ids: "
            f"{', '.join(map(str, hosts.gateways))}); use one of those or add a gateway line"
        )
    return s, sources


def _load_security(s: Settings, sources: Mapping[str, Source], hosts: Hosts) -> tuple[Settings, Any, tuple[str, ...]]:
    """Resolve <name>/<id> in the key path, then load and check the keys (smrd/net/security.py)."""
    path = s.curve_secret_key
    if "<name>" in path or "<id>" in path:
        if s.role is None or s.id is None:
            raise ConfigError(
                f"curve_secret_key={path} ({sources['curve_secret_key']}) uses <name> or <id>, but this "
                f"command has no role or id to fill in; give the key file's own path, e.g. "
                f"--curve-secret-key keys/ops.key"
            )
        name = f"{'replica' if s.role == 'server' else 'gateway'}-{s.id}"
        path = path.replace("<name>", name).replace("<id>", str(s.id))
        s = replace(s, curve_secret_key=path)
    from ..net.security import load  # only now: a process without CURVE never imports ZeroMQ here
    security, warnings = load(
        path, f"curve_secret_key={path} ({sources['curve_secret_key']})",
        s.curve_public_keys, f"curve_public_keys={s.curve_public_keys} ({sources['curve_public_keys']})",
        hosts, s.id if s.role == "server" else None)
    return s, security, warnings


def _voter_warnings(s: Settings, hosts: Hosts) -> tuple[str, ...]:
    # hosts.conf's warnings count every replica it lists; with fewer bootstrap voters than
    # candidates (room to scale), what tolerates failures is the number of voters.
    if s.voters is None or len(s.voters) == hosts.n:
        return hosts.warnings
    k = len(s.voters)
    if k < 3:
        return (f"voters: {k} bootstrap voter{'s' if k != 1 else ''} tolerate no failure until more join; "
                f"use 3 or more",)
    if k % 2 == 0:
        return (f"voters: {k} bootstrap voters are even and tolerate {(k - 1) // 2} failure"
                f"{'s' if (k - 1) // 2 != 1 else ''}, no more than {k - 1}; use an odd count",)
    return ()


def _warnings(s: Settings, sources: Mapping[str, Source]) -> tuple[str, ...]:
    out = []
    if s.election_timeout_ms < 3 * s.heartbeat_ms:
        out.append(
            f"election_timeout_ms={s.election_timeout_ms} is under 3 heartbeats ({s.heartbeat_ms} ms): "
            f"one late heartbeat may start a needless view change"
        )
    if s.durability != "fsync":
        loss = "a power loss or OS crash" if s.durability == "nosync" else "a restart"
        out.append(
            f"durability={s.durability} ({sources['durability']}): {loss} of a majority can lose decided "
            f"requests; use fsync outside tests"
        )
    if s.framing != "http" and sources["volatile_reply_headers"] is not DEFAULT and s.volatile_reply_headers:
        out.append(
            f"volatile_reply_headers ({sources['volatile_reply_headers']}) applies to framing=http "
            f"only; with framing={s.framing} every byte of a reply is compared"
        )
    return tuple(out)


def _effective_metrics_port(s: Settings, hosts: Hosts) -> int:
    if s.metrics_port:
        return s.metrics_port
    addr: ReplicaAddr | GatewayAddr | None = None
    if s.role == "server" and s.id in hosts.replicas:
        addr = hosts.replicas[s.id]
    elif s.role == "client" and s.id in hosts.gateways:
        addr = hosts.gateways[s.id]
    return (addr.metrics_port or 0) if addr else 0


if __name__ == "__main__":  # python -m smrd.config.settings --write: see smrd.config.views
    from .views import main
    main()
