"""`smrd keygen --kube-secret NAME --kube-configmap NAME`: CURVE key pairs made inside a pod and
stored as Kubernetes objects, for the Helm chart's pre-install hook Job (security.enabled without
security.existingSecret).

Owns: one Secret (NAME.key of every key pair) and one ConfigMap (NAME.pub, the allow-list) in the
pod's own namespace, created through the Kubernetes API with the pod's service-account token
(stdlib only: the smrd image has no kubectl), and the rule that makes a rerun safe:
  - both objects exist: leave them alone (keys survive `helm upgrade` and a reinstall); fail if
    either lacks a name asked for, since the pods would refuse to start without it;
  - the Secret exists, the ConfigMap does not (an earlier run died between the two): make the
    ConfigMap from the Secret's keys (a public key is derived from its secret key);
  - the ConfigMap exists without the Secret: fail (secret keys cannot be recovered from public
    ones; delete the ConfigMap to start over);
  - a create that loses a race (409 AlreadyExists) reads what the winner wrote and goes on.
The Secret is created before the ConfigMap, so the allow-list never names keys that do not exist.
Never: overwrites, patches or deletes an object, prints or logs a secret key, or writes a file.
"""
from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ConfigError, SmrdError
from . import kube
from ..net import security

TIMEOUT_S = 10.0


class StoreError(SmrdError):
    """The Kubernetes API refused or failed a request; one line naming the request and the cause."""


class Api:
    """The few calls made: GET and POST of a namespaced core/v1 object. `base_url` and
    `service_account_dir` are there for tests (an http:// base_url sends the token in clear)."""

    def __init__(self, base_url: str | None = None, service_account_dir=None, timeout_s: float = TIMEOUT_S):
        sa = Path(service_account_dir or kube.SERVICE_ACCOUNT_DIR)
        self.base = base_url or kube.api_url()
        if self.base is None:
            raise ConfigError("--kube-secret: not in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT "
                              "are not set); use --out DIR outside Kubernetes")
        try:
            self.token = (sa / "token").read_text().strip()
            self.namespace = (sa / "namespace").read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--kube-secret: cannot read the service account in {sa} "
                              f"({exc.strerror or exc}); the pod needs its token mounted there") from None
        try:
            self.opener = kube.api_opener(self.base, sa)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--kube-secret: cannot load the API server's CA {sa / 'ca.crt'}: {exc}") from None
        self.timeout_s = timeout_s

    def _url(self, plural: str, name: str | None = None) -> str:
        path = f"/api/v1/namespaces/{urllib.parse.quote(self.namespace, safe='')}/{plural}"
        return self.base.rstrip("/") + path + (f"/{urllib.parse.quote(name, safe='')}" if name else "")

    def _call(self, method: str, url: str, what: str, body: dict | None = None):
        """(HTTP status, parsed JSON or None). 404 and 409 are answers, not errors."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=self.timeout_s) as reply:
                return reply.status, json.loads(reply.read(8 << 20))
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 409):
                return exc.code, None
            hint = (" (the Job's service account needs get and create on secrets and configmaps: the "
                    "chart's key-job Role)") if exc.code in (401, 403) else ""
            raise StoreError(f"{what}: HTTP {exc.code} {kube._reason(exc)}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(kube.unreachable(what, self.base, self.timeout_s, exc)) from None
        except ValueError:
            raise StoreError(f"{what}: the answer is not JSON") from None

    def get(self, plural: str, name: str) -> dict | None:
        """The object's `data` (Secret values still base64), or None if there is no such object."""
        what = f"GET {plural} {self.namespace}/{name}"
        status, doc = self._call("GET", self._url(plural, name), what)
        if status == 404:
            return None
        if not isinstance(doc, dict):
            raise StoreError(f"{what}: the answer is not an object")
        return doc.get("data") or {}

    def create(self, kind: str, plural: str, name: str, data: dict, labels: dict) -> bool:
        """True if created, False if it already existed (409: someone else made it first)."""
        body = {"apiVersion": "v1", "kind": kind,
                "metadata": {"name": name, "namespace": self.namespace, "labels": labels}, "data": data}
        if kind == "Secret":
            body["type"] = "Opaque"
        status, _ = self._call("POST", self._url(plural), f"POST {plural} {self.namespace}/{name}", body)
        return status != 409


def _secret_keys(data: dict, secret: str) -> dict[str, bytes]:
    """{NAME: Z85 secret key} of a Secret's NAME.key entries."""
    keys = {}
    for item, value in data.items():
        if not item.endswith(security.SECRET_SUFFIX):
            continue
        try:
            keys[item[:-len(security.SECRET_SUFFIX)]] = security.parse_key(base64.b64decode(value))
        except (ValueError, security.KeyFileError) as exc:
            raise StoreError(f"Secret {secret}: {item} is not a key file ({exc})") from None
    return keys


def store(api: Api, secret: str, configmap: str, names: list[str], labels: dict, out=print) -> str:
    """Make sure Secret `secret` holds NAME.key and ConfigMap `configmap` NAME.pub for every name.
    Returns what was done: "created", "kept", or "completed" (the ConfigMap made from an existing
    Secret). Raises StoreError when the objects exist but cannot serve (see the module's rules)."""
    for name in names:
        security.check_key_name(name)
    have = api.get("secrets", secret)
    done = "kept"
    if have is None:
        allow = api.get("configmaps", configmap)
        if allow is not None:
            raise StoreError(
                f"ConfigMap {api.namespace}/{configmap} exists but Secret {secret} does not: its public "
                f"keys have no secret keys any more; delete the ConfigMap (kubectl -n {api.namespace} "
                f"delete configmap {configmap}) to make a new key set, or restore the Secret")
        pairs = {}
        for name in names:
            public, private = security.zmq.curve_keypair()
            pairs[name] = private
        data = {n + security.SECRET_SUFFIX: base64.b64encode(k + b"\n").decode() for n, k in pairs.items()}
        if api.create("Secret", "secrets", secret, data, labels):
            done = "created"
            out(f"created Secret {api.namespace}/{secret}: {len(names)} secret keys")
        have = api.get("secrets", secret)  # what is there now (a racing run's keys, if it won)
        if have is None:
            raise StoreError(f"Secret {api.namespace}/{secret} vanished right after its creation")
    keys = _secret_keys(have, secret)
    missing = [n + security.SECRET_SUFFIX for n in names if n not in keys]
    if missing:
        raise StoreError(f"Secret {api.namespace}/{secret} exists without {', '.join(missing)}: left "
                         f"as it is; add those keys (smrd keygen, docs/security.md) or delete it and "
                         f"its ConfigMap {configmap} to make a new key set")
    allow = api.get("configmaps", configmap)
    if allow is None:
        pubs = {n + security.PUBLIC_SUFFIX: security.public_key(k).decode() + "\n" for n, k in keys.items()}
        if api.create("ConfigMap", "configmaps", configmap, pubs, labels):
            out(f"created ConfigMap {api.namespace}/{configmap}: {len(pubs)} public keys (the allow-list)")
            done = "completed" if done == "kept" else done
        allow = api.get("configmaps", configmap) or {}
    missing = [n + security.PUBLIC_SUFFIX for n in names if n + security.PUBLIC_SUFFIX not in allow]
    if missing:
        raise StoreError(f"ConfigMap {api.namespace}/{configmap} exists without {', '.join(missing)}: left "
                         f"as it is; add the public keys of Secret {secret} (docs/security.md)")
    if done == "kept":
        out(f"Secret {api.namespace}/{secret} and ConfigMap {configmap} exist with every key asked for: "
            f"left alone")
    return done


def parse_labels(items) -> dict:
    labels = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--kube-label {item!r}: write KEY=VALUE")
        labels[key] = value
    return labels


def main(args) -> int:
    """smrd keygen --kube-secret NAME --kube-configmap NAME --name NAME [--name ...] [--kube-label K=V]"""
    names = args.name or ["smrd"]
    if len(set(names)) != len(names):
        raise ConfigError(f"--name given twice for the same name ({', '.join(n for n in names if names.count(n) > 1)})")
    if not args.kube_configmap:
        raise ConfigError("--kube-secret needs --kube-configmap (where the allow-list goes)")
    store(Api(), args.kube_secret, args.kube_configmap, names, parse_labels(args.kube_label))
    return 0
