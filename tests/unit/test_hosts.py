# hosts.conf parsing: the happy path, every validation error (message content), warnings, and the
# shipped examples. Nothing here may touch DNS.
import socket
from pathlib import Path

import pytest

from smrd.errors import ConfigError
from smrd.config.hosts import check_host, load_hosts, parse_hosts

ROOT = Path(__file__).resolve().parents[2]

THREE = """\
# kind     id  host                      peer_port  client_port
replica    0   smrd-0.smrd-headless      11000      11001
replica    1   127.0.0.1                 11010      11011
replica    2   ::1                       11020      11021   metrics=9102
gateway    0   0.0.0.0                   8080
"""


@pytest.fixture(autouse=True)
def no_dns(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("hosts.py must never resolve names")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)


def test_parses_replicas_gateways_and_options():
    hosts = parse_hosts(THREE)
    assert hosts.n == 3 and hosts.f == 1 and hosts.quorum == 2
    assert hosts.replica_ids == (0, 1, 2)
    r0, r1, r2 = hosts.replicas.values()
    assert (r0.host, r0.peer_port, r0.client_port, r0.metrics_port, r0.line) == ("smrd-0.smrd-headless", 11000, 11001, None, 2)
    assert r1.peer_endpoint == "tcp://127.0.0.1:11010"
    assert r2.client_endpoint == "tcp://[::1]:11021" and r2.metrics_port == 9102
    gw = hosts.gateways[0]
    assert (gw.host, gw.port, gw.listen_endpoint) == ("0.0.0.0", 8080, "tcp://0.0.0.0:8080")
    assert hosts.warnings == ()
    assert list(hosts.peers_of(1)) == [0, 2]


def test_replicas_are_ordered_by_id_whatever_the_line_order():
    hosts = parse_hosts("replica 2 h2 1 2\nreplica 0 h0 1 2\n\n   # x\nreplica 1 h1 1 2\n")
    assert list(hosts.replicas) == [0, 1, 2]
    assert hosts.replicas[1].line == 5


def test_bracketed_ipv6_tabs_trailing_comment_and_case():
    hosts = parse_hosts("replica\t0\t[::0:1]\t1\t2 # first\nreplica 1 Node-B.Example. 1 2\nreplica 2 10.0.0.3 1 2\n")
    assert hosts.replicas[0].host == "::1"
    assert hosts.replicas[1].host == "node-b.example"


def test_replica_lookup_error_names_valid_ids():
    with pytest.raises(ConfigError, match=r"replica 7 is not declared \(replica ids are 0\.\.2\)"):
        parse_hosts(THREE).replica(7)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("replca 0 a 1 2\n", ["hosts.conf:1:", "unknown kind 'replca'", "did you mean 'replica'", "'replica' or 'gateway'"]),
        ("replica 0 a 1 2\nreplica 1 b 1\n", ["hosts.conf:2:", "replica line has 4 fields, expected 5", "replica ID HOST PEER_PORT CLIENT_PORT"]),
        ("replica 0 a 1 2 3\n", ["hosts.conf:1:", "6 fields, expected 5"]),
        ("replica 0 a 1 2\ngateway 0 h\n", ["hosts.conf:2:", "gateway line has 3 fields, expected 4", "gateway ID HOST PORT"]),
        ("replica x a 1 2\n", ["hosts.conf:1:", "replica id 'x' is not an integer", "0..63"]),
        ("replica -1 a 1 2\n", ["replica id '-1' is not an integer"]),
        ("replica 64 a 1 2\n", ["hosts.conf:1:", "replica id 64 is out of range; use 0..63"]),
        ("replica 0 a 0 2\n", ["peer_port 0 is out of range; use 1..65535"]),
        ("replica 0 a 1 65536\n", ["client_port 65536 is out of range; use 1..65535"]),
        ("replica 0 a 1 1e3\n", ["client_port '1e3' is not an integer"]),
        ("replica 0 a 1 2\ngateway 0 g 99999\n", ["hosts.conf:2:", "port 99999 is out of range"]),
        ("replica 0 a 1 2\ngateway 70000 g 80\n", ["gateway id 70000 is out of range; use 0..65535"]),
        ("replica 0 a 1 2\nreplica 0 b 1 2\n", ["hosts.conf:2:", "duplicate replica id 0 (first declared on line 1)"]),
        ("replica 0 a 1 2\ngateway 3 g 80\ngateway 3 h 80\n", ["hosts.conf:3:", "duplicate gateway id 3 (first declared on line 2)"]),
        ("replica 0 a 1 2\nreplica 1 a 1 3\n", ["hosts.conf:2:", "replica 1 peer_port a:1 is already used by replica 0 peer_port (line 1)", "own host:port"]),
        ("replica 0 a 5 5\n", ["hosts.conf:1:", "replica 0 client_port a:5 is already used by replica 0 peer_port"]),
        ("replica 0 127.0.0.1 1 2\ngateway 0 127.0.0.1 2\n", ["hosts.conf:2:", "gateway 0 port 127.0.0.1:2 is already used by replica 0 client_port"]),
        ("replica 0 a 1 2 metrics=3\ngateway 0 a 3\n", ["hosts.conf:2:", "already used by replica 0 metrics"]),
        ("replica 0 ::1 1 2\nreplica 1 0::1 1 3\n", ["hosts.conf:2:", "[::1]:1 is already used"]),
        ("replica 0 A.b 1 2\nreplica 1 a.B. 1 3\n", ["hosts.conf:2:", "a.b:1 is already used"]),
        ("replica 0 a 1 2\nreplica 2 b 1 2\nreplica 3 c 1 2\n", ["hosts.conf:3:", "replica ids must be 0..n-1 without gaps (n=3)", "1 is missing and 3 is out of range", "renumber the replicas 0..2"]),
        ("replica 1 a 1 2\n", ["hosts.conf:1:", "0 is missing"]),
        ("gateway 0 0.0.0.0 8080\n", ["hosts.conf:1:", "no replica lines", "replica ID HOST"]),
        ("# only comments\n\n", ["hosts.conf:2:", "no replica lines"]),
        ("", ["hosts.conf:1:", "file is empty"]),
        ("replica 0 bad_host! 1 2\n", ["hosts.conf:1:", "invalid host", "'bad_host!' is not a valid host name", "IPv4/IPv6 address or a DNS name"]),
        ("replica 0 300.1.2.3 1 2\n", ["invalid host", "'300.1.2.3' is not a valid IPv4 address"]),
        ("replica 0 1.2.3 1 2\n", ["'1.2.3' is not a valid IPv4 address"]),
        ("replica 0 fe80::zz 1 2\n", ["'fe80::zz' is not a valid IPv6 address"]),
        ("replica 0 -a.b 1 2\n", ["'-a.b' is not a valid host name"]),
        ("replica 0 a..b 1 2\n", ["'a..b' is not a valid host name"]),
        ("replica 0 " + "a" * 64 + " 1 2\n", ["is not a valid host name"]),
        ("replica 0 0.0.0.0 1 2\n", ["hosts.conf:1:", "0.0.0.0 is a wildcard address", "not one peers can connect to"]),
        ("replica 0 a 1 2 metric=9\n", ["hosts.conf:1:", "unknown option 'metric'", "did you mean 'metrics'", "metrics=PORT"]),
        ("replica 0 a 1 2 color=blue\n", ["unknown option 'color'; valid options: metrics=PORT"]),
        ("replica 0 a 1 2 metrics=9 metrics=10\n", ["option 'metrics' given twice"]),
        ("replica 0 a 1 metrics=9 2\n", ["field '2' after an option"]),
        ("replica 0 a 1 2 metrics=x\n", ["metrics port 'x' is not an integer"]),
        ("replica 0 a 1 2\x00\n", ["hosts.conf:1:", "control characters"]),
        ("replica 0 a 1 2\r\nreplica 1 b 1 2\x1c\n", ["hosts.conf:2:", "control characters"]),
    ],
)
def test_validation_errors(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_hosts(text)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    "n, warning",
    [(1, "n=1 tolerates no failure; use n >= 3"), (2, "n=2 tolerates no failure; use n >= 3"),
     (4, "n=4 is even and tolerates 1 failure, no more than n=3; use an odd n"),
     (6, "n=6 is even and tolerates 2 failures, no more than n=5")],
)
def test_small_or_even_n_is_a_warning(n, warning):
    hosts = parse_hosts("".join(f"replica {i} 127.0.0.1 {1000 + 2 * i} {1001 + 2 * i}\n" for i in range(n)))
    assert hosts.n == n
    assert len(hosts.warnings) == 1 and warning in hosts.warnings[0]


def test_odd_n_has_no_warning():
    text = "".join(f"replica {i} r{i} 1 2\n" for i in range(5))
    assert parse_hosts(text).warnings == ()


def test_sixty_four_replicas_is_the_limit():
    hosts = parse_hosts("".join(f"replica {i} r{i} 1 2\n" for i in range(64)))
    assert hosts.n == 64


@pytest.mark.parametrize("name", ["hosts.conf", "hosts-k8s.conf"])
def test_shipped_examples_parse_cleanly(name):
    hosts = load_hosts(ROOT / "conf" / name)
    assert hosts.n == 3 and hosts.warnings == ()
    assert 0 in hosts.gateways
    assert all(r.metrics_port for r in hosts.replicas.values())


def test_k8s_example_keeps_names_unresolved():
    hosts = load_hosts(ROOT / "conf" / "hosts-k8s.conf")
    assert hosts.replicas[2].host == "smrd-2.smrd-headless"


def test_binary_junk_is_refused_with_location(tmp_path):
    path = tmp_path / "hosts.conf"
    path.write_bytes(b"replica 0 a 1 2\n\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError, match=r"hosts\.conf:2: not UTF-8 text \(byte 0x89\)"):
        load_hosts(path)


def test_empty_file_is_refused_with_location(tmp_path):
    path = tmp_path / "hosts.conf"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"hosts\.conf:1: file is empty"):
        load_hosts(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.conf: hosts file not found; check the -c/--hosts path"):
        load_hosts(tmp_path / "nope.conf")
    with pytest.raises(ConfigError, match="is a directory"):
        load_hosts(tmp_path)


def test_error_uses_the_given_path():
    with pytest.raises(ConfigError, match=r"^/etc/smrd/hosts\.conf:1: unknown kind"):
        parse_hosts("bogus\n", "/etc/smrd/hosts.conf")


@pytest.mark.parametrize("host", ["localhost", "a-b.c_d.example", "10.0.0.1", "::1", "fe80::1%eth0", "x" * 63])
def test_check_host_accepts(host):
    assert check_host(host) is None


def test_check_host_allows_wildcard_only_for_listeners():
    assert check_host("::", listen=True) is None
    assert "wildcard" in check_host("::")
