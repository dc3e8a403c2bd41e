"""A stand-in for the Kubernetes API server's core/v1 Secrets and ConfigMaps: a local HTTP server
that stores them and answers GET and POST the way the API does (404, 409 AlreadyExists, 403 for a
wrong token), for the tests of `smrd keygen --kube-secret` (smrd/ops/keystore.py) and the chart's
key Job. Importable as `kube_stand_in` (tests/ is on sys.path, as for helm_render)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAMESPACE, TOKEN = "smrd-test", "tok-keys"


class FakeApi:
    """objects[(plural, name)] = the stored object. `before_post` runs before a POST is stored
    (to plant a racing creation)."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.before_post = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code, doc):
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self):
                api.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._answer(403, {"kind": "Status", "message": "forbidden: wrong token"})
                    return None
                parts = self.path.strip("/").split("/")
                if parts[:4] != ["api", "v1", "namespaces", NAMESPACE] or parts[4] not in ("secrets", "configmaps"):
                    self._answer(404, {"kind": "Status", "message": "not found"})
                    return None
                return parts[4], (parts[5] if len(parts) > 5 else None)

            def do_GET(self):
                route = self._route()
                if route is None:
                    return
                obj = api.objects.get(route)
                if obj is None:
                    self._answer(404, {"kind": "Status", "message": f"{route[0]} \"{route[1]}\" not found"})
                else:
                    self._answer(200, obj)

            def do_POST(self):
                route = self._route()
                if route is None:
                    return
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api.before_post:
                    api.before_post(route[0], doc)
                key = (route[0], doc["metadata"]["name"])
                if key in api.objects:
                    self._answer(409, {"kind": "Status", "reason": "AlreadyExists",
                                       "message": f"{key[0]} \"{key[1]}\" already exists"})
                    return
                api.objects[key] = doc
                self._answer(201, doc)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_key_job(job: dict, workdir) -> dict[tuple[str, str], dict]:
    """Run the chart's rendered key Job (its container's command and args, parsed by smrd's own
    CLI) against a FakeApi, the service account as the Job's projected volume gives it; returns the
    objects it stored: {(plural, name): object}."""
    from pathlib import Path

    from smrd.ops import cli, keystore

    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["smrd"], container["command"]
    args = cli.build_parser().parse_args(container["args"])
    sa = Path(workdir) / "job-sa"
    sa.mkdir(parents=True, exist_ok=True)
    (sa / "token").write_text(TOKEN)
    (sa / "namespace").write_text(NAMESPACE)
    fake = FakeApi()
    try:
        api = keystore.Api(base_url=fake.url, service_account_dir=sa)
        keystore.store(api, args.kube_secret, args.kube_configmap, args.name,
                       keystore.parse_labels(args.kube_label), out=lambda s: None)
    finally:
        fake.close()
    return fake.objects


def mount(objects: dict, plural: str, name: str, directory) -> None:
    """The object's data as the kubelet mounts it: one file per key (a Secret's values decoded)."""
    import base64
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for item, value in objects[(plural, name)]["data"].items():
        (d / item).write_bytes(base64.b64decode(value) if plural == "secrets" else value.encode())
        (d / item).chmod(0o440 if plural == "secrets" else 0o644)
