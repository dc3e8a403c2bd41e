"""`smrd status`: ask every replica in hosts.conf how it is doing, over its gateway port.
Owns the status query and its presentation. Never changes anything in the cluster.
"""
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import zmq

from .. import core
from ..errors import ProtocolError
from ..protocol.messages import STATUS_REPLY, STATUS_REQUEST


def query(endpoint: str, timeout_s: float = 2.0, security=None, replica: int | None = None):
    """The replica's status dict, or None if it did not answer within timeout_s.
    With CURVE (security: smrd.net.security.Security), `replica` picks the public key to expect."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"s" + os.urandom(4).hex().encode())
    if security is not None:
        security.configure_client(sock, replica)
    try:
        sock.connect(endpoint)
        sock.send(core.encode_frame(STATUS_REQUEST, 0, 0, 0))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                return None
            frame = sock.recv()
            try:
                mtype, _, _, _, _, payload = core.decode_frame(frame)
            except ProtocolError:
                continue
            if mtype == STATUS_REPLY:
                return json.loads(bytes(payload))
    finally:
        sock.close(0)


def collect(hosts, timeout_s: float = 2.0, security=None) -> list:
    # Every replica at once: candidates of hosts.conf that are not running (room to scale) would
    # otherwise each add the whole timeout.
    items = list(hosts.replicas.items())
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(items)))) as pool:
        answers = list(pool.map(lambda item: query(item[1].client_endpoint, timeout_s, security, item[0]),
                                items))
    return [{"id": rid, "address": f"{addr.host}:{addr.peer_port}", "reachable": st is not None,
             **(st or {})} for (rid, addr), st in zip(items, answers)]


def agreed_membership(rows) -> dict | None:
    """The membership with the highest index any reachable replica reports (the newest one
    applied anywhere: changes are applied in log order, so a lower index is only older), as
    {"index", "voters", "learners", "quorum"}; None if no replica answered."""
    best = None
    for r in rows:
        m = r.get("membership") if r.get("reachable") else None
        if m and (best is None or m["index"] > best["index"]):
            best = m
    return best


def state_of(row) -> str:
    """leader | follower | view-change | recovering, with what keeps the replica from executing
    after a comma (halted, rebuilding, resetting, app-down)."""
    if row["status"] == "normal" and row["leader"] == row["id"] and row.get("role", "voter") == "voter":
        state = "leader"
    else:
        state = "follower" if row["status"] == "normal" else row["status"]
    execution = row.get("execution", "executing")
    return state if execution == "executing" else f"{state},{execution}"


def main(args) -> int:
    from ..config.settings import load_config
    config = load_config(args, need_role=False)
    rows = collect(config.hosts, args.timeout, config.security)
    agreed = agreed_membership(rows)
    # Candidates of the hosts file outside the membership may well be absent (not started yet,
    # scaled down): only members that do not answer make the exit status 1.
    members = set(agreed["voters"]) | set(agreed["learners"]) if agreed else {r["id"] for r in rows}
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        cols = ("id", "address", "role", "state", "view", "leader", "commit", "executed", "lag", "app")
        top = max((r.get("commit", 0) for r in rows if r["reachable"]), default=0)
        table = [cols]
        for r in rows:
            if not r["reachable"]:
                role = "-" if r["id"] in members else "(absent)"
                table.append((str(r["id"]), r["address"], role, "UNREACHABLE", "-", "-", "-", "-", "-", "-"))
                continue
            table.append((str(r["id"]), r["address"], r.get("role", "-"), state_of(r), str(r["view"]),
                          str(r["leader"]), str(r["commit"]), str(r["executed"]), str(top - r["commit"]),
                          "ok" if r.get("app_ready") else "down"))
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if agreed is not None:
            behind = sorted(r["id"] for r in rows if r["reachable"] and r.get("membership")
                            and r["membership"]["index"] < agreed["index"])
            print(f"membership {agreed['index']}: voters {agreed['voters']} learners {agreed['learners']} "
                  f"(quorum {agreed['quorum']})" + (f"; not yet applied by {behind}" if behind else ""))
        for r in rows:
            if r["reachable"] and r.get("execution", "executing") != "executing":
                print(f"replica {r['id']}: {r['execution']}: {r.get('execution_reason', '')}")
        for r in rows:
            if not r["reachable"] and r["id"] in members:
                print(f"replica {r['id']} at {r['address']}: no answer within {args.timeout:g} s "
                      "(stopped, partitioned, or not yet started)", file=sys.stderr)
    return 0 if all(r["reachable"] for r in rows if r["id"] in members) else 1
