"""The pod lab's client: runs in the lab's client namespace (`ip netns exec smrdlab-client`), where
the lab's DNS names resolve and the Service's ClusterIP is routed, and does there what the test
cannot do from the root namespace. It reads one JSON command per line on stdin and answers one
JSON line on stdout:

  {"cmd": "status", "hosts": PATH, "timeout": S,     -> {"rows": [...]}   (what `smrd status --json` prints)
   "curve_key": PATH, "curve_allow": DIR}             (with CURVE: the key and allow-list to use;
                                                      the allow-list is re-read at each call)
  {"cmd": "http", "url": URL, "timeout": S}          -> {"code": 200|503|None, "body": "..."}
  {"cmd": "load_start", "host", "port", "framing", "clients", "keys"}  -> {}
  {"cmd": "load_wait", "ops": N, "timeout": S}       -> {"ok": bool, "done", "errors"}
  {"cmd": "load_finish", "host", "port", "framing"}  -> {"records": [...], "done", "errors", "reasons"}
  {"cmd": "quit"}

The workload: closed-loop clients, each on its own connection to the gateway Service, doing
PUT (unique values) / GET / REMOVE on a few keys and recording a history for
smrd.testing.linearizability. A request that failed before it was sent is dropped from the
history; one whose outcome is unknown (no reply, an ERR from the gateway) stays open ("maybe
done"), and the client reconnects. load_finish stops them and reads every key back through the
Service, as the last entries of the history.
"""
from __future__ import annotations

import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

from smrd.apps.kvclient import KVClient, KVError, KVUnavailable, history_output, parse_get
from smrd.config.hosts import load_hosts
from smrd.net.security import KeyFileError, load as load_security
from smrd.ops.status import collect
from smrd.testing.linearizability import History


class Load:
    def __init__(self, host, port, framing, clients, keys):
        self.host, self.port, self.framing, self.keys = host, port, framing, keys
        self.history = History()
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.done = self.errors = 0
        self.reasons: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True)
                        for c in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, c):
        rnd = random.Random(c)
        client = None
        n = 0
        while not self.stop.is_set():
            if client is None:
                client = KVClient(self.host, self.port, self.framing, timeout=15)
            key = rnd.choice(self.keys)
            r = rnd.random()
            n += 1
            if r < 0.5:
                value = f"c{c}-{n}"
                op, request = self.history.invoke(c, "put", key, value), f"PUT {key} {value}"
            elif r < 0.85:
                op, request = self.history.invoke(c, "get", key), f"GET {key}"
            else:
                op, request = self.history.invoke(c, "remove", key), f"REMOVE {key}"
            try:
                reply = client.request(request)
                if reply.startswith(b"ERR"):
                    raise KVError(reply.decode(errors="replace"))
            except KVUnavailable as e:      # never sent: not part of the history
                self.history.discard(op)
                self._failed(client, e)
                client = None
                self.stop.wait(0.05)        # back off before reconnecting (the Service is down)
                continue
            except (KVError, OSError) as e:  # outcome unknown: the op stays open
                self._failed(client, e)
                client = None
                continue
            self.history.complete(op, history_output(request, reply))
            with self.cond:
                self.done += 1
                self.cond.notify_all()
        if client is not None:
            client.close()

    def _failed(self, client, e):
        client.close()
        with self.cond:
            self.errors += 1
            self.reasons.append(f"{time.monotonic():.3f} {e}")

    def wait(self, ops, timeout):
        with self.cond:
            target = self.done + ops
            ok = self.cond.wait_for(lambda: self.done >= target, timeout)
            return {"ok": ok, "done": self.done, "errors": self.errors}

    def finish(self, host, port, framing):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        with KVClient(host, port, framing, timeout=15) as client:
            for key in self.keys:
                op = self.history.invoke("final", "get", key)
                self.history.complete(op, parse_get(client.request(f"GET {key}")))
        records = [dict(client=o.client, op=o.op, key=o.key, value=o.value, output=o.output,
                        invoke=o.invoke, complete=o.complete) for o in self.history.operations()]
        return {"records": records, "done": self.done, "errors": self.errors,
                "reasons": self.reasons[-20:]}


_securities = {}


def security(hosts, key, allow):
    """The CURVE settings of `smrd status`, loaded once; the allow-list re-read (as smrd does
    every 2 s) at each call, so a rotated replica key is expected at once."""
    if not key:
        return None
    sec = _securities.get((key, allow))
    if sec is None:
        sec = _securities[(key, allow)] = load_security(key, "curve_key", allow, "curve_allow", hosts, None)[0]
    else:
        try:
            sec.reload()
        except KeyFileError:
            pass  # the previous allow-list stays in force, as in smrd
    return sec


def http(url, timeout):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return {"code": r.status, "body": r.read(200).decode(errors="replace")}
    except urllib.error.HTTPError as e:
        return {"code": e.code, "body": e.read(200).decode(errors="replace")}
    except (OSError, ValueError) as e:
        return {"code": None, "body": str(e)}


def main():
    load = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            what = cmd.pop("cmd")
            if what == "status":
                hosts = load_hosts(cmd["hosts"])
                sec = security(hosts, cmd.get("curve_key"), cmd.get("curve_allow"))
                out = {"rows": collect(hosts, cmd.get("timeout", 0.5), sec)}
            elif what == "http":
                out = http(cmd["url"], cmd.get("timeout", 1.0))
            elif what == "load_start":
                load = Load(**cmd)
                out = {}
            elif what == "load_wait":
                out = load.wait(cmd["ops"], cmd["timeout"])
            elif what == "load_finish":
                out = load.finish(**cmd)
            elif what == "quit":
                return
            else:
                out = {"error": f"unknown command {what!r}"}
        except Exception as e:  # answer, so the test sees why
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
