# CURVE on real processes: a 3-replica cluster whose keys come from `smrd keygen` serves requests
# through a gateway with a listed key; `smrd status` works with a listed key and gets nothing with
# an unlisted one; a gateway with an unlisted key gets no replies (the deadline error); and rogue
# DEALERs on a replica's peer and client ports (an unlisted CURVE key, a listed gateway key on a
# peer port, no CURVE at all) sending well-formed START_VIEW_CHANGE frames change nothing and are
# logged as refused.
import json
import shutil
import subprocess
import sys
import time

import zmq

from smrd.apps.kvclient import KVClient
from smrd.config.settings import load_config
from smrd.protocol import messages as m
from smrd.net.security import read_key
from smrd.ops.status import query

DEADLINE_MS = 2000


def smrd(*argv, timeout=30):
    return subprocess.run([sys.executable, "-m", "smrd", *argv], capture_output=True, text=True, timeout=timeout)


def _dealer(endpoint, identity, server_key=None):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, identity)
    if server_key is not None:  # a CURVE client with a fresh key pair that nobody listed
        public, secret = zmq.curve_keypair()
        s.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        s.setsockopt(zmq.CURVE_PUBLICKEY, public)
        s.setsockopt(zmq.CURVE_SECRETKEY, secret)
    s.connect(endpoint)
    return s


def _wait_for_any(child, texts, timeout=10.0):
    end = time.monotonic() + timeout
    while not any(t in line for line in list(child.lines) for t in texts):
        assert time.monotonic() < end, f"{child.name} logged none of {texts}"
        time.sleep(0.05)


def test_curve_cluster_serves_listed_keys_and_refuses_the_rest(make_cluster, tmp_path):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    names = ["replica-0", "replica-1", "replica-2", "gateway-0", "gateway-1", "ops"]
    done = smrd("keygen", "--out", str(keys), *[arg for n in names for arg in ("--name", n)])
    assert done.returncode == 0, done.stderr
    allow.mkdir()
    for name in names:
        if name != "gateway-1":  # the gateway whose key nobody listed
            shutil.copy(keys / f"{name}.pub", allow / f"{name}.pub")
    cluster = make_cluster(replicas=3, gateways=2, framing="line", settings={
        "curve_secret_key": str(keys / "<name>.key"), "curve_public_keys": str(allow),
        "gateway_request_deadline_ms": DEADLINE_MS})
    cluster.start()
    ops = load_config({"hosts": str(cluster.hosts_path), "curve_secret_key": str(keys / "ops.key"),
                       "curve_public_keys": str(allow)}, env={}, need_role=False).security

    def status(i):
        return query(f"tcp://127.0.0.1:{cluster.client_port(i)}", 1.0, ops, i)

    end = time.monotonic() + 10
    while True:  # every replica normal in one view (LocalCluster.leader() speaks no CURVE)
        views = [status(i) for i in range(3)]
        if all(views) and len({(v["view"], v["leader"], v["status"]) for v in views}) == 1 \
                and views[0]["status"] == "normal":
            break
        assert time.monotonic() < end, f"no agreed view: {views}"
        time.sleep(0.1)

    # A gateway with a listed key is served; one without gets the deadline error, not a reply.
    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
        assert c.request("PUT a 1") == b"OK"
        assert c.request("GET a") == b"VALUE 1"
    with KVClient("127.0.0.1", cluster.gateway_port(1), "line", timeout=10) as c:
        reply = c.request("PUT b 2")
    assert reply == f"ERR smrd: no reply from the replicas within {DEADLINE_MS / 1000:g} s".encode()

    # Rogues: forged but well-formed view changes, each claiming to come from another replica.
    before = [status(i) for i in range(3)]
    view = before[0]["view"]
    replica_pub = [read_key(str(allow / f"replica-{i}.pub")) for i in range(3)]
    gateway_key = load_config({"hosts": str(cluster.hosts_path), "curve_secret_key": str(keys / "gateway-0.key"),
                               "curve_public_keys": str(allow)}, env={}, need_role=False).security
    rogues = []
    for i in range(3):
        j = (i + 1) % 3
        frames = [m.encode(j, m.StartViewChange(view + k)) for k in (1, 2, 3)]
        assert m.decode(frames[0]) == (j, m.StartViewChange(view + 1))  # what a peer would send
        for port in (cluster.peer_port(i), cluster.client_port(i)):
            endpoint = f"tcp://127.0.0.1:{port}"
            rogues += [_dealer(endpoint, b"r%d" % j, replica_pub[i]), _dealer(endpoint, b"r%d" % j)]
        listed_gateway = zmq.Context.instance().socket(zmq.DEALER)  # listed, but not a replica
        listed_gateway.setsockopt(zmq.LINGER, 0)
        listed_gateway.setsockopt(zmq.IDENTITY, b"r%d" % j)
        gateway_key.configure_client(listed_gateway, i)
        listed_gateway.connect(f"tcp://127.0.0.1:{cluster.peer_port(i)}")
        rogues.append(listed_gateway)
        for s in rogues[-5:]:
            s.send_multipart(frames, zmq.NOBLOCK)
    for i in range(3):  # each kind of refusal is logged, with the unlisted client's public key
        cluster.servers[i].wait_for("is not in the allow-list", 10)
        cluster.servers[i].wait_for("(gateway-0.pub) is not a replica's, and this is a peer port", 10)
        # A client without CURVE either sends its greeting (mechanism mismatch) or, having read
        # ours first, hangs up: which one is a race inside libzmq.
        _wait_for_any(cluster.servers[i], ("it does not use CURVE", "it hung up during the handshake"))
    time.sleep(0.6)  # over an election timeout: an accepted START_VIEW_CHANGE would show by now
    for s in rogues:
        s.close(0)
    after = [status(i) for i in range(3)]
    for b, a in zip(before, after):
        assert (a["view"], a["leader"], a["status"]) == (b["view"], b["leader"], "normal"), "a rogue moved the view"
        assert a["view_changes"] == b["view_changes"]
        assert a.get("bad_messages", 0) == b.get("bad_messages", 0), "a rogue's frame reached the replica"
    logs = "\n".join(line for i in range(3) for line in cluster.servers[i].lines)
    assert logs.count("refused a connection") >= 9
    assert any(f"public key {read_key(str(keys / 'gateway-1.pub')).decode()} is not in the allow-list" in line
               for line in logs.splitlines()), "the unlisted gateway was not logged"

    with KVClient("127.0.0.1", cluster.gateway_port(0), "line", timeout=10) as c:
        assert c.request("GET a") == b"VALUE 1"

    # smrd status against the secured cluster: a listed key sees everything, an unlisted one nothing.
    common = ["status", "-c", str(cluster.hosts_path), "--settings", str(cluster.settings_path), "--timeout", "1"]
    done = smrd(*common, "--curve-secret-key", str(keys / "ops.key"), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["reachable"] for r in rows] == [True] * 3 and {r["view"] for r in rows} == {view}
    done = smrd(*common, "--curve-secret-key", str(keys / "gateway-1.key"), "--timeout", "0.3")
    assert done.returncode == 1 and done.stdout.count("UNREACHABLE") == 3
    done = smrd(*common)  # the settings file's <name> means nothing without a role
    assert done.returncode == 2 and "uses <name> or <id>" in done.stderr
