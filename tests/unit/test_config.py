# Settings: defaults, the file < env < flag layering with sources, every validation rule (message
# content), garbage files, and that the generated docs/example are up to date.
import argparse
import re
from pathlib import Path

import pytest

from smrd.config.settings import SETTINGS, Settings, load_config
from smrd.config.views import add_setting_flags, render_docs, settings_markdown, settings_toml
from smrd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

HOSTS = """\
replica 0 127.0.0.1 11000 11001 metrics=9100
replica 1 127.0.0.1 11010 11011
replica 2 127.0.0.1 11020 11021
gateway 0 0.0.0.0 8080 metrics=9200
gateway 5 0.0.0.0 8085
"""


@pytest.fixture
def hosts(tmp_path):
    path = tmp_path / "hosts.conf"
    path.write_text(HOSTS)
    return str(path)


def server(hosts_path, **flags):
    return {"role": "server", "id": 0, "hosts": hosts_path, **flags}


def load(hosts, env=None, **flags):
    return load_config(server(hosts, **flags), env=env or {})


def error(hosts_path, env=None, settings_text=None, tmp_path=None, **flags):
    if settings_text is not None:
        path = tmp_path / "smrd.toml"
        path.write_text(settings_text)
        flags["settings"] = str(path)
    with pytest.raises(ConfigError) as err:
        load_config(server(hosts_path, **flags), env=env or {})
    message = str(err.value)
    assert "\n" not in message
    return message


# --- defaults and the table ------------------------------------------------------------------

def test_defaults(hosts):
    config = load(hosts)
    s = config.settings
    expected = {
        "batch_max_requests": 1024, "batch_max_bytes": 1 << 20, "window": 4, "tick_ms": 10,
        "heartbeat_ms": 50, "election_timeout_ms": 500, "request_timeout_ms": 1000, "reply_quorum": 1,
        "reply_cache_size": 1024, "session_ttl_s": 3600, "gateway_request_deadline_ms": 10_000,
        "gateway_retransmit_ms": 500, "app_host": "127.0.0.1", "app_port": 7000, "framing": "line",
        "app_timeout_ms": 5000, "max_request_bytes": 1 << 20, "max_inflight_per_gateway": 4096,
        "durability": "fsync", "hwm": 10_000, "log_level": "info", "log_format": "text", "metrics_port": 0,
        "settings": None,
    }
    assert {k: getattr(s, k) for k in expected} == expected
    assert s.data_dir == "./smrd-data/replica-0"
    assert config.sources["tick_ms"].kind == "default"
    assert config.sources["role"].kind == "flag"
    assert config.warnings == ()
    assert config.hosts.n == 3
    assert config.replica.client_port == 11001
    assert set(SETTINGS) == {f for f in Settings.__dataclass_fields__}


def test_every_setting_has_help_env_and_flag():
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    for spec in SETTINGS.values():
        assert spec.help and spec.env == "SMRD_" + spec.name.upper()
        assert spec.flag == "--" + spec.name.replace("_", "-")
        ns = parser.parse_args([spec.flag, "1"])
        assert getattr(ns, spec.name) == "1"
    assert vars(parser.parse_args([])) == {}, "absent flags must leave no attribute"
    assert parser.parse_args(["-c", "x"]).hosts == "x"


# --- layering --------------------------------------------------------------------------------

def test_layering_file_env_flag(hosts, tmp_path):
    toml = tmp_path / "smrd.toml"
    toml.write_text("# comment\nwindow = 8\nhwm = 5\nframing = 'http'\n")
    env = {"SMRD_WINDOW": "16", "SMRD_HWM": "6", "SMRD_SETTINGS": str(toml)}
    config = load(hosts, env, window="32")
    s, src = config.settings, config.sources
    assert (s.window, str(src["window"])) == (32, "flag --window")
    assert (s.hwm, str(src["hwm"])) == (6, "env SMRD_HWM")
    assert (s.framing, str(src["framing"])) == ("http", f"file {toml}:4")
    assert (s.settings, str(src["settings"])) == (str(toml), "env SMRD_SETTINGS")
    assert str(src["tick_ms"]) == "default"
    line = config.describe()
    assert "window=32 (flag --window)" in line and "hwm=6 (env SMRD_HWM)" in line
    assert f"framing='http' (file {toml}:4)" in line and "tick_ms=10 (default)" in line
    assert "\n" not in line

    config = load(hosts, env)
    assert (config.settings.window, config.sources["window"].kind) == (16, "env")
    del env["SMRD_WINDOW"]
    assert load(hosts, env).settings.window == 8


def test_flag_settings_path_beats_env(hosts, tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("window = 2\n")
    b.write_text("window = 3\n")
    config = load(hosts, {"SMRD_SETTINGS": str(a)}, settings=str(b))
    assert config.settings.window == 3 and str(config.sources["settings"]) == "flag --settings"


def test_argparse_namespace_is_accepted_and_extra_attributes_ignored(hosts):
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    ns = parser.parse_args(["--role", "server", "--id", "1", "-c", hosts, "--tick-ms", "5", "--batch-max-bytes", "2MiB"])
    ns.command = None  # a subcommand's own attributes are not settings
    config = load_config(ns, env={})
    assert config.settings.id == 1 and config.settings.tick_ms == 5
    assert config.settings.batch_max_bytes == 2 * 1024 * 1024
    assert str(config.sources["hosts"]) == "flag -c/--hosts"
    assert config.settings.data_dir == "./smrd-data/replica-1"


def test_env_provides_role_id_and_hosts(hosts):
    config = load_config({}, env={"SMRD_ROLE": "SERVER", "SMRD_ID": "2", "SMRD_HOSTS": hosts, "SMRD_NO_EXTENSIONS": "1", "PATH": "/bin"})
    assert (config.role, config.id) == ("server", 2)


def test_paths_in_the_settings_file_are_relative_to_it(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "hosts.conf").write_text(HOSTS)
    toml = conf / "smrd.toml"
    toml.write_text('role = "server"\nid = 1\nhosts = "hosts.conf"\ndata_dir = "data"\n')
    config = load_config({"settings": str(toml)}, env={})
    assert config.settings.hosts == str(conf / "hosts.conf")
    assert config.settings.data_dir == str(conf / "data")
    assert config.id == 1


def test_sizes_and_choices(hosts):
    s = load(hosts, {"SMRD_MAX_REQUEST_BYTES": "2 k"}, batch_max_bytes="2M", log_level="DEBUG").settings
    assert (s.max_request_bytes, s.batch_max_bytes, s.log_level) == (2048, 2 << 20, "debug")
    assert load(hosts, batch_max_bytes="8MiB").settings.batch_max_bytes == 8 << 20


def test_toml_sizes_may_be_strings(hosts, tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('batch_max_bytes = "4MiB"\nmax_request_bytes = 4096\n')
    s = load(hosts, settings=str(toml)).settings
    assert (s.batch_max_bytes, s.max_request_bytes) == (4 << 20, 4096)


# --- unknown names ----------------------------------------------------------------------------

def test_unknown_file_key_suggests(hosts, tmp_path):
    msg = error(hosts, settings_text="window = 2\n\ntick_msec = 10\n", tmp_path=tmp_path)
    assert re.search(r"smrd\.toml:3: key 'tick_msec' is not a smrd setting \(did you mean 'tick_ms'\?\)", msg), msg


def test_dashed_file_key_suggests_underscores(hosts, tmp_path):
    assert "did you mean 'heartbeat_ms'" in error(hosts, settings_text="heartbeat-ms = 50\n", tmp_path=tmp_path)


def test_settings_key_in_file_is_refused(hosts, tmp_path):
    msg = error(hosts, settings_text='settings = "x.toml"\n', tmp_path=tmp_path)
    assert "names the settings file itself" in msg and "SMRD_SETTINGS" in msg


def test_table_in_file_is_refused(hosts, tmp_path):
    msg = error(hosts, settings_text="[consensus]\nwindow = 2\n", tmp_path=tmp_path)
    assert "[consensus] is a table, but the settings file is flat" in msg


def test_unknown_env_suggests(hosts):
    msg = error(hosts, env={"SMRD_TICKMS": "10"})
    assert msg.startswith("environment variable SMRD_TICKMS is not a smrd setting (did you mean 'SMRD_TICK_MS'?)"), msg


def test_unknown_flag_in_dict(hosts):
    assert "flag --tick-msec is not a smrd setting (did you mean '--tick-ms'?)" in error(hosts, tick_msec=5)


# --- types and ranges per source --------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ('tick_ms = "10"\n', r"smrd\.toml:1: tick_ms: expected an integer, got a string '10'; write it without quotes"),
        ("window = 1.5\n", r"smrd\.toml:1: window: expected an integer, got a float 1\.5"),
        ("window = true\n", r"window: expected an integer, got a boolean True"),
        ("framing = 3\n", r"framing: expected a string, got an integer 3; quote it"),
        ("\n\nwindow = 0\n", r"smrd\.toml:3: window: 0 is out of range; use 1\.\.1024"),
        ('batch_max_bytes = "1MB"\n', r"batch_max_bytes: '1MB' is not an integer \(or a size like 64KiB, 1MiB\)"),
        ('framing = "lines"\n', r"framing: 'lines' is not one of close, line, length, http, resp \(did you mean 'line'\?\)"),
        ('app_host = "not a host"\n', r"app_host: 'not a host' is not a valid host name .*; fix the value"),
    ],
)
def test_file_type_errors_name_file_line_and_key(hosts, tmp_path, text, expected):
    assert re.search(expected, error(hosts, settings_text=text, tmp_path=tmp_path))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SMRD_TICK_MS": "ten"}, "environment variable SMRD_TICK_MS: 'ten' is not an integer; write a whole number of ms"),
        ({"SMRD_TICK_MS": ""}, "environment variable SMRD_TICK_MS: empty value"),
        ({"SMRD_HEARTBEAT_MS": "0"}, "environment variable SMRD_HEARTBEAT_MS: 0 ms is out of range; use 1 ms..60000 ms"),
        ({"SMRD_DURABILITY": "sometimes"}, "environment variable SMRD_DURABILITY: 'sometimes' is not one of fsync, nosync, memory"),
        ({"SMRD_BATCH_MAX_BYTES": "64"}, "SMRD_BATCH_MAX_BYTES: 64 bytes is out of range; use 1 KiB..32 MiB"),
        ({"SMRD_ROLE": "leader"}, "environment variable SMRD_ROLE: 'leader' is not one of server, client"),
        ({"SMRD_APP_HOST": "0.0.0.0"}, "environment variable SMRD_APP_HOST: 0.0.0.0 is a wildcard address"),
    ],
)
def test_env_type_errors_name_the_variable(hosts, env, expected):
    flags = {"hosts": hosts}
    with pytest.raises(ConfigError) as err:
        load_config(flags, env=env)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"window": "many"}, "flag --window: 'many' is not an integer"),
        ({"app_port": "0"}, "flag --app-port: 0 is out of range; use 1..65535"),
        ({"id": "64"}, "id 64 (flag --id) is not a replica in"),
        ({"role": "primary"}, "flag --role: 'primary' is not one of server, client; pick one of those"),
        ({"log_format": "xml"}, "flag --log-format: 'xml' is not one of text, json"),
        ({"hosts": " "}, "flag -c/--hosts: the value is empty; fix the value"),
    ],
)
def test_flag_errors_name_the_flag(hosts, flags, expected):
    assert expected in error(hosts, **flags)


# --- across settings --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"heartbeat_ms": "55"}, "heartbeat_ms=55 (flag --heartbeat-ms) is not a multiple of tick_ms=10 (default)"),
        ({"election_timeout_ms": "505"}, "election_timeout_ms=505 (flag --election-timeout-ms) is not a multiple of tick_ms=10"),
        ({"request_timeout_ms": "1001"}, "request_timeout_ms=1001 (flag --request-timeout-ms) is not a multiple of tick_ms"),
        ({"tick_ms": "3"}, "heartbeat_ms=50 (default) is not a multiple of tick_ms=3 (flag --tick-ms)"),
        ({"heartbeat_ms": "500"}, "heartbeat_ms=500 (flag --heartbeat-ms) must be below election_timeout_ms=500 (default)"),
        ({"gateway_retransmit_ms": "10000"}, "gateway_retransmit_ms=10000 (flag --gateway-retransmit-ms) must be below gateway_request_deadline_ms=10000"),
        ({"session_ttl_s": "60"}, "gateway_request_deadline_ms=10000 (default) must be far below session_ttl_s=60 (flag --session-ttl-s) (at most 1/10 of it): exactly-once relies on no retransmission outliving its session"),
        ({"max_request_bytes": "2MiB"}, "max_request_bytes=2097152 (flag --max-request-bytes) must not exceed batch_max_bytes=1048576 (default)"),
        ({"reply_quorum": "4"}, "reply_quorum=4 (flag --reply-quorum) exceeds the 3 replicas"),
        ({"metrics_port": "11001"}, "metrics_port=11001 (flag --metrics-port) collides with replica 0's peer or client port"),
    ],
)
def test_cross_field_errors(hosts, flags, expected):
    assert expected in error(hosts, **flags)


def test_session_ttl_margin_boundary(hosts):
    assert load(hosts, session_ttl_s="100").settings.session_ttl_s == 100  # 10 s deadline = 1/10


def test_warnings(hosts):
    config = load(hosts, durability="memory", heartbeat_ms="200")
    assert any("durability=memory (flag --durability): a restart of a majority can lose decided" in w for w in config.warnings)
    assert any("election_timeout_ms=500 is under 3 heartbeats (200 ms)" in w for w in config.warnings)


def test_hosts_warnings_are_passed_on(tmp_path):
    path = tmp_path / "two.conf"
    path.write_text("replica 0 a 1 2\nreplica 1 b 1 2\n")
    config = load_config({"role": "server", "id": 1, "hosts": str(path)}, env={})
    assert any("n=2 tolerates no failure; use n >= 3" in w for w in config.warnings)


# --- role against the hosts file --------------------------------------------------------------

def test_role_is_required_unless_told_otherwise(hosts):
    with pytest.raises(ConfigError, match=r"no role given; pass --role server \(a replica beside the app\) or --role client"):
        load_config({"hosts": hosts}, env={})
    config = load_config({"hosts": hosts}, env={}, need_role=False)
    assert config.role is None and config.hosts.n == 3


def test_hosts_file_is_required(hosts):
    with pytest.raises(ConfigError, match=r"no hosts file given; pass -c/--hosts PATH or set SMRD_HOSTS"):
        load_config({"role": "client"}, env={})


def test_server_needs_an_id_in_hosts(hosts):
    with pytest.raises(ConfigError, match=r"role server needs a replica id; pass --id N .* 0\.\.2"):
        load_config({"role": "server", "hosts": hosts}, env={})
    assert "id 3 (flag --id) is not a replica in" in error(hosts, id=3)


def test_client_picks_lowest_gateway_by_default(hosts):
    config = load_config({"role": "client", "hosts": hosts}, env={})
    assert config.id == 0 and str(config.sources["id"]) == "derived lowest gateway id"
    assert config.gateway.port == 8080 and config.settings.data_dir is None
    assert config.metrics_port == 9200
    assert load_config({"role": "client", "id": 5, "hosts": hosts}, env={}).gateway.port == 8085
    with pytest.raises(ConfigError, match=r"id 1 \(flag --id\) is not a gateway in .* \(gateway ids: 0, 5\)"):
        load_config({"role": "client", "id": 1, "hosts": hosts}, env={})
    with pytest.raises(ConfigError, match="this process is not a replica"):
        config.replica


def test_client_needs_a_gateway_line(tmp_path):
    path = tmp_path / "h.conf"
    path.write_text("replica 0 a 1 2\nreplica 1 b 1 2\nreplica 2 c 1 2\n")
    with pytest.raises(ConfigError, match=r"role client needs a gateway line"):
        load_config({"role": "client", "hosts": str(path)}, env={})


def test_metrics_port_resolution(hosts):
    assert load(hosts).metrics_port == 9100  # from hosts.conf
    assert load(hosts, id=1).metrics_port == 0  # none given anywhere: off
    assert load(hosts, metrics_port="9999").metrics_port == 9999  # non-zero setting wins
    assert load(hosts, metrics_port="0").metrics_port == 9100  # 0 means "not set here"


def test_hosts_errors_surface_through_load_config(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("replica 0 a 1 2\nreplica 0 b 3 4\n")
    with pytest.raises(ConfigError, match=r"bad\.conf:2: duplicate replica id 0"):
        load_config({"role": "server", "id": 0, "hosts": str(path)}, env={})


# --- garbage settings files -------------------------------------------------------------------

def test_binary_settings_file(hosts, tmp_path):
    path = tmp_path / "smrd.toml"
    path.write_bytes(b"window = 2\n\xff\xfe\x00junk")
    msg = error(hosts, settings=str(path))
    assert re.search(r"smrd\.toml:2: not UTF-8 text \(byte 0xff\); the settings file must be TOML text", msg), msg


def test_toml_syntax_error_has_line_and_column(hosts, tmp_path):
    msg = error(hosts, settings_text="window = 2\ntick_ms 10\n", tmp_path=tmp_path)
    assert re.search(r"smrd\.toml:2:\d+: invalid TOML: .*; settings are flat lines like: tick_ms = 10$", msg), msg


def test_toml_error_at_end_of_file(hosts, tmp_path):
    msg = error(hosts, settings_text='window = 2\nframing = "line', tmp_path=tmp_path)
    assert re.search(r"smrd\.toml:2(:\d+)?: invalid TOML", msg), msg


def test_empty_settings_file_means_defaults(hosts, tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert load(hosts, settings=str(path)).settings.window == 4


def test_missing_settings_file_names_its_source(hosts, tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: settings file not found \(from env SMRD_SETTINGS\)"):
        load(hosts, {"SMRD_SETTINGS": str(missing)})


# --- the shipped examples and generated docs --------------------------------------------------

@pytest.mark.parametrize("name", ["hosts.conf", "hosts-k8s.conf"])
@pytest.mark.parametrize("role, ident", [("server", 0), ("server", 2), ("client", None)])
def test_shipped_examples_validate(name, role, ident):
    flags = {"role": role, "hosts": str(ROOT / "conf" / name), "settings": str(ROOT / "conf" / "smrd.toml")}
    if ident is not None:
        flags["id"] = ident
    config = load_config(flags, env={})
    assert config.warnings == ()
    assert config.metrics_port > 0


def test_example_settings_file_uncommented_changes_nothing(hosts, tmp_path):
    text = (ROOT / "conf" / "smrd.toml").read_text()
    names = "|".join(SETTINGS)
    lines = [m.group(1) for m in re.finditer(rf"^# ((?:{names}) = .*?)(?:  #.*)?$", text, re.MULTILINE)]
    assert {line.split(" = ")[0] for line in lines} == {n for n, s in SETTINGS.items() if s.in_file}
    defaults_only = [line for line in lines if SETTINGS[line.split(" = ")[0]].default is not None]
    path = tmp_path / "all.toml"
    path.write_text("\n".join(defaults_only) + "\n")
    assert load(hosts, settings=str(path)).settings == load(hosts, settings=str(path)).settings.__class__(
        **{**{n: s.default for n, s in SETTINGS.items()}, "role": "server", "id": 0, "hosts": hosts,
           "settings": str(path), "data_dir": "./smrd-data/replica-0"})


def test_example_settings_file_is_generated():
    assert (ROOT / "conf" / "smrd.toml").read_text() == settings_toml(), "run: python -m smrd.config.settings --write"


def test_configuration_doc_table_is_up_to_date():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_markdown() in doc
    assert render_docs(doc) == doc, "run: python -m smrd.config.settings --write"
    for spec in SETTINGS.values():
        assert f"`{spec.env}`" in doc and f"`{spec.flags}`" in doc


# --- snapshot hooks ----------------------------------------------------------------------------

def test_snapshot_hooks_are_accepted_in_pairs_with_a_state_placeholder(hosts):
    cfg = load(hosts, snapshot_request="SNAPSHOT", restore_request="RESTORE {state}")
    assert cfg.settings.checkpoint_every == 100_000 and cfg.settings.restore_ok == "OK"
    assert "restore_request is not" in error(hosts, snapshot_request="SNAPSHOT")
    assert "snapshot_request is not" in error(hosts, restore_request="RESTORE {state}")
    assert "has no {state}" in error(hosts, snapshot_request="SNAPSHOT", restore_request="RESTORE")
    assert "framing=http" in error(hosts, snapshot_request="GET /s", restore_request="{state}",
                                   framing="http")


# --- membership ----------------------------------------------------------------------------------

def test_voters_default_to_every_replica_and_accept_lists_and_text(hosts, tmp_path):
    assert load(hosts).settings.voters is None and load(hosts).settings.auto_join is False
    assert load(hosts, voters="2, 0").settings.voters == (0, 2)
    assert load(hosts, {"SMRD_VOTERS": "1 0"}).settings.voters == (0, 1)
    assert load(hosts, {"SMRD_VOTERS": "all"}).settings.voters is None
    path = tmp_path / "smrd.toml"
    path.write_text("voters = [0, 1]\nauto_join = true\n")
    cfg = load(hosts, settings=str(path))
    assert cfg.settings.voters == (0, 1) and cfg.settings.auto_join is True
    assert cfg.sources["voters"].kind == "file"
    assert load(hosts, {"SMRD_AUTO_JOIN": "yes"}).settings.auto_join is True


@pytest.mark.parametrize("value, message", [
    ("0,5", r"voters=0,5 \(flag --voters\): replica 5 is not in .*hosts\.conf \(replica ids 0\.\.2\); "
            r"list only replicas of the hosts file"),
    ("0,7,9", r"replica 7, 9 are not in"),
    ("0,0", r"flag --voters: replica id 0 is listed twice; list each voter once"),
    ("", r"flag --voters: no replica ids; list at least one"),
    ("a,b", r"flag --voters: 'a' is not a replica id"),
    ("64", r"flag --voters: replica id 64 is out of range; use 0\.\.63"),
])
def test_bad_voters_are_one_line_errors(hosts, value, message):
    assert re.search(message, error(hosts, voters=value)), error(hosts, voters=value)


def test_voters_in_a_file_must_be_a_list_of_integers(hosts, tmp_path):
    msg = error(hosts, settings_text="voters = 3\n", tmp_path=tmp_path)
    assert re.search(r"smrd\.toml:1: voters: expected a list of replica ids like \[0, 1, 2\], got an integer 3", msg)
    msg = error(hosts, settings_text="voters = [0, true]\n", tmp_path=tmp_path)
    assert "True is not a replica id" in msg
    assert "is not a boolean" in error(hosts, auto_join="maybe")


def test_voters_are_checked_against_the_hosts_file_for_tools_too(hosts):
    with pytest.raises(ConfigError, match="replica 4 is not in"):
        load_config({"hosts": hosts, "voters": "4"}, env={}, need_role=False)


def test_the_statefulset_variable_belongs_to_smrd_kube(hosts):
    assert load(hosts, {"SMRD_STATEFULSET": "demo-smrd"}).settings.id == 0


def test_app_data_paths(hosts):
    from smrd.config.settings import data_paths
    cfg = load(hosts, {"SMRD_APP_DATA_PATHS": "/var/lib/app, /srv/db.sqlite"})
    assert data_paths(cfg.settings.app_data_paths) == ("/var/lib/app", "/srv/db.sqlite")
    assert data_paths(load(hosts).settings.app_data_paths) == ()
    assert "'data' is not an absolute path" in error(hosts, app_data_paths="data")
    assert "would empty the whole file system" in error(hosts, app_data_paths="/srv,/")
