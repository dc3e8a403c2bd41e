# The command line: --version/--help, exit codes, lazy dispatch to roles and subcommands (faked
# here, since the drivers live elsewhere), and one real `python -m smrd` run proving a config error
# prints one line and no traceback.
import logging
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from smrd import __version__
from smrd.ops import cli
from smrd.errors import SmrdError

ROOT = Path(__file__).resolve().parents[2]
HOSTS = str(ROOT / "conf" / "hosts.conf")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    # main() configures the root logger; put it back so other tests' logging is untouched.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for key in list(os.environ):
        if key.startswith("SMRD_"):
            monkeypatch.delenv(key)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def fake_module(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"smrd {__version__}\n"


def test_help_explains_roles_layering_subcommands_and_exit_codes(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("server", "replica", "client", "gateway", "SMRD_<NAME>", "settings file", "local", "status", "kv",
                 "exit codes", "70", "130", "--log-level debug", "--tick-ms", "-c PATH, --hosts PATH"):
        assert text in out, text


@pytest.mark.parametrize("argv", [["local", "--help"], ["status", "--help"]])
def test_subcommand_help(argv, capsys):
    assert cli.main(argv) == 0
    assert "usage: smrd " + argv[0] in capsys.readouterr().out


def test_bad_role_is_a_usage_error(capsys):
    assert cli.main(["--role", "leader", "-c", HOSTS]) == 2
    err = capsys.readouterr().err
    assert err == "smrd: error: flag --role: 'leader' is not one of server, client; pick one of those\n"


def test_missing_hosts_file_option(capsys):
    assert cli.main(["--role", "server", "--id", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smrd: error: no hosts file given; pass -c/--hosts PATH or set SMRD_HOSTS")


def test_no_arguments_prints_usage(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: smrd") and "smrd: error: nothing to do" in err


def test_argparse_errors_exit_2(capsys):
    assert cli.main(["--no-such-flag"]) == 2
    assert cli.main(["local", "--replicas", "zero"]) == 2
    err = capsys.readouterr().err
    assert "smrd: error: unrecognized arguments: --no-such-flag" in err
    assert "smrd local: error: argument --replicas: 'zero' is not an integer" in err


def test_server_role_runs_with_the_validated_config(monkeypatch):
    seen = []
    fake_module(monkeypatch, "smrd.replica.driver", run=lambda config: seen.append(config) or 0)
    assert cli.main(["--role", "server", "-c", HOSTS, "--id", "1", "--window", "8"]) == 0
    (config,) = seen
    assert config.role == "server" and config.id == 1 and config.settings.window == 8
    assert config.replica.peer_port == 11010


def test_client_role_exit_code_is_the_drivers(monkeypatch):
    fake_module(monkeypatch, "smrd.gateway.driver", run=lambda config: 1)
    assert cli.main(["--role", "client", "-c", HOSTS]) == 1


def test_role_from_environment(monkeypatch):
    seen = []
    fake_module(monkeypatch, "smrd.gateway.driver", run=lambda config: seen.append(config))
    monkeypatch.setenv("SMRD_ROLE", "client")
    monkeypatch.setenv("SMRD_HOSTS", HOSTS)
    assert cli.main(["--log-level", "warning"]) == 0
    assert seen[0].sources["role"].kind == "env"


def test_missing_driver_is_an_internal_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smrd.replica.driver", None)  # makes `import smrd.replica.driver` fail
    assert cli.main(["--role", "server", "-c", HOSTS, "--id", "0"]) == 70
    err = capsys.readouterr().err
    assert err.startswith("smrd: error: role server is not available in this build: cannot import smrd.replica.driver.run")
    assert err.count("\n") == 1


def test_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    def boom(config):
        raise RuntimeError("bad thing")

    fake_module(monkeypatch, "smrd.replica.driver", run=boom)
    assert cli.main(["--role", "server", "-c", HOSTS, "--id", "0"]) == 70
    err = capsys.readouterr().err
    assert err == ("smrd: error: internal error: RuntimeError: bad thing; "
                   "rerun with --log-level debug for the traceback\n")


def test_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(config):
        raise RuntimeError("bad thing")

    fake_module(monkeypatch, "smrd.replica.driver", run=boom)
    assert cli.main(["--role", "server", "-c", HOSTS, "--id", "0", "--log-level", "debug"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "smrd: error: internal error: RuntimeError: bad thing\n" in err
    assert "config: role='server' (flag --role)" in err  # describe() at debug level


def test_runtime_error_and_interrupt(monkeypatch, capsys):
    def fail(config):
        raise SmrdError("app unreachable at 127.0.0.1:7000")

    def interrupt(config):
        raise KeyboardInterrupt

    fake_module(monkeypatch, "smrd.replica.driver", run=fail)
    assert cli.main(["--role", "server", "-c", HOSTS, "--id", "0"]) == 1
    assert capsys.readouterr().err == "smrd: error: app unreachable at 127.0.0.1:7000\n"
    fake_module(monkeypatch, "smrd.replica.driver", run=interrupt)
    assert cli.main(["--role", "server", "-c", HOSTS, "--id", "0"]) == 130


def test_warnings_are_logged(monkeypatch, tmp_path, capsys):
    hosts = tmp_path / "two.conf"
    hosts.write_text("replica 0 127.0.0.1 1 2\nreplica 1 127.0.0.1 3 4\n")
    fake_module(monkeypatch, "smrd.replica.driver", run=lambda config: 0)
    assert cli.main(["--role", "server", "-c", str(hosts), "--id", "0", "--log-format", "json"]) == 0
    err = capsys.readouterr().err
    assert '"level": "warning"' in err and "n=2 tolerates no failure; use n >= 3" in err


def test_local_subcommand_defaults(monkeypatch):
    seen = []
    fake_module(monkeypatch, "smrd.ops.local", main=lambda args: seen.append(args) or 0)
    assert cli.main(["local"]) == 0
    args = seen[0]
    assert (args.replicas, args.gateways, args.framing, args.base_port, args.data_dir) == (3, 1, "line", 11000, "./smrd-local")
    assert cli.main(["local", "--replicas", "5", "--framing", "http", "--base-port", "12000", "--gateways", "2"]) == 0
    assert (seen[1].replicas, seen[1].framing, seen[1].base_port, seen[1].gateways) == (5, "http", 12000, 2)


def test_status_subcommand_can_load_the_config(monkeypatch):
    from smrd.config.settings import load_config

    seen = []
    fake_module(monkeypatch, "smrd.ops.status", main=lambda args: seen.append((args, load_config(args, need_role=False))) or 0)
    assert cli.main(["status", "-c", HOSTS, "--json", "--timeout", "0.5"]) == 0
    args, config = seen[0]
    assert args.json and args.timeout == 0.5 and config.hosts.n == 3


def test_kv_passes_everything_through(monkeypatch):
    seen = []
    fake_module(monkeypatch, "smrd.apps.kvclient", main=lambda argv: seen.append(argv) or 0)
    assert cli.main(["kv", "--help", "put", "k", "--x"]) == 0
    assert cli.main(["--log-level", "info", "kv", "get", "k"]) == 0
    assert seen == [["--help", "put", "k", "--x"], ["get", "k"]]


def test_missing_subcommand_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smrd.ops.local", None)
    assert cli.main(["local"]) == 70
    assert "smrd local is not available in this build" in capsys.readouterr().err


def run_module(*args, env=None):
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("SMRD_")}
    clean_env["PYTHONPATH"] = str(ROOT) + os.pathsep + clean_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "smrd", *args], capture_output=True, text=True,
                          env={**clean_env, **(env or {})}, cwd=ROOT, timeout=30)


def test_python_m_smrd_config_error_prints_no_traceback(tmp_path):
    bad = tmp_path / "hosts.conf"
    bad.write_text("replica 0 127.0.0.1 11000 11001\nreplica 0 127.0.0.1 11010 11011\n")
    proc = run_module("--role", "server", "-c", str(bad), "--id", "0", env={"SMRD_WINDOW": "2"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr == f"smrd: error: {bad}:2: duplicate replica id 0 (first declared on line 1); give each replica its own id\n"


def test_python_m_smrd_version_and_unknown_env():
    assert run_module("--version").stdout == f"smrd {__version__}\n"
    proc = run_module("--role", "client", "-c", HOSTS, env={"SMRD_WINDOWS": "2"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "SMRD_WINDOWS is not a smrd setting (did you mean 'SMRD_WINDOW'?)" in proc.stderr


@pytest.mark.parametrize("argv", [["admin", "--help"], ["admin", "members", "--help"],
                                  ["admin", "join", "--help"], ["admin", "leave", "--help"]])
def test_admin_help(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: smrd admin" in out
    if argv[1] == "--help":
        for text in ("members", "join ID", "leave ID", "--self", "--if-scaled-down", "learner",
                     "exits 1", "docs/membership.md"):
            assert text in out, text


def test_admin_dispatches_lazily_with_its_arguments(monkeypatch):
    seen = []
    fake_module(monkeypatch, "smrd.ops.admin", main=lambda args: seen.append(args) or 0)
    assert cli.main(["admin", "leave", "--self", "--if-scaled-down", "-c", HOSTS, "--timeout", "5"]) == 0
    (args,) = seen
    assert args.admin_command == "leave" and args.self and args.if_scaled_down and args.timeout == 5.0
    assert args.replica is None and args.hosts == HOSTS
    assert cli.main(["admin", "join", "3", "-c", HOSTS]) == 0
    assert seen[1].replica == 3 and seen[1].timeout == 120.0


def test_admin_needs_a_command(capsys):
    assert cli.main(["admin"]) == 2
    assert "smrd admin: error: the following arguments are required: {members,join,leave}" in capsys.readouterr().err


def test_a_taken_port_is_one_clear_line_not_an_internal_error(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    hosts = tmp_path / "hosts.conf"
    hosts.write_text(f"replica 0 127.0.0.1 {taken} {taken + 1}\ngateway 0 127.0.0.1 {taken + 2}\n")
    with holder:
        proc = run_module("--role", "server", "-c", str(hosts), "--id", "0", "--data-dir",
                          str(tmp_path / "data"), "--durability", "memory", "--metrics-port", "0")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert f"smrd: error: cannot listen on tcp://127.0.0.1:{taken}: Address already in use" in proc.stderr
