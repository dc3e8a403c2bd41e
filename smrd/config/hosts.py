"""hosts.conf: who the replicas and gateways are and where they listen.

Owns: parsing and validating the line-based hosts file into a `Hosts` value, and the small helpers
(n, f, quorum, endpoints) every other layer derives from it.
Must never: resolve DNS names (a peer pod that is not up yet must not make its neighbours fail to
start; names resolve lazily in the transport), open sockets, or log. Problems that are legal but
unwise (n < 3, even n) become `Hosts.warnings` for the caller to log.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

MAX_REPLICAS = 64  # replica ids are 0..63: membership sets fit in one 64-bit mask
MAX_GATEWAY_ID = 65535  # gateway ids travel in the frame header's u16 sender field
OPTIONS = ("metrics",)  # trailing key=value options allowed on any line

REPLICA_FIELDS = "replica ID HOST PEER_PORT CLIENT_PORT [metrics=PORT]"
GATEWAY_FIELDS = "gateway ID HOST PORT [metrics=PORT]"

# RFC 1123 host name labels, plus "_" because Docker Compose service names use it and resolve fine.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class ReplicaAddr:
    id: int
    host: str  # IP literal (normalised) or DNS name, unresolved
    peer_port: int  # replica <-> replica consensus traffic
    client_port: int  # gateway -> replica requests and replies
    metrics_port: int | None = None  # Prometheus/health HTTP, None = not given here
    line: int = 0  # where it was declared, for later error messages

    @property
    def peer_endpoint(self) -> str:
        return _endpoint(self.host, self.peer_port)

    @property
    def client_endpoint(self) -> str:
        return _endpoint(self.host, self.client_port)


@dataclass(frozen=True)
class GatewayAddr:
    id: int
    host: str  # listen address for outside clients (0.0.0.0 / :: allowed)
    port: int
    metrics_port: int | None = None
    line: int = 0

    @property
    def listen_endpoint(self) -> str:
        return _endpoint(self.host, self.port)


@dataclass(frozen=True)
class Hosts:
    replicas: dict[int, ReplicaAddr]  # ordered by id, ids are exactly 0..n-1
    gateways: dict[int, GatewayAddr]  # ordered by id, ids need not be contiguous
    path: str = "hosts.conf"
    warnings: tuple[str, ...] = field(default=())

    @property
    def n(self) -> int:
        return len(self.replicas)

    @property
    def f(self) -> int:
        """Crash faults tolerated: n >= 2f + 1."""
        return (self.n - 1) // 2

    @property
    def quorum(self) -> int:
        """Crash-fault majority quorum, ceil((n+1)/2)."""
        return self.n // 2 + 1

    @property
    def replica_ids(self) -> tuple[int, ...]:
        return tuple(self.replicas)

    def replica(self, replica_id: int) -> ReplicaAddr:
        try:
            return self.replicas[replica_id]
        except KeyError:
            raise ConfigError(
                f"{self.path}: replica {replica_id} is not declared (replica ids are "
                f"0..{self.n - 1}); use one of those ids or add a replica line"
            ) from None

    def peers_of(self, replica_id: int) -> dict[int, ReplicaAddr]:
        """Every replica except `replica_id`, ordered by id."""
        return {i: r for i, r in self.replicas.items() if i != replica_id}


def load_hosts(path: str | Path) -> Hosts:
    """Read and validate a hosts file; raises ConfigError naming the file and line."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{name}: hosts file not found; check the -c/--hosts path (conf/hosts.conf is an example)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a hosts file; point -c/--hosts at the file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read hosts file ({exc.strerror}); check the path and permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{name}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            f"is this really the hosts file? It must be plain text"
        ) from None
    return parse_hosts(text, name)


def parse_hosts(text: str, path: str = "hosts.conf") -> Hosts:
    """Parse hosts-file text. `path` is only used in messages."""
    replicas: dict[int, ReplicaAddr] = {}
    gateways: dict[int, GatewayAddr] = {}
    listeners: dict[tuple[str, int], tuple[int, str]] = {}  # (host, port) -> (line, what)
    # split("\n"), not splitlines(): the latter also breaks at \x1c, \x85, U+2028..., and line
    # numbers must match what an editor shows.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()

    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if any(ord(c) < 32 and c not in "\t\r\f\v" for c in raw) or "\x7f" in raw:
            raise ConfigError(
                f"{where}: contains control characters; is this really the hosts file? It must be plain text"
            )
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        tokens = content.split()
        kind, rest = tokens[0], tokens[1:]
        positional, options = _split_options(rest, where)
        if kind == "replica":
            rep = _parse_replica(positional, options, where, lineno)
            if rep.id in replicas:
                raise ConfigError(
                    f"{where}: duplicate replica id {rep.id} (first declared on line "
                    f"{replicas[rep.id].line}); give each replica its own id"
                )
            replicas[rep.id] = rep
            _claim(listeners, rep.host, rep.peer_port, lineno, f"replica {rep.id} peer_port", where)
            _claim(listeners, rep.host, rep.client_port, lineno, f"replica {rep.id} client_port", where)
            if rep.metrics_port is not None:
                _claim(listeners, rep.host, rep.metrics_port, lineno, f"replica {rep.id} metrics", where)
        elif kind == "gateway":
            gw = _parse_gateway(positional, options, where, lineno)
            if gw.id in gateways:
                raise ConfigError(
                    f"{where}: duplicate gateway id {gw.id} (first declared on line "
                    f"{gateways[gw.id].line}); give each gateway its own id"
                )
            gateways[gw.id] = gw
            _claim(listeners, gw.host, gw.port, lineno, f"gateway {gw.id} port", where)
            if gw.metrics_port is not None:
                _claim(listeners, gw.host, gw.metrics_port, lineno, f"gateway {gw.id} metrics", where)
        else:
            raise ConfigError(
                f"{where}: unknown kind {kind!r}{did_you_mean(kind, ('replica', 'gateway'))}; "
                f"each line starts with 'replica' or 'gateway'"
            )

    end = f"{path}:{max(1, len(lines))}"
    if not replicas:
        what = "file is empty" if not text.strip() else "no replica lines"
        raise ConfigError(f"{end}: {what}; declare at least one line '{REPLICA_FIELDS}' (n >= 3 recommended)")
    n = len(replicas)
    missing = [i for i in range(n) if i not in replicas]
    if missing:
        # The first replica whose id is out of place is where the gap shows.
        culprit = min((r for r in replicas.values() if r.id >= n), key=lambda r: r.line)
        raise ConfigError(
            f"{path}:{culprit.line}: replica ids must be 0..n-1 without gaps (n={n}), but "
            f"{', '.join(map(str, missing))} {'is' if len(missing) == 1 else 'are'} missing and "
            f"{culprit.id} is out of range; renumber the replicas 0..{n - 1}"
        )

    warnings: list[str] = []
    if n < 3:
        warnings.append(f"{path}: n={n} tolerates no failure; use n >= 3")
    elif n % 2 == 0:
        f = (n - 1) // 2
        warnings.append(
            f"{path}: n={n} is even and tolerates {f} failure{'s' if f != 1 else ''}, "
            f"no more than n={n - 1}; use an odd n"
        )
    return Hosts(
        replicas=dict(sorted(replicas.items())),
        gateways=dict(sorted(gateways.items())),
        path=path,
        warnings=tuple(warnings),
    )


def check_host(host: str, *, listen: bool = False) -> str | None:
    """Return why `host` is not a usable host, or None. Never resolves anything.

    `listen=True` allows the wildcard addresses (0.0.0.0, ::), which are fine to listen on but not
    something a peer can connect to.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if ip.is_unspecified and not listen:
            return f"{host} is a wildcard address, fine to listen on but not one peers can connect to"
        return None
    if ":" in host:
        return f"{host!r} is not a valid IPv6 address"
    if len(host) > 253:
        return f"host name is {len(host)} characters long, more than 253"
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if all(label.isdigit() for label in labels):
        return f"{host!r} is not a valid IPv4 address"
    if labels[-1].isdigit():
        return f"{host!r} is not a valid host name (the last label is all digits)"
    for label in labels:
        if not _LABEL.match(label):
            return (
                f"{host!r} is not a valid host name (label {label!r}: letters, digits, '-' and '_', "
                f"1-63 characters, no '-' at either end)"
            )
    return None


def _parse_replica(fields: list[str], options: dict[str, int], where: str, lineno: int) -> ReplicaAddr:
    if len(fields) != 4:
        raise ConfigError(
            f"{where}: replica line has {len(fields) + 1} fields, expected 5; write it as '{REPLICA_FIELDS}'"
        )
    rid = _parse_int(fields[0], "replica id", 0, MAX_REPLICAS - 1, where)
    host = _parse_host(fields[1], where, listen=False)
    peer = _parse_int(fields[2], "peer_port", 1, 65535, where)
    client = _parse_int(fields[3], "client_port", 1, 65535, where)
    return ReplicaAddr(rid, host, peer, client, options.get("metrics"), lineno)


def _parse_gateway(fields: list[str], options: dict[str, int], where: str, lineno: int) -> GatewayAddr:
    if len(fields) != 3:
        raise ConfigError(
            f"{where}: gateway line has {len(fields) + 1} fields, expected 4; write it as '{GATEWAY_FIELDS}'"
        )
    gid = _parse_int(fields[0], "gateway id", 0, MAX_GATEWAY_ID, where)
    host = _parse_host(fields[1], where, listen=True)
    port = _parse_int(fields[2], "port", 1, 65535, where)
    return GatewayAddr(gid, host, port, options.get("metrics"), lineno)


def _split_options(tokens: list[str], where: str) -> tuple[list[str], dict[str, int]]:
    positional: list[str] = []
    options: dict[str, int] = {}
    for tok in tokens:
        if "=" not in tok:
            if options:
                raise ConfigError(
                    f"{where}: field {tok!r} after an option; key=value options go at the end of the line"
                )
            positional.append(tok)
            continue
        key, value = tok.split("=", 1)
        if key not in OPTIONS:
            raise ConfigError(
                f"{where}: unknown option {key!r}{did_you_mean(key, OPTIONS)}; "
                f"valid options: {', '.join(o + '=PORT' for o in OPTIONS)}"
            )
        if key in options:
            raise ConfigError(f"{where}: option {key!r} given twice; keep one")
        options[key] = _parse_int(value, f"{key} port", 1, 65535, where)
    return positional, options


def _parse_int(text: str, what: str, lo: int, hi: int, where: str) -> int:
    # int() alone would accept "+1", "1_000" and non-ASCII digits; a hosts file has plain decimals.
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"{where}: {what} {text!r} is not an integer; write a decimal number {lo}..{hi}")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: {what} {value} is out of range; use {lo}..{hi}")
    return value


def _parse_host(text: str, where: str, *, listen: bool) -> str:
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text  # [::1] is common
    problem = check_host(host, listen=listen)
    if problem:
        raise ConfigError(f"{where}: invalid host: {problem}; use an IPv4/IPv6 address or a DNS name")
    try:
        return str(ipaddress.ip_address(host))  # one spelling per address, so duplicates are caught
    except ValueError:
        return host.lower().rstrip(".")  # DNS is case-insensitive; a trailing dot names the same host


def _claim(
    listeners: dict[tuple[str, int], tuple[int, str]], host: str, port: int, lineno: int, what: str, where: str
) -> None:
    key = (host, port)
    if key in listeners:
        first_line, first_what = listeners[key]
        raise ConfigError(
            f"{where}: {what} {_hostport(host, port)} is already used by {first_what} "
            f"(line {first_line}); give every listener its own host:port"
        )
    listeners[key] = (lineno, what)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint(host: str, port: int) -> str:
    return f"tcp://{_hostport(host, port)}"


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
