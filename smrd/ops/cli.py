"""The `smrd` command line: parse argv, load the one Config, configure logging, hand over.

Owns: the argument grammar (the role form and the subcommands), logging setup, and the mapping
of outcomes to exit codes (0 ok, 1 runtime failure, 2 usage/config error, 70 internal error,
130 interrupted).
Must never: print a traceback for a configuration mistake, run a role with a Config that failed
validation, or import the drivers eagerly (`smrd --help` must work in a build that lacks them,
and must not pay for importing ZeroMQ).
"""
import argparse
import importlib
import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..config.settings import SETTINGS, load_config
from ..config.views import add_setting_flags
from ..errors import ConfigError, SmrdError
from ..config.hosts import MAX_REPLICAS

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1  # the role ran and failed (or a runtime SmrdError)
EXIT_USAGE = 2  # bad command line or configuration; argparse uses 2 as well
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in smrd, or a part missing from this build
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

# Subcommands whose code lives in a module not named after them.
SUBCOMMAND_MODULES = {"keygen": "smrd.net.security", "local": "smrd.ops.local",
                      "status": "smrd.ops.status", "admin": "smrd.ops.admin"}

DESCRIPTION = """\
smrd makes a deterministic TCP service fault-tolerant without changing it.

Roles (one binary):
  server   a replica, one per pod, beside the unchanged app: takes part in consensus, executes the
           agreed order of requests on the app at app_host:app_port, answers the gateways.
           smrd --role server -c hosts.conf --id N
  client   a gateway: what outside clients reach. Frames their requests, sends them to the
           replicas, waits for the reply quorum, answers, retransmits on timeout. Stateless.
           smrd --role client -c hosts.conf [--id N]
"""

EPILOG = """\
configuration layering (later wins):
  built-in default < settings file (--settings FILE or SMRD_SETTINGS; TOML, flat keys)
  < environment (SMRD_<NAME>, e.g. SMRD_TICK_MS=20) < command-line flag (--tick-ms 20).
  Everything is validated once, before anything starts; --log-level debug logs every effective
  value with its source. The hosts file (-c) lists replicas and gateways; see docs/configuration.md.

subcommands:
  smrd local   start a whole local cluster (replicas + gateways) from built-in defaults
  smrd status  ask every replica in a hosts file for its role, view, leader and progress
  smrd admin   the replica group's membership: admin members | join ID | leave ID|--self
               (replicas join as learners, are promoted when caught up; docs/membership.md)
  smrd keygen  write a CURVE key pair (NAME.key, NAME.pub) for encrypted, authenticated
               smrd-to-smrd traffic (settings curve_secret_key, curve_public_keys; docs/security.md)
  smrd kv      the demo key-value client (arguments are passed through; smrd kv --help)

exit codes:
  0    success
  1    runtime failure (the role or subcommand ran and failed)
  2    usage or configuration error (one line on stderr, no traceback)
  70   internal error (a bug, or a part missing from this build); rerun with --log-level debug
       for the traceback
  130  interrupted (Ctrl-C)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smrd",
        usage="smrd --role {server,client} -c HOSTS [--settings FILE] [--id N] [--SETTING VALUE ...]\n"
        "       smrd {local,status,admin,keygen,kv} ...",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --tick must not mean --tick-ms: a later setting would make it ambiguous
    )
    parser.add_argument("--version", action="version", version=f"smrd {__version__}")
    add_setting_flags(parser)

    sub = parser.add_subparsers(dest="command", title="subcommands", metavar="{local,status,admin,keygen,kv}")
    local = sub.add_parser(
        "local", prog="smrd local", allow_abbrev=False, help="start a whole local cluster from built-in defaults",
        description="Start n replicas, the demo app beside each, and gateways on 127.0.0.1.",
    )
    local.add_argument("--replicas", type=_replica_count, default=3, metavar="N", help="replicas, 1..64 (default: 3)")
    local.add_argument("--gateways", type=_positive_int, default=1, metavar="N", help="gateways (default: 1)")
    local.add_argument("--framing", choices=SETTINGS["framing"].choices, default=SETTINGS["framing"].default,
                       help="framing of the demo app and gateways (default: %(default)s)")
    local.add_argument("--base-port", type=_port, default=11000, metavar="PORT",
                       help="first port; each process takes the next ones (default: %(default)s)")
    local.add_argument("--data-dir", default="./smrd-local", metavar="DIR",
                       help="where the replicas keep their logs (default: %(default)s)")
    local.add_argument("--app-cmd", metavar="CMD", type=_app_command,
                       help="run this app beside each replica instead of the demo hashmap: a command "
                       "line (split as a shell would, not run by one) in which {port} is the port it "
                       "must listen on (127.0.0.1), {id} the replica id and {dir} a directory of its "
                       "own; e.g. --framing resp --app-cmd 'redis-server --port {port} --save \"\" "
                       "--appendonly no'. It counts as up once {port} accepts connections. No snapshot "
                       "hooks: a replica rebuilds the app by replaying its log. See examples/.")
    local.add_argument("--app-data-paths", metavar="PATHS", default="",
                       help="with --app-cmd: files or directories (comma-separated; {id} and {dir} "
                       "as above) that hold the app's own state and that smrd empties before it "
                       "restarts the app (the app_data_paths setting)")

    status = sub.add_parser(
        "status", prog="smrd status", allow_abbrev=False, help="show each replica's view, leader and progress",
        description="Ask every replica in the hosts file for its status (through its metrics/health port).",
    )
    _add_cluster_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=_positive_float, default=2.0, metavar="S",
                        help="seconds to wait for each replica (default: %(default)s)")

    _add_admin_parser(sub)

    keygen = sub.add_parser(
        "keygen", prog="smrd keygen", allow_abbrev=False, help="write a CURVE key pair (NAME.key, NAME.pub)",
        description="Write DIR/NAME.key (the secret key, mode 0600) and DIR/NAME.pub (the public key), "
        "each one line of Z85 text. Existing files are never overwritten. Name replicas' keys "
        "replica-<id>: other processes find a replica's public key as replica-<id>.pub in the "
        "allow-list directory. See docs/security.md.",
    )
    where = keygen.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="directory to write to (created, mode 0700, if missing)")
    # In a pod (the Helm chart's pre-install Job; the image has no kubectl): store the keys in
    # Kubernetes objects of the pod's namespace instead of files (smrd/ops/keystore.py).
    where.add_argument("--kube-secret", metavar="SECRET",
                       help="in a Kubernetes pod: store the secret keys (NAME.key) in this Secret and "
                       "the public keys (NAME.pub) in --kube-configmap, using the pod's service account; "
                       "objects that exist are left alone")
    keygen.add_argument("--name", action="append", metavar="NAME",
                        help="key name, e.g. replica-0, gateway-0; repeat for several pairs (default: smrd)")
    keygen.add_argument("--kube-configmap", metavar="CONFIGMAP",
                        help="with --kube-secret: the ConfigMap for the allow-list (the public keys)")
    keygen.add_argument("--kube-label", action="append", metavar="KEY=VALUE",
                        help="with --kube-secret: a label for both objects; repeat for several")

    kv = sub.add_parser("kv", prog="smrd kv", allow_abbrev=False, help="demo key-value client (smrd kv --help)", add_help=False)
    kv.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """-c, --settings and the CURVE flags of the tools that talk to a running cluster."""
    p.add_argument("-c", "--hosts", dest="hosts", default=argparse.SUPPRESS, metavar="PATH",
                   help="hosts file (or SMRD_HOSTS)")
    p.add_argument("--settings", dest="settings", default=argparse.SUPPRESS, metavar="FILE",
                   help="settings file, for the CURVE settings (or SMRD_SETTINGS)")
    for name in ("curve_secret_key", "curve_public_keys"):  # a secured cluster answers only listed keys
        spec = SETTINGS[name]
        p.add_argument(spec.flag, dest=name, default=argparse.SUPPRESS, metavar=spec.metavar,
                       help=f"as for the roles (or {spec.env}); see docs/security.md")


ADMIN_DESCRIPTION = """\
Read and change the replica group's membership. hosts.conf lists the candidates (replica ids
0..n-1); the membership (which of them vote, which are learners catching up) is replicated state,
changed one step at a time through consensus, and shown by `smrd status`. A change is sent to
every replica of hosts.conf like a gateway's request; the leader orders it (or refuses it) and the
core's answer is printed. See docs/membership.md.

  smrd admin members -c hosts.conf [--json]
      ask every replica for its status; print the agreed membership (the highest index any
      replica applied) and each replica's role, view, leader and commit point.
      Exit 1 if no replica answers.
  smrd admin join ID -c hosts.conf [--timeout S]
      add replica ID as a learner, wait until it has caught up (it must be running), then promote
      it to voter. Idempotent: a learner is only promoted, a voter is left as it is.
  smrd admin leave ID -c hosts.conf [--timeout S]
  smrd admin leave --self [--if-scaled-down] -c hosts.conf
      remove replica ID and wait until the agreed membership no longer has it; stop it
      afterwards (removing the leader moves the group to the next view at once). --self: this replica (SMRD_ID).
      --if-scaled-down (the Kubernetes preStop hook): only if the pod's StatefulSet now has
      fewer replicas than this pod's ordinal + 1; otherwise do nothing and exit 0.

A refused change (it would lose quorum, the last voter, ...) exits 1 with the reason on one line;
so does a cluster that does not answer. A replica id that is not in hosts.conf exits 2."""


def _add_admin_parser(sub) -> None:
    admin = sub.add_parser(
        "admin", prog="smrd admin", allow_abbrev=False, help="membership: members, join, leave",
        description=ADMIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = admin.add_subparsers(dest="admin_command", title="commands", metavar="{members,join,leave}",
                                    required=True)

    def common(p):
        _add_cluster_flags(p)
        p.add_argument("--query-timeout", type=_positive_float, default=2.0, metavar="S",
                       help="seconds to wait for the replicas' status answers (default: %(default)s)")

    members = commands.add_parser(
        "members", prog="smrd admin members", allow_abbrev=False, help="show the agreed membership",
        description="Ask every replica of the hosts file for its status and print the agreed "
        "membership (the highest index reported) and each replica's role, view, leader and commit "
        "point. Exit 1 if no replica answers.")
    common(members)
    members.add_argument("--json", action="store_true", help="print JSON: {membership, replicas}")

    join = commands.add_parser(
        "join", prog="smrd admin join", allow_abbrev=False, help="add a replica: learner, then voter",
        description="Add replica ID (a candidate of the hosts file, running) as a learner, wait "
        "until it has caught up, then promote it to voter. Idempotent: run it again after a "
        "timeout, or for a replica that already joined by itself (auto_join).")
    join.add_argument("replica", type=_replica_id, metavar="ID", help="replica id from the hosts file")
    common(join)
    join.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S",
                      help="give up (exit 1) after this many seconds (default: %(default)s)")

    leave = commands.add_parser(
        "leave", prog="smrd admin leave", allow_abbrev=False, help="remove a replica from the group",
        description="Remove replica ID from the membership (removing the leader moves every replica to "
        "the next view at once, with no election timeout) "
        "and wait until the agreed membership no longer has it. Stop the replica afterwards. A "
        "removal that would leave the voters without a quorum of running replicas is refused.")
    leave.add_argument("replica", type=_replica_id, nargs="?", default=None, metavar="ID",
                       help="replica id from the hosts file (or --self)")
    leave.add_argument("--self", action="store_true",
                       help="this replica: the id setting (SMRD_ID or id in the settings file)")
    leave.add_argument("--if-scaled-down", action="store_true",
                       help="Kubernetes preStop: leave only if this pod's StatefulSet was scaled "
                       "down below it (spec.replicas <= ID); otherwise do nothing, exit 0")
    common(leave)
    leave.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                       help="give up (exit 1) after this many seconds (default: %(default)s)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        if argv[:1] == ["kv"]:  # pass everything through untouched, --help included
            return _dispatch("smrd.apps.kvclient", "the kv demo client", argv[1:])
        parser = build_parser()
        if not argv:
            parser.print_usage(sys.stderr)
            _error("nothing to do; give --role server|client -c HOSTS, or a subcommand (see smrd --help)")
            return EXIT_USAGE
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version and argparse's own usage errors
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if args.command == "kv":
            return _dispatch("smrd.apps.kvclient", "the kv demo client", args.argv)
        if args.command is not None:
            _configure_logging(getattr(args, "log_level", None) or "info", getattr(args, "log_format", None) or "text")
            module = SUBCOMMAND_MODULES[args.command]
            return _dispatch(module, f"smrd {args.command}", args)
        return _run_role(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `smrd --help | head`: the reader left; not an internal error
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except SmrdError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except Exception as exc:
        if debug or log.isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc}"
               + ("" if debug else "; rerun with --log-level debug for the traceback"))
        return EXIT_INTERNAL


def _run_role(args: argparse.Namespace) -> int:
    config = load_config(args)
    _configure_logging(config.settings.log_level, config.settings.log_format)
    for warning in config.warnings:
        log.warning("%s", warning)
    log.debug("%s", config.describe())
    module = "smrd.replica.driver" if config.settings.role == "server" else "smrd.gateway.driver"
    return _dispatch(module, f"role {config.settings.role}", config, func="run")


def _dispatch(module: str, what: str, arg: Any, func: str = "main") -> int:
    """Import `module` only now and call module.func(arg); its result is the exit code."""
    try:
        target = getattr(importlib.import_module(module), func)
    except ImportError as exc:
        _error(f"{what} is not available in this build: cannot import {module}.{func} ({exc})")
        return EXIT_INTERNAL
    except AttributeError:
        _error(f"{what} is not available in this build: {module} has no {func}()")
        return EXIT_INTERNAL
    result = target(arg)
    return EXIT_OK if result is None else int(result)


def _error(message: str) -> None:
    # One line, always: operators grep for it and supervisors show only the last line.
    print("smrd: error: " + " ".join(str(message).split()), file=sys.stderr)


def _debug_requested(argv: Sequence[str]) -> bool:
    """Before the Config exists: did the user ask for debug (so an internal error shows its traceback)?"""
    for i, arg in enumerate(argv):
        if arg == "--log-level=debug" or (arg == "--log-level" and argv[i + 1: i + 2] == ["debug"]):
            return True
    return os.environ.get("SMRD_LOG_LEVEL", "").strip().lower() == "debug"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(level: str, fmt: str) -> None:
    # By hand rather than logging.config.dictConfig: that module (and logging.handlers under
    # it) costs every process start ~10 ms of imports for these four lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def _replica_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a replica id (a whole number)") from None
    if not 0 <= value < MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"{value} is not a replica id (0..{MAX_REPLICAS - 1})")
    return value


def _replica_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"{value} replicas: at most {MAX_REPLICAS}")
    return value


def _app_command(value: str) -> str:
    try:
        argv = shlex.split(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"cannot split {value!r} into words: {e}")
    if not argv:
        raise argparse.ArgumentTypeError("the app command is empty")
    if not any("{port}" in word for word in argv):
        raise argparse.ArgumentTypeError(
            f"{value!r} has no {{port}}: the app must listen on the port smrd gives it "
            "(each replica's app gets its own)")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1..65535)")
    return value
