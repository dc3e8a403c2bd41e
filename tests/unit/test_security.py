# CURVE keys and the allow-list: the key-file format, `smrd keygen`, every validation error of
# curve_secret_key / curve_public_keys (one line, naming the source and the fix), the ZAP decision,
# re-reading the allow-list, and Channels with CURVE on in one process (a listed key gets through;
# an unlisted key, a gateway key on a peer port and a client without CURVE are refused and counted).
import asyncio
import os
import shutil
import stat

import pytest
import zmq
from zmq.utils import z85 as zmq_z85

from smrd.ops import cli
from smrd.config.settings import load_config
from smrd.errors import ConfigError
from smrd.net.security import (
    CLIENT_DOMAIN, PEER_DOMAIN, KeyFileError, Security, keygen, parse_key, read_allow_list, read_key,
    z85_decode, z85_encode, zap_answer,
)
from smrd.net.transport import Channels

HOSTS = """\
replica 0 127.0.0.1 11000 11001
replica 1 127.0.0.1 11010 11011
replica 2 127.0.0.1 11020 11021
gateway 0 0.0.0.0 8080
gateway 5 0.0.0.0 8085
"""
NAMES = ("replica-0", "replica-1", "replica-2", "gateway-0", "ops")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SMRD_"):
            monkeypatch.delenv(key)


@pytest.fixture
def pki(tmp_path):
    """keys/NAME.key+pub for NAMES, allow/ with every NAME.pub, and a hosts file."""
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    keys.mkdir()
    allow.mkdir()
    for name in NAMES:
        keygen(str(keys), name)
        shutil.copy(keys / f"{name}.pub", allow / f"{name}.pub")
    (tmp_path / "hosts.conf").write_text(HOSTS)
    return tmp_path


def load(pki, role="server", id=0, env=None, need_role=True, **flags):
    base = {"hosts": str(pki / "hosts.conf"), "curve_public_keys": str(pki / "allow")}
    if role is not None:
        base["role"] = role
    if id is not None:
        base["id"] = id
    return load_config({**base, **flags}, env=env or {}, need_role=need_role)


def error(pki, **kw):
    with pytest.raises(ConfigError) as err:
        load(pki, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- Z85 and the key-file format -------------------------------------------------------------

def test_z85_matches_zmq_both_ways():
    for raw in (bytes(32), bytes(range(32)), os.urandom(32), b"\xff" * 32):
        assert z85_encode(raw) == zmq_z85.encode(raw)
        assert z85_decode(zmq_z85.encode(raw)) == raw


def test_z85_rejects_foreign_characters_and_overflow():
    with pytest.raises(KeyFileError, match="not in the Z85 alphabet"):
        z85_decode(b"abc d")
    with pytest.raises(KeyFileError, match="overflows"):
        z85_decode(b"#####")


def test_parse_key_accepts_one_key_line_with_comments():
    public, _ = zmq.curve_keypair()
    assert parse_key(public + b"\n") == public
    assert parse_key(b"# replica-0, made 2024-01-01\n\n  " + public + b"  \n") == public


@pytest.mark.parametrize("data, expected", [
    (b"", "found 0 non-comment lines"),
    (b"abc\ndef\n", "found 2 non-comment lines"),
    (b"x" * 39 + b"\n", "39 characters long; a Z85 CURVE key has 40"),
    (b"\xff" * 40, "not ASCII text"),
    (b"x" * 39 + b"~", "'~' is not in the Z85 alphabet"),
])
def test_parse_key_errors(data, expected):
    with pytest.raises(KeyFileError, match=expected):
        parse_key(data)


def test_read_key_errors(tmp_path):
    with pytest.raises(KeyFileError, match="no such file"):
        read_key(str(tmp_path / "nope.key"))
    with pytest.raises(KeyFileError, match="is a directory"):
        read_key(str(tmp_path))
    (tmp_path / "big.key").write_bytes(b"#" * 5000)
    with pytest.raises(KeyFileError, match="not a key file"):
        read_key(str(tmp_path / "big.key"))


# --- smrd keygen -----------------------------------------------------------------------------

def test_keygen_writes_a_matching_pair_with_safe_modes(tmp_path):
    key_path, pub_path, public = keygen(str(tmp_path), "replica-0")
    assert (key_path, pub_path) == (str(tmp_path / "replica-0.key"), str(tmp_path / "replica-0.pub"))
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub_path).st_mode) == 0o644
    secret = read_key(key_path)
    assert read_key(pub_path) == public == zmq.curve_public(secret)
    assert open(key_path, "rb").read() == secret + b"\n"  # one line, nothing else


def test_keygen_command(tmp_path, capsys):
    out = tmp_path / "new" / "keys"
    assert cli.main(["keygen", "--out", str(out), "--name", "replica-0", "--name", "gateway-0"]) == 0
    assert sorted(os.listdir(out)) == ["gateway-0.key", "gateway-0.pub", "replica-0.key", "replica-0.pub"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    text = capsys.readouterr().out
    assert read_key(str(out / "replica-0.pub")).decode() in text
    assert read_key(str(out / "replica-0.key")).decode() not in text, "a secret key was printed"
    assert cli.main(["keygen", "--out", str(tmp_path / "d")]) == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["smrd.key", "smrd.pub"]


def test_keygen_refuses_to_overwrite_and_writes_nothing_then(tmp_path, capsys):
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "b"]) == 0
    before = {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)}
    capsys.readouterr()
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "a", "--name", "b"]) == 1
    assert capsys.readouterr().err == (f"smrd: error: refusing to overwrite {tmp_path}/b.key; remove it "
                                       f"first or pick another --name\n")
    assert {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)} == before  # no a.*
    os.unlink(tmp_path / "b.key")  # a lone .pub is refused too
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "b"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, expected", [
    (["--name", "../x"], 2, "key name '../x': use letters"),
    (["--name", "a.key"], 2, "without .key/.pub"),
    (["--name", ".hidden"], 2, "not starting with '.'"),
    (["--name", "a", "--name", "a"], 2, "--name given twice"),
])
def test_keygen_usage_errors(tmp_path, capsys, argv, code, expected):
    assert cli.main(["keygen", "--out", str(tmp_path), *argv]) == code
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_keygen_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert cli.main(["keygen", "--out", str(tmp_path / "f"), "--name", "a"]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert cli.main(["keygen"]) == 2  # --out is required


# --- validation at start ---------------------------------------------------------------------

def test_curve_is_off_by_default(pki):
    config = load_config({"role": "server", "id": 0, "hosts": str(pki / "hosts.conf")}, env={})
    assert config.security is None
    assert (config.settings.curve_secret_key, config.settings.curve_public_keys) == ("", "")


def test_server_loads_its_keys_and_name_placeholder(pki):
    config = load(pki, id=1, curve_secret_key=str(pki / "keys" / "<name>.key"))
    sec = config.security
    assert config.settings.curve_secret_key == str(pki / "keys" / "replica-1.key")
    assert sec.public == read_key(str(pki / "allow" / "replica-1.pub"))
    assert sec.server_key(2) == read_key(str(pki / "allow" / "replica-2.pub"))
    assert set(sec.allowed) == set(NAMES)
    assert config.warnings == ()
    assert sec.secret.decode() not in repr(sec)


def test_client_placeholders_and_env_source(pki):
    config = load(pki, role="client", id=None, env={"SMRD_CURVE_SECRET_KEY": str(pki / "keys" / "gateway-<id>.key")})
    assert config.settings.curve_secret_key == str(pki / "keys" / "gateway-0.key")
    config = load(pki, role="client", id=None, curve_secret_key=str(pki / "keys" / "<name>.key"))
    assert config.security.public == read_key(str(pki / "keys" / "gateway-0.pub"))


def test_status_needs_a_concrete_key_path(pki):
    msg = error(pki, role=None, id=None, need_role=False, curve_secret_key=str(pki / "keys" / "<name>.key"))
    assert "uses <name> or <id>, but this command has no role or id" in msg
    config = load(pki, role=None, id=None, need_role=False, curve_secret_key=str(pki / "keys" / "ops.key"))
    assert config.security.public == read_key(str(pki / "keys" / "ops.pub"))


def test_paths_in_the_settings_file_are_relative_to_it(pki):
    (pki / "smrd.toml").write_text('curve_secret_key = "keys/<name>.key"\ncurve_public_keys = "allow"\n')
    config = load_config({"role": "server", "id": 2, "hosts": str(pki / "hosts.conf"),
                          "settings": str(pki / "smrd.toml")}, env={})
    assert config.settings.curve_public_keys == str(pki / "allow")
    assert config.security.public == read_key(str(pki / "allow" / "replica-2.pub"))


@pytest.mark.parametrize("flags, expected", [
    ({"curve_public_keys": ""}, "curve_secret_key=KEY (flag --curve-secret-key) is set but curve_public_keys is "
     "not: CURVE needs both this process's secret key and the allow-list of public keys, or neither; set "
     "curve_public_keys too, or unset curve_secret_key to run without CURVE"),
    ({"curve_secret_key": ""}, "curve_public_keys=ALLOW (flag --curve-public-keys) is set but curve_secret_key "
     "is not"),
])
def test_all_or_nothing(pki, flags, expected):
    flags = {"curve_secret_key": str(pki / "keys" / "replica-0.key"), **flags}
    msg = error(pki, **flags)
    expected = expected.replace("KEY", str(pki / "keys" / "replica-0.key")).replace("ALLOW", str(pki / "allow"))
    assert msg.startswith(expected)


def test_secret_key_file_errors(pki):
    keys = pki / "keys"
    msg = error(pki, curve_secret_key=str(keys / "nope.key"))
    assert msg == (f"curve_secret_key={keys}/nope.key (flag --curve-secret-key): no such file; generate a key "
                   f"pair with: smrd keygen --out DIR --name NAME (see docs/security.md)")
    assert "names a public key file (.pub)" in error(pki, curve_secret_key=str(keys / "replica-0.pub"))
    shutil.copy(keys / "replica-0.pub", keys / "copied")
    assert "this is the public key replica-0.pub of" in error(pki, curve_secret_key=str(keys / "copied"))
    (keys / "bad.key").write_text("not a key\n")
    assert "bad.key (flag --curve-secret-key): the key is 9 characters long" in error(
        pki, curve_secret_key=str(keys / "bad.key"))


def test_a_replica_must_use_its_own_key_pair(pki):
    msg = error(pki, id=0, curve_secret_key=str(pki / "keys" / "replica-1.key"))
    assert "does not belong to replica 0: its public key is" in msg
    assert f"{pki}/allow/replica-0.pub holds" in msg and "use replica 0's own key pair" in msg


def test_key_pair_files_must_match(pki):
    keygen(str(pki), "gateway-0")  # another pair under the same name, outside the allow-list
    msg = error(pki, role="client", id=0, curve_secret_key=str(pki / "gateway-0.key"))
    assert "differs from gateway-0.pub in" in msg and "not one key pair" in msg
    # A rotated key at a stable path, listed under its new name, is fine.
    shutil.copy(pki / "gateway-0.pub", pki / "allow" / "gateway-0.v2.pub")
    config = load(pki, role="client", id=0, curve_secret_key=str(pki / "gateway-0.key"))
    assert config.warnings == () and config.security.public == read_key(str(pki / "gateway-0.pub"))


def test_allow_list_errors(pki):
    key = str(pki / "keys" / "replica-0.key")
    assert error(pki, curve_secret_key=key, curve_public_keys=str(pki / "none")) == (
        f"curve_public_keys={pki}/none (flag --curve-public-keys): no such directory")
    assert "is a file, not a directory" in error(pki, curve_secret_key=key, curve_public_keys=key)
    (pki / "empty").mkdir()
    assert "holds no *.pub files" in error(pki, curve_secret_key=key, curve_public_keys=str(pki / "empty"))
    os.unlink(pki / "allow" / "replica-2.pub")
    os.unlink(pki / "allow" / "replica-1.pub")
    msg = error(pki, curve_secret_key=key)
    assert msg.startswith(f"curve_public_keys={pki}/allow (flag --curve-public-keys): lacks replica-1.pub, "
                          f"replica-2.pub: a process learns each replica's public key from replica-<id>.pub")
    shutil.copy(pki / "keys" / "replica-1.pub", pki / "allow" / "replica-1.pub")
    shutil.copy(pki / "keys" / "replica-2.pub", pki / "allow" / "replica-2.pub")
    (pki / "allow" / "junk.pub").write_text("junk\n")
    msg = error(pki, curve_secret_key=key)
    assert f"{pki}/allow/junk.pub: the key is 4 characters long" in msg and "fix or remove that file" in msg


def test_allow_list_ignores_other_files_and_kubernetes_dot_entries(pki):
    allow = pki / "allow"
    (allow / "README").write_text("not a key")
    (allow / "..data").mkdir()
    (allow / "..data" / "x.pub").write_text("junk")
    (allow / ".hidden.pub").write_text("junk")
    assert set(read_allow_list(str(allow))) == set(NAMES)


def test_warnings_unlisted_client_and_world_readable_secret(pki):
    os.unlink(pki / "allow" / "gateway-0.pub")
    os.chmod(pki / "keys" / "gateway-0.key", 0o644)
    config = load(pki, role="client", id=0, curve_secret_key=str(pki / "keys" / "gateway-0.key"))
    assert len(config.warnings) == 2
    assert ("readable by every user (mode 0644); chmod 600 it (in Kubernetes: defaultMode: 0400)"
            in config.warnings[0])
    assert "is not in the allow-list" in config.warnings[1] and "refuse it" in config.warnings[1]


# --- the ZAP decision and re-reading the allow-list ------------------------------------------

def security_of(pki, name):
    allow = str(pki / "allow")
    return Security(read_key(str(pki / "keys" / f"{name}.key")), allow, read_allow_list(allow))


def raw(pki, name):
    return z85_decode(read_key(str(pki / "keys" / f"{name}.pub")))


def test_judge_peer_port_admits_only_replica_keys(pki):
    sec = security_of(pki, "replica-0")
    assert sec.judge(PEER_DOMAIN, raw(pki, "replica-1")) == (True, "replica-1")
    assert sec.judge(PEER_DOMAIN, raw(pki, "gateway-0")) == (False, "gateway-0")
    assert sec.judge(CLIENT_DOMAIN, raw(pki, "gateway-0")) == (True, "gateway-0")
    assert sec.judge(CLIENT_DOMAIN, os.urandom(32)) == (False, None)
    assert sec.judge(b"other", raw(pki, "replica-1")) == (False, "replica-1")


def test_zap_answer(pki):
    sec = security_of(pki, "replica-0")

    def request(domain, mechanism=b"CURVE", creds=(raw(pki, "gateway-0"),)):
        return [b"route", b"", b"1.0", b"42", domain, b"10.0.0.9", b"", mechanism, *creds]

    reply, refusal = zap_answer(sec, request(CLIENT_DOMAIN))
    assert reply == [b"route", b"", b"1.0", b"42", b"200", b"OK", b"gateway-0", b""] and refusal is None
    reply, refusal = zap_answer(sec, request(PEER_DOMAIN))
    assert reply[4] == b"400" and refusal.name == "gateway-0" and refusal.address == "10.0.0.9"
    rogue_public, _ = zmq.curve_keypair()
    reply, refusal = zap_answer(sec, request(CLIENT_DOMAIN, creds=(z85_decode(rogue_public),)))
    assert reply[4] == b"400" and refusal.key == rogue_public.decode() and refusal.name is None
    reply, refusal = zap_answer(sec, request(CLIENT_DOMAIN, mechanism=b"PLAIN", creds=(b"u", b"p")))
    assert reply[4] == b"400" and refusal.key == "(no CURVE key)"
    assert zap_answer(sec, [b"x"]) == (None, None)
    assert zap_answer(sec, request(CLIENT_DOMAIN)[:2] + [b"2.0"] + request(CLIENT_DOMAIN)[3:])[0][4] == b"500"


def test_reload_sees_added_changed_and_removed_keys_and_survives_a_broken_file(pki):
    sec = security_of(pki, "replica-0")
    allow = pki / "allow"
    assert sec.reload() is None
    new_public, _ = zmq.curve_keypair()
    (allow / "gateway-1.pub").write_bytes(new_public + b"\n")
    os.unlink(allow / "ops.pub")
    replacement, _ = zmq.curve_keypair()
    (allow / "replica-2.pub").write_bytes(replacement + b"\n")
    assert sec.reload() == (["gateway-1"], ["ops"], ["replica-2"])
    assert sec.server_key(2) == replacement
    assert sec.judge(CLIENT_DOMAIN, z85_decode(new_public)) == (True, "gateway-1")
    (allow / "broken.pub").write_text("nope\n")
    with pytest.raises(KeyFileError, match="broken.pub"):
        sec.reload()
    assert sec.reload() is None  # reported once; the last good allow-list stays in force
    assert sec.judge(CLIENT_DOMAIN, z85_decode(new_public)) == (True, "gateway-1")
    os.unlink(allow / "broken.pub")
    assert sec.reload() == ([], [], [])


# --- Channels with CURVE, in one process -----------------------------------------------------

async def _until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_channels_admit_listed_keys_and_refuse_the_rest(pki, caplog):
    async def scenario():
        loop = asyncio.get_running_loop()
        server = Channels(security=security_of(pki, "replica-0"))
        peer = server.bind_router("tcp://127.0.0.1:*", replicas_only=True)
        client = server.bind_router("tcp://127.0.0.1:*")
        peer_ep = peer.getsockopt(zmq.LAST_ENDPOINT).decode()
        client_ep = client.getsockopt(zmq.LAST_ENDPOINT).decode()
        got = []
        server.start(loop, lambda sock, parts: got.append((sock is peer, parts)), lambda: None)
        others = []
        try:
            # Listed keys, on the ports they are allowed on: replica-1 on the peer port, gateway-0 on
            # the client port. Replies go back over the same encrypted connection.
            r1 = Channels(security=security_of(pki, "replica-1"))
            g0 = Channels(security=security_of(pki, "gateway-0"))
            others += [r1, g0]
            to_peer = r1.connect_dealer(peer_ep, b"r1", replica=0)
            to_client = g0.connect_dealer(client_ep, b"g0", replica=0)
            g0_got = []
            r1.start(loop, lambda s, p: None, lambda: None)
            g0.start(loop, lambda s, p: g0_got.append(p), lambda: None)
            r1.send(to_peer, [b"vote"])
            g0.send(to_client, [b"request"])
            assert await _until(lambda: len(got) == 2)
            assert sorted(got) == [(False, [b"g0", b"request"]), (True, [b"r1", b"vote"])]
            server.send(client, [b"g0", b"reply"])
            assert await _until(lambda: g0_got == [[b"reply"]])
            assert server.refused == 0

            # A gateway key on the peer port, an unlisted key, and a client without CURVE.
            g0_on_peer = g0.connect_dealer(peer_ep, b"r2", replica=0)
            g0.send(g0_on_peer, [b"forged"])
            rogue = zmq.Context.instance().socket(zmq.DEALER)
            rogue_public, rogue_secret = zmq.curve_keypair()
            rogue.setsockopt(zmq.CURVE_SERVERKEY, read_key(str(pki / "allow" / "replica-0.pub")))
            rogue.setsockopt(zmq.CURVE_PUBLICKEY, rogue_public)
            rogue.setsockopt(zmq.CURVE_SECRETKEY, rogue_secret)
            plain = zmq.Context.instance().socket(zmq.DEALER)
            for s in (rogue, plain):
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.IDENTITY, b"r1")
                s.connect(peer_ep)
                s.connect(client_ep)
                s.send(b"forged", zmq.NOBLOCK)
            assert await _until(lambda: server.refused >= 5)
            await asyncio.sleep(0.2)
            assert len(got) == 2, "a refused client got a message through"
            rogue.close(0)
            plain.close(0)
        finally:
            for ch in others + [server]:
                ch.close()
        return rogue_public.decode()

    with caplog.at_level("WARNING", logger="smrd.net.transport"):
        rogue_key = asyncio.run(scenario())
    text = caplog.text
    assert f"public key {rogue_key} is not in the allow-list" in text
    assert "(gateway-0.pub) is not a replica's, and this is a peer port" in text
    assert "it does not use CURVE" in text or "it hung up during the handshake" in text


def test_channels_reconnect_when_a_replica_key_changes(pki, monkeypatch):
    monkeypatch.setattr("smrd.net.transport.KEY_RELOAD_S", 0.05)

    async def scenario():
        loop = asyncio.get_running_loop()
        # Replica 0 gets a new key pair; the gateway's allow-list learns it while running.
        keygen(str(pki), "replica-0")
        new_secret = read_key(str(pki / "replica-0.key"))
        allow = str(pki / "allow")
        server = Channels(security=Security(new_secret, allow, read_allow_list(allow)))
        client_ep = server.bind_router("tcp://127.0.0.1:*").getsockopt(zmq.LAST_ENDPOINT).decode()
        got = []
        server.start(loop, lambda s, p: got.append(p), lambda: None)
        g0 = Channels(security=security_of(pki, "gateway-0"))
        try:
            sock = g0.connect_dealer(client_ep, b"g0", replica=0)
            g0.start(loop, lambda s, p: None, lambda: None)
            g0.send(sock, [b"one"])
            await asyncio.sleep(0.3)
            assert got == [], "the old server key must not reach the new key pair"
            shutil.copy(pki / "replica-0.pub", pki / "allow" / "replica-0.pub")
            await asyncio.sleep(0.2)  # re-read and reconnected
            g0.send(sock, [b"two"])
            assert await _until(lambda: [b"g0", b"two"] in got)
        finally:
            g0.close()
            server.close()

    asyncio.run(scenario())


def test_channels_without_security_are_unchanged_and_a_secured_dealer_needs_its_replica(pki):
    plain = Channels()
    secured = Channels(security=security_of(pki, "gateway-0"))
    try:
        assert plain.ctx is zmq.Context.instance() and plain.security is None
        assert secured.ctx is not zmq.Context.instance()
        with pytest.raises(ValueError, match="needs the id of the replica"):
            secured.connect_dealer("tcp://127.0.0.1:1", b"x")
    finally:
        plain.close()
        secured.close()


def test_config_without_curve_loads_neither_zeromq_nor_the_key_code():
    # `smrd --help` and the config must stay cheap: the key code (and ZeroMQ) load only with CURVE on.
    import subprocess
    import sys
    code = ("import sys, smrd.ops.cli; smrd.ops.cli.build_parser(); from smrd.config.settings import load_config; "
            "load_config({'role': 'server', 'id': 0, 'hosts': 'conf/hosts.conf'}, env={}); "
            "print('zmq' in sys.modules, 'smrd.net.security' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_keygen_and_status_help(capsys):
    assert cli.main(["keygen", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: smrd keygen" in out and "replica-<id>.pub" in out and "never overwritten" in out
    assert cli.main(["status", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--curve-secret-key" in out and "--curve-public-keys" in out and "--settings" in out
    assert cli.main(["--help"]) == 0
    assert "smrd keygen" in capsys.readouterr().out
