"""Kubernetes, seen from inside a replica pod: is this pod going away because its StatefulSet was
scaled down, or is it merely restarting?

Owns: one read-only GET of the pod's own StatefulSet from the API server, authenticated with the
pod's service-account token and verified with its CA (stdlib only), and the answer
`spec.replicas <= ordinal`. `smrd admin leave --self --if-scaled-down` (the chart's preStop hook)
asks it: a pod removed by a scale-down leaves the membership first; a restart changes nothing.
Must never: write to the API, wait longer than its timeout (a preStop hook that hangs holds the
pod until its grace period runs out), log, or guess: outside Kubernetes the answer is "not scaled
down" (so nothing changes), and an API error is a KubeError, never a silent False or True.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import SmrdError

# Where the kubelet (or the chart's projected volume) puts the service-account credentials.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The StatefulSet's name, set by the chart; without it the pod's hostname minus "-<ordinal>".
ENV_STATEFULSET = "SMRD_STATEFULSET"
# Seconds each step of the request (connect, TLS handshake, each read) may take: a preStop hook
# must not hang.
TIMEOUT_S = 5.0


class KubeError(SmrdError):
    """The Kubernetes API could not answer whether the StatefulSet was scaled down. The message is
    one line naming the request and the cause."""


def api_url(environ=None) -> str | None:
    """https://HOST:PORT of the API server from the variables the kubelet sets in every pod, or
    None outside Kubernetes."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 cluster
    return f"https://{host}:{port}"


def statefulset_name(ordinal: int, statefulset: str | None = None, environ=None,
                     hostname: str | None = None) -> str:
    """The StatefulSet this pod belongs to: the argument, else $SMRD_STATEFULSET, else the pod's
    hostname (= its name, NAME-<ordinal>) without the "-<ordinal>" suffix."""
    if statefulset:
        return statefulset
    env = os.environ if environ is None else environ
    if env.get(ENV_STATEFULSET):
        return env[ENV_STATEFULSET]
    host = hostname if hostname is not None else socket.gethostname()
    suffix = f"-{ordinal}"
    if not host.endswith(suffix) or len(host) == len(suffix):
        raise KubeError(
            f"cannot tell the StatefulSet's name: hostname {host!r} does not end in {suffix!r} "
            f"(replica id {ordinal}); set {ENV_STATEFULSET}"
        )
    return host[: -len(suffix)]


def scaled_down(ordinal: int, statefulset: str | None = None, *, base_url: str | None = None,
                service_account_dir: str | os.PathLike | None = None,
                timeout_s: float = TIMEOUT_S, environ=None, hostname: str | None = None) -> bool:
    """True if the pod with this ordinal is going away because its StatefulSet now wants fewer
    pods (spec.replicas <= ordinal); False if it stays (a restart, a rolling update, an eviction)
    and False outside Kubernetes (no service-account token or no API server address).

    `base_url` (default: from KUBERNETES_SERVICE_HOST/PORT) and `service_account_dir` (default:
    SERVICE_ACCOUNT_DIR: token, ca.crt, namespace) are there for tests and unusual setups; an
    http:// base_url sends the token in clear and is meant for tests only.
    Raises KubeError, with a one-line message, when the API does not answer within `timeout_s` or
    answers anything but the StatefulSet."""
    if ordinal < 0:
        raise ValueError(f"ordinal must be >= 0, got {ordinal}")
    sa = Path(service_account_dir or SERVICE_ACCOUNT_DIR)
    base = base_url or api_url(environ)
    token_file = sa / "token"
    if base is None or not token_file.is_file():
        return False  # not in a pod, or a pod without API access: nothing to decide on
    try:
        token = token_file.read_text().strip()
        namespace = (sa / "namespace").read_text().strip()
    except OSError as exc:
        raise KubeError(f"cannot read the service account in {sa}: {exc.strerror or exc}") from None
    if not token or not namespace:
        raise KubeError(f"the service account in {sa} has an empty token or namespace")
    name = statefulset_name(ordinal, statefulset, environ, hostname)
    path = (f"/apis/apps/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
            f"/statefulsets/{urllib.parse.quote(name, safe='')}")
    url = base.rstrip("/") + path
    try:
        opener = api_opener(base, sa)
    except (OSError, ssl.SSLError) as exc:
        raise KubeError(f"cannot load the API server's CA {sa / 'ca.crt'}: {exc}") from None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}",
                                                   "Accept": "application/json"})
    what = f"GET statefulset {namespace}/{name}"
    try:
        with opener.open(request, timeout=timeout_s) as reply:
            body = reply.read(4 << 20)
    except urllib.error.HTTPError as exc:
        raise KubeError(f"{what}: HTTP {exc.code} {_reason(exc)}{_hint(exc.code)}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise KubeError(unreachable(what, base, timeout_s, exc)) from None
    try:
        doc = json.loads(body)
        replicas = doc["spec"].get("replicas", 1)  # the API's default when unset
    except (ValueError, TypeError, KeyError, AttributeError):
        raise KubeError(f"{what}: the answer is not a StatefulSet ({body[:80]!r})") from None
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise KubeError(f"{what}: spec.replicas is {replicas!r}, not a number")
    return replicas <= ordinal


def api_opener(base: str, service_account_dir: Path):
    """An opener for the API server at `base`: no proxy (the API server is reached directly,
    whatever HTTPS_PROXY the pod was given) and, over https, the service account's CA. Raises
    OSError or ssl.SSLError when that CA cannot be loaded."""
    context = None
    if base.startswith("https:"):
        context = ssl.create_default_context(cafile=str(Path(service_account_dir) / "ca.crt"))
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=context))


def unreachable(what: str, base: str, timeout_s: float, exc: OSError) -> str:
    """The one line for a request `what` that got no HTTP answer (a time-out or no connection)."""
    cause = getattr(exc, "reason", exc)
    if isinstance(cause, (TimeoutError, socket.timeout)) or "timed out" in str(cause):
        return f"{what}: no answer from {base} within {timeout_s:g} s"
    return f"{what}: cannot reach {base}: {cause}"


def _reason(exc: urllib.error.HTTPError) -> str:
    """The API's own one-line message (a Status object's `message`), else the HTTP reason."""
    try:
        message = json.loads(exc.read(64 << 10)).get("message")
    except Exception:  # noqa: BLE001 - any unreadable body falls back to the reason phrase
        message = None
    return " ".join(str(message or exc.reason or "").split())


def _hint(code: int) -> str:
    if code in (401, 403):
        return (" (the pod's service account needs 'get' on this StatefulSet: the chart's Role, "
                "membership.scaleDownLeave)")
    if code == 404:
        return " (no such StatefulSet: is it being deleted, or is SMRD_STATEFULSET wrong?)"
    return ""
