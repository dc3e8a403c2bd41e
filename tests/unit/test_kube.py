"""smrd.ops.kube.scaled_down against a stand-in for the Kubernetes API server: a local HTTPS server
(certificate made with the openssl command for 127.0.0.1) that answers GET of a StatefulSet the way
the API does, or with an error, or not at all. The service-account files are written to a
temporary directory, as the kubelet writes them into a pod."""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from smrd.ops import kube

NAMESPACE, STS, TOKEN = "smrd-test", "demo-smrd", "tok-123"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for IP 127.0.0.1: (cert path, key path)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make the stand-in API server's certificate "
                    "(Debian: apt-get install -y openssl)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "ca.crt", d / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=kubernetes", "-addext",
                    "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class FakeApi:
    """The API server's one endpoint that scaled_down uses. `replicas[name]` is the StatefulSet's
    spec.replicas; `status` forces an error answer; `hang` never answers."""

    def __init__(self, tls=None):
        self.replicas = {STS: 3}
        self.status, self.hang, self.body = None, False, None
        self.requests = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                api.requests.append((self.path, self.headers.get("Authorization")))
                if api.hang:
                    time.sleep(3)
                    return
                prefix = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/"
                name = self.path.removeprefix(prefix)
                if api.status is not None:
                    code, doc = api.status, {"kind": "Status", "status": "Failure", "code": api.status,
                                             "message": f'statefulsets.apps "{name}" is forbidden: User '
                                                        '"system:serviceaccount:x:y" cannot get\n resource'}
                elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    code, doc = 401, {"kind": "Status", "message": "Unauthorized"}
                elif not self.path.startswith(prefix) or name not in api.replicas:
                    code, doc = 404, {"kind": "Status", "message": f'statefulsets.apps "{name}" not found'}
                else:
                    code, doc = 200, {"kind": "StatefulSet", "metadata": {"name": name},
                                      "spec": {"replicas": api.replicas[name]}}
                body = api.body if api.body is not None and code == 200 else json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*map(str, tls))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                    "KUBERNETES_SERVICE_PORT": str(self.server.server_address[1])}
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(tls):
    a = FakeApi(tls)
    yield a
    a.close()


@pytest.fixture
def sa(tmp_path, tls):
    """A service-account directory as the kubelet writes it."""
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(TOKEN)
    (d / "namespace").write_text(NAMESPACE)
    shutil.copy(tls[0], d / "ca.crt")
    return d


def ask(api, sa, ordinal, **kw):
    kw.setdefault("environ", {**api.env, kube.ENV_STATEFULSET: STS})
    return kube.scaled_down(ordinal, service_account_dir=sa, **kw)


def test_scaled_down_is_replicas_at_or_below_the_ordinal(api, sa):
    # The address comes from KUBERNETES_SERVICE_HOST/PORT over https, verified with ca.crt.
    api.replicas[STS] = 3
    assert [ask(api, sa, i) for i in range(6)] == [False, False, False, True, True, True]
    api.replicas[STS] = 5  # scaled up again: the same pods stay
    assert ask(api, sa, 3) is False and ask(api, sa, 4) is False and ask(api, sa, 5) is True
    api.replicas[STS] = 0  # scaled to zero: every pod is going away
    assert ask(api, sa, 0) is True
    path, auth = api.requests[-1]
    assert path == f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{STS}"
    assert auth == f"Bearer {TOKEN}"


def test_statefulset_name_from_argument_env_or_hostname(api, sa):
    api.replicas["other"] = 1
    assert ask(api, sa, 1, statefulset="other") is True  # the argument wins over the environment
    assert api.requests[-1][0].endswith("/statefulsets/other")
    # No SMRD_STATEFULSET: the pod's hostname (its name) without "-<ordinal>".
    assert ask(api, sa, 4, environ=api.env, hostname=f"{STS}-4") is True
    assert api.requests[-1][0].endswith(f"/statefulsets/{STS}")
    with pytest.raises(kube.KubeError, match="does not end in '-4'.*SMRD_STATEFULSET"):
        ask(api, sa, 4, environ=api.env, hostname="laptop")
    assert kube.statefulset_name(12, hostname="a-b-c-12") == "a-b-c"


def test_base_url_parameter_and_plain_http(sa):
    api = FakeApi()  # http: only the explicit base_url is allowed to say so
    try:
        api.replicas[STS] = 2
        assert kube.scaled_down(2, STS, base_url=api.url, service_account_dir=sa, environ={}) is True
        assert kube.scaled_down(1, STS, base_url=api.url, service_account_dir=sa, environ={}) is False
    finally:
        api.close()


def test_not_in_kubernetes_is_not_scaled_down(api, sa, tmp_path):
    # No API server address (not a pod): nothing is asked.
    assert kube.scaled_down(7, STS, service_account_dir=sa, environ={}) is False
    # A pod without a service-account token (automount off, no Role): nothing is asked either.
    empty = tmp_path / "no-sa"
    empty.mkdir()
    assert kube.scaled_down(7, STS, service_account_dir=empty, environ=api.env) is False
    assert api.requests == []
    assert kube.api_url({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}) \
        == "https://[fd00::1]:443"


@pytest.mark.parametrize("code,message", [
    (403, r'HTTP 403 statefulsets.apps "demo-smrd" is forbidden: User "system:serviceaccount:x:y" '
          r"cannot get resource \(the pod's service account needs 'get'"),
    (500, "HTTP 500 statefulsets.apps"),
])
def test_api_errors_are_clear_one_line_errors(api, sa, code, message):
    api.status = code
    with pytest.raises(kube.KubeError, match=message) as err:
        ask(api, sa, 3)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"GET statefulset {NAMESPACE}/{STS}: ")


def test_missing_statefulset_wrong_token_and_garbage(api, sa):
    with pytest.raises(kube.KubeError, match="HTTP 404 .*no such StatefulSet"):
        ask(api, sa, 3, statefulset="gone")
    (sa / "token").write_text("stale")
    with pytest.raises(kube.KubeError, match="HTTP 401 Unauthorized"):
        ask(api, sa, 3)
    (sa / "token").write_text(TOKEN)
    api.body = b"<html>proxy error</html>"
    with pytest.raises(kube.KubeError, match="the answer is not a StatefulSet"):
        ask(api, sa, 3)


def test_timeout_is_an_error_not_a_hang(api, sa):
    api.hang = True
    t0 = time.monotonic()
    with pytest.raises(kube.KubeError, match=r"no answer from https://127.0.0.1:\d+ within 0.5 s"):
        ask(api, sa, 3, timeout_s=0.5)
    assert time.monotonic() - t0 < 2.5


def test_unreachable_and_untrusted_servers(api, sa, tmp_path):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)}
    with pytest.raises(kube.KubeError, match="cannot reach https://127.0.0.1"):
        kube.scaled_down(3, STS, service_account_dir=sa, environ=env, timeout_s=1)
    # A CA that did not sign the server's certificate: refused, not trusted.
    other = tmp_path / "other-ca"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=other", "-keyout", str(other) + ".key",
                    "-out", str(sa / "ca.crt")], check=True, capture_output=True)
    with pytest.raises(kube.KubeError, match="CERTIFICATE_VERIFY_FAILED"):
        ask(api, sa, 3)
    assert api.requests == []
    (sa / "ca.crt").write_text("not a certificate")
    with pytest.raises(kube.KubeError, match="cannot load the API server's CA"):
        ask(api, sa, 3)
