"""A plain HTTP/1.1 service with state, written as if smrd did not exist: a list of notes.

    POST /notes  (body: the note)  -> 201, body: its number
    GET  /notes                    -> 200, body: every note, one per line
    GET  /notes/N                  -> 200 (the note) or 404

Like most HTTP servers it stamps a `Date` header from its own clock on every response; smrd
compares replicas' replies without it (the `volatile_reply_headers` setting, `Date` by default).
Everything else it sends is a function of the requests it has seen, which is what smrd needs.
"""
import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

notes = []


class Notes(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "notes/1.0"  # instead of BaseHTTP/x Python/y: the same on every replica

    def _reply(self, status, body: bytes):
        self.send_response(status)  # adds Server and Date
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/notes":
            return self._reply(404, b"no such path\n")
        notes.append(body.decode("utf-8", "replace").replace("\n", " "))
        self._reply(201, b"%d\n" % len(notes))

    def do_GET(self):
        if self.path == "/notes":
            return self._reply(200, "".join(n + "\n" for n in notes).encode())
        number = self.path.removeprefix("/notes/")
        if number.isdigit() and 1 <= int(number) <= len(notes):
            return self._reply(200, (notes[int(number) - 1] + "\n").encode())
        self._reply(404, b"no such note\n")

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Notes)
    print(f"notes listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()
