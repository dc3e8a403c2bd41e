# A deterministic HTTP/1.1 app for the http-framing tests: a counter. It knows nothing of smrd.
#   POST /incr -> 200, body = the new value;  GET /value -> 200, body = the value
# Flags after the port, for the volatile-header tests: --date-varies stamps a Date header that no
# other process repeats (as a real server's clock does); --body-varies puts the port in GET's body
# (an app that is really not deterministic).
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

count = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        global count
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path == "/incr":
            count += 1
            self._reply(200, str(count).encode())
        else:
            self._reply(404, b"no such path")

    def do_GET(self):
        body = str(count).encode()
        if BODY_VARIES:
            body += b" from %d" % self.server.server_address[1]
        self._reply(200, body) if self.path == "/value" else self._reply(404, b"no such path")

    def version_string(self):
        return "counter"  # no Date-like variation: replies must be identical on every replica

    def date_time_string(self, timestamp=None):
        return str(time.time_ns()) if DATE_VARIES else "-"

    def log_message(self, *args):
        pass


DATE_VARIES = "--date-varies" in sys.argv[2:]
BODY_VARIES = "--body-varies" in sys.argv[2:]

if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
