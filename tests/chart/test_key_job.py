"""The chart's key Job: `smrd keygen --kube-secret/--kube-configmap` (smrd/ops/keystore.py) against
a stand-in for the Kubernetes API server (tests/kube_stand_in.py), and the Job as rendered. The
keys it stores are loaded by smrd's own security.load, as the pods load them from the mounts."""
from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest

from smrd.config.hosts import parse_hosts
from smrd.errors import ConfigError
from smrd.net import security
from smrd.ops import cli, keystore

from kube_stand_in import NAMESPACE, TOKEN, FakeApi
NAMES = [f"replica-{i}" for i in range(7)] + ["gateway-0"]


@pytest.fixture
def api(tmp_path):
    fake = FakeApi()
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "namespace").write_text(NAMESPACE)
    yield fake, keystore.Api(base_url=fake.url, service_account_dir=sa)
    fake.close()


def _mount(fake, tmp_path, secret="keys", configmap="allow"):
    """The two objects as the kubelet mounts them: key/NAME.key and allow/NAME.pub."""
    (tmp_path / "key").mkdir()
    (tmp_path / "allow").mkdir()
    for item, value in fake.objects[("secrets", secret)]["data"].items():
        (tmp_path / "key" / item).write_bytes(base64.b64decode(value))
        (tmp_path / "key" / item).chmod(0o440)
    for item, value in fake.objects[("configmaps", configmap)]["data"].items():
        (tmp_path / "allow" / item).write_text(value)
    return tmp_path / "key", tmp_path / "allow"


def _snapshot(fake) -> str:
    return json.dumps({f"{p}/{n}": o for (p, n), o in fake.objects.items()}, sort_keys=True)


HOSTS = "\n".join([f"replica {i} 127.0.0.1 {11000 + 10 * i} {11001 + 10 * i}" for i in range(7)]
                  + ["gateway 0 127.0.0.1 8080"])


def test_creates_secret_and_allow_list_that_smrd_loads(api, tmp_path):
    fake, client = api
    said = []
    labels = {"app.kubernetes.io/instance": "demo"}
    assert keystore.store(client, "keys", "allow", NAMES, labels, out=said.append) == "created"
    secret, allow = fake.objects[("secrets", "keys")], fake.objects[("configmaps", "allow")]
    assert secret["type"] == "Opaque" and secret["metadata"]["labels"] == labels
    assert sorted(secret["data"]) == sorted(n + ".key" for n in NAMES)
    assert sorted(allow["data"]) == sorted(n + ".pub" for n in NAMES)
    # No secret key in what was said, nor in the ConfigMap.
    secrets = [base64.b64decode(v).strip() for v in secret["data"].values()]
    assert not any(k.decode() in line for k in secrets for line in said)
    assert not any(k.decode() in v for k in secrets for v in allow["data"].values())
    # Every replica and the gateway start with these keys, as mounted by the chart.
    key_dir, allow_dir = _mount(fake, tmp_path)
    hosts = parse_hosts(HOSTS)
    for rid in range(7):
        sec, warnings = security.load(str(key_dir / f"replica-{rid}.key"), "key", str(allow_dir), "allow", hosts, rid)
        assert sec.server_key(rid) == sec.public and not warnings
    sec, warnings = security.load(str(key_dir / "gateway-0.key"), "key", str(allow_dir), "allow", hosts, None)
    assert not warnings


def test_a_second_run_keeps_the_keys(api):
    fake, client = api
    keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None)
    before = _snapshot(fake)
    said = []
    assert keystore.store(client, "keys", "allow", NAMES, {}, out=said.append) == "kept"
    assert _snapshot(fake) == before
    assert "left alone" in said[-1]
    assert not [r for r in fake.requests[-2:] if r[0] == "POST"]


def test_missing_allow_list_is_made_from_the_secret(api):
    """An earlier run died between the Secret and the ConfigMap: the allow-list is derived."""
    fake, client = api
    keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None)
    allow = fake.objects.pop(("configmaps", "allow"))
    secret = json.dumps(fake.objects[("secrets", "keys")], sort_keys=True)
    assert keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None) == "completed"
    assert fake.objects[("configmaps", "allow")]["data"] == allow["data"]
    assert json.dumps(fake.objects[("secrets", "keys")], sort_keys=True) == secret


def test_allow_list_without_secret_is_refused(api):
    fake, client = api
    fake.objects[("configmaps", "allow")] = {"data": {"replica-0.pub": "x"}}
    with pytest.raises(keystore.StoreError, match="ConfigMap smrd-test/allow exists but Secret keys does not.*delete configmap allow"):
        keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None)
    assert ("secrets", "keys") not in fake.objects


def test_existing_secret_lacking_a_name_is_refused_and_left(api):
    fake, client = api
    keystore.store(client, "keys", "allow", NAMES[:3], {}, out=lambda s: None)
    before = _snapshot(fake)
    with pytest.raises(keystore.StoreError, match="exists without replica-3.key, replica-4.key"):
        keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None)
    assert _snapshot(fake) == before


def test_losing_a_creation_race_uses_the_winners_keys(api):
    fake, client = api
    other = {"data": {n + ".key": base64.b64encode(security.zmq.curve_keypair()[1] + b"\n").decode() for n in NAMES}}

    def race(plural, doc):
        if plural == "secrets":
            fake.objects[("secrets", "keys")] = other
            fake.before_post = None

    fake.before_post = race
    # The racing run made the Secret only: this one makes the allow-list from the winner's keys.
    assert keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None) == "completed"
    assert fake.objects[("secrets", "keys")] is other
    for n in NAMES:  # the allow-list matches the winner's secret keys
        secret = security.parse_key(base64.b64decode(other["data"][n + ".key"]))
        assert fake.objects[("configmaps", "allow")]["data"][n + ".pub"].strip() == security.public_key(secret).decode()


def test_forbidden_says_which_rbac_is_needed(api, tmp_path):
    fake, client = api
    client.token = "wrong"
    with pytest.raises(keystore.StoreError, match="GET secrets smrd-test/keys: HTTP 403 forbidden: wrong token.*key-job Role"):
        keystore.store(client, "keys", "allow", NAMES, {}, out=lambda s: None)


def test_cli_kube_mode(monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["keygen", "--kube-secret", "k", "--kube-configmap", "a", "--name", "replica-0"]) == 2
    assert "not in a Kubernetes pod" in capsys.readouterr().err
    assert cli.main(["keygen", "--kube-secret", "k", "--name", "replica-0"]) == 2
    assert "--kube-secret needs --kube-configmap" in capsys.readouterr().err
    assert cli.main(["keygen", "--kube-secret", "k", "--out", "/tmp/x"]) == 2  # one or the other
    assert cli.main(["keygen", "--out", "/nonexistent/x", "--kube-configmap", "a"]) == 2
    assert "go with --kube-secret" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        keystore.parse_labels(["novalue"])
    with pytest.raises(ConfigError, match="--name given twice"):
        keystore.main(SimpleNamespace(name=["a", "a"], kube_configmap="c", kube_label=None, kube_secret="s"))
