"""A stand-in for the Kubernetes API server in the pod lab, for the replica pods' preStop hook
(`smrd admin leave --self --if-scaled-down`, which asks smrd.ops.kube). It runs in the lab's client
namespace and answers the one request smrd.ops.kube makes, over HTTPS with the lab's certificate:

  GET /apis/apps/v1/namespaces/NS/statefulsets/NAME   with "Authorization: Bearer TOKEN"
    -> 200 {"kind": "StatefulSet", "spec": {"replicas": N}}   N read from --replicas-file at each
       request (the test scales the StatefulSet by writing it)
    -> 401 for another token, 404 for another path (Status objects, as the API answers)

Prints "listening HOST:PORT" once it accepts connections; runs until killed.
"""
from __future__ import annotations

import argparse
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--statefulset", required=True)
    p.add_argument("--replicas-file", required=True)
    args = p.parse_args()
    path = f"/apis/apps/v1/namespaces/{args.namespace}/statefulsets/{args.statefulset}"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            sys.stderr.write("kube-api: " + (fmt % a) + "\n")

        def do_GET(self):
            if self.headers.get("Authorization") != f"Bearer {args.token}":
                code, doc = 401, {"kind": "Status", "code": 401, "message": "Unauthorized"}
            elif self.path != path:
                code, doc = 404, {"kind": "Status", "code": 404, "message": f"{self.path} not found"}
            else:
                replicas = int(Path(args.replicas_file).read_text())
                code, doc = 200, {"kind": "StatefulSet", "apiVersion": "apps/v1",
                                  "metadata": {"name": args.statefulset, "namespace": args.namespace},
                                  "spec": {"replicas": replicas}}
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
