"""`smrd admin {members,join,leave}`: read and change the replica group's membership.

Owns: asking every replica of hosts.conf for its status and computing the agreed membership
(the highest index any replica applied), and submitting membership changes the way a gateway
submits requests (a REQUESTS frame to the replicas' client ports, the reserved client id
SYSTEM_CLIENT, a fresh random seq per attempt), waiting for the core's answer, retrying with a
fresh base when the membership moved, and the join (add-learner, wait until caught up, promote)
and leave (remove, wait until it is gone) procedures.
Must never: decide anything itself (the leader prechecks, the decided log applies or refuses:
this only asks and reports), print a traceback for a refusal, or wait without a deadline.
"""
import json
import logging
import os
import sys
import time

import zmq

from .. import core
from ..errors import ConfigError, ProtocolError, SmrdError
from ..protocol import messages as m
from ..protocol.membership import ADD_LEARNER, PROMOTE, REMOVE, SYSTEM_CLIENT, Change
from .status import agreed_membership, state_of

log = logging.getLogger(__name__)

# A learner is promoted once it trails the leader's commit point by at most this many instances
# and is not fetching a checkpoint (the same bound as a replica's readiness, smrd/replica/driver.py).
CAUGHT_UP_LAG = 64
# One submission waits this long for an answer before it is sent again (fresh seq, fresh base).
ATTEMPT_S = 3.0
# Between two looks at the replicas' status while waiting for progress.
POLL_S = 0.2


class Refused(SmrdError):
    """The replica group refused the change: the message is the core's reason."""


class Cluster:
    """One DEALER per replica of hosts.conf, as a gateway has; status queries and submissions."""

    def __init__(self, hosts, security=None, query_timeout_s: float = 2.0):
        self.hosts = hosts
        self.query_timeout_s = query_timeout_s
        self.ctx = zmq.Context.instance()
        identity = b"a" + os.urandom(4).hex().encode()   # one identity: replies route back here
        self.socks = {}
        self.poller = zmq.Poller()
        for rid, addr in hosts.replicas.items():
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            if security is not None:
                security.configure_client(sock, rid)
            sock.connect(addr.client_endpoint)
            self.socks[rid] = sock
            self.poller.register(sock, zmq.POLLIN)
        self.by_sock = {s: r for r, s in self.socks.items()}
        self.seqs = set()           # every seq this process submitted
        self.answers = {}           # seq -> (replica, answer text) for replies not yet taken
        self.taken = set()          # seqs whose answer was taken (other replicas' copies follow)

    def close(self):
        for sock in self.socks.values():
            sock.close(0)

    # ------------------------------------------------------------------ receiving

    def _receive(self, until: float, statuses: dict = None, want=None) -> None:
        """Read frames until `until` (monotonic), or until want() is true."""
        while True:
            if want is not None and want():
                return
            left = until - time.monotonic()
            if left <= 0:
                return
            for sock, _ in self.poller.poll(int(left * 1000) + 1):
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frame(self.by_sock[sock], frame, statuses)

    def _on_frame(self, replica, frame, statuses):
        if len(frame) > 3 and frame[3] == m.STATUS_REPLY:
            if statuses is not None:
                try:
                    payload = core.decode_frame(frame)[5]
                    statuses[replica] = json.loads(bytes(payload))
                except (ProtocolError, ValueError):
                    pass
            return
        try:
            _, msg = m.decode(frame)
        except ProtocolError:
            return
        if isinstance(msg, m.Replies):
            for client_id, seq, reply in core.Batch(msg.batch):
                if (client_id == SYSTEM_CLIENT and seq in self.seqs and seq not in self.answers
                        and seq not in self.taken):
                    self.answers[seq] = (replica, bytes(reply).decode("utf-8", "replace"))

    # ------------------------------------------------------------------ status

    def statuses(self, timeout_s: float = None, also=()) -> list:
        """Every replica's status row (as `smrd status --json` prints them). Stops waiting once
        every member of the newest membership reported so far, and the replicas in `also`,
        answered: candidates of hosts.conf that are not running would make every query last
        the whole timeout."""
        timeout_s = self.query_timeout_s if timeout_s is None else timeout_s
        frame = core.encode_frame(m.STATUS_REQUEST, 0, 0, 0)
        for sock in self.socks.values():
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass
        got = {}

        def enough():
            if len(got) == len(self.socks):
                return True
            cfg = max((st["membership"] for st in got.values() if st.get("membership")),
                      key=lambda c: c["index"], default=None)
            return cfg is not None and all(r in got for r in (*cfg["voters"], *cfg["learners"], *also))

        self._receive(time.monotonic() + timeout_s, got, want=enough)
        rows = []
        for rid, addr in self.hosts.replicas.items():
            st = got.get(rid)
            rows.append({"id": rid, "address": f"{addr.host}:{addr.peer_port}", "reachable": st is not None,
                         **(st or {})})
        return rows

    # ------------------------------------------------------------------ changes

    def submit(self, change: Change, wait_s: float):
        """Send `change` to every replica (the leader orders it; the others pass it on) and wait
        up to wait_s for the answer: "OK ..." or "REFUSED ...", or None if none came. An OK for
        an earlier attempt of this process counts too (it was decided after all)."""
        seq = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1) or 1
        self.seqs.add(seq)
        frame = m.encode(0, m.Requests(core.pack_batch([(SYSTEM_CLIENT, seq, change.encode())])))
        for sock in self.socks.values():
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass

        def answered():
            if seq in self.answers:
                return True
            return any(text.startswith("OK") for s, (_, text) in self.answers.items() if s != seq)

        self._receive(time.monotonic() + wait_s, want=answered)
        for s in [seq] + [s for s, (_, text) in self.answers.items() if text.startswith("OK")]:
            if s in self.answers:
                self.taken.add(s)
                return self.answers.pop(s)[1]
        return None


# ---------------------------------------------------------------------- procedures

def _describe(cfg) -> str:
    return f"membership {cfg['index']}: voters {cfg['voters']} learners {cfg['learners']}"


def _role(cfg, rid) -> str:
    if rid in cfg["voters"]:
        return "voter"
    return "learner" if rid in cfg["learners"] else "none"


def _agreed_or_fail(cluster, rows):
    cfg = agreed_membership(rows)
    if cfg is None:
        raise SmrdError(f"no replica of {cluster.hosts.path} answered within {cluster.query_timeout_s:g} s: "
                        f"is the cluster running and reachable from here (with CURVE on, give "
                        f"--settings or --curve-secret-key/--curve-public-keys)?")
    return cfg


def _caught_up(rows, rid):
    """(caught up?, why not) for replica rid, from the status rows."""
    row = next(r for r in rows if r["id"] == rid)
    if not row["reachable"]:
        return False, f"replica {rid} does not answer (start it: it catches up as a learner)"
    if row.get("status") != "normal":
        return False, f"replica {rid} is {row.get('status')}"
    if row.get("transfer_active"):
        return False, f"replica {rid} is fetching a checkpoint ({row.get('transfer_bytes', 0)} of " \
                      f"{row.get('transfer_size') or '?'} bytes)"
    top = max([r.get("commit", 0) for r in rows if r["reachable"]] + [row.get("known_commit", 0)])
    if top - row.get("commit", 0) > CAUGHT_UP_LAG or row.get("commit", 0) - row.get("executed", 0) > CAUGHT_UP_LAG:
        return False, f"replica {rid} is catching up (commit {row.get('commit')} of {top}, executed {row.get('executed')})"
    return True, ""


def _apply(cluster, op, rid, cfg, wait_s, out):
    """Submit one change against membership `cfg`. Returns the answer text, or None on timeout.
    Raises Refused for a refusal that asking again cannot cure."""
    answer = cluster.submit(Change(op, rid, cfg["index"]), wait_s)
    if answer is None:
        return None
    if answer.startswith("OK"):
        print(answer, file=out, flush=True)
        return answer
    reason = answer.removeprefix("REFUSED").strip()
    # Refusals that only mean "the membership moved" or "already done": look again and go on.
    if reason.startswith("stale change") or "is already a" in reason or "is not a member" in reason \
            or "is not a learner" in reason:
        log.debug("%s %d: %s; reading the membership again", op, rid, reason)
        return answer
    raise Refused(f"{op} {rid} refused: {reason}")


def join(cluster, rid, timeout_s, out=None) -> int:
    out = out or sys.stdout
    deadline = time.monotonic() + timeout_s
    rows = cluster.statuses(also=(rid,))
    cfg = _agreed_or_fail(cluster, rows)
    said = None
    while True:
        role = _role(cfg, rid)
        if role == "voter":
            print(f"replica {rid} is a voter ({_describe(cfg)})", file=out, flush=True)
            return 0
        left = deadline - time.monotonic()
        if left <= 0:
            why = "" if role == "none" else f": {_caught_up(rows, rid)[1] or 'it was not promoted yet'}"
            raise SmrdError(f"replica {rid} did not become a voter within {timeout_s:g} s (it is "
                            f"{'a learner' if role == 'learner' else 'not a member'}{why})")
        if role == "none":
            _apply(cluster, ADD_LEARNER, rid, cfg, min(ATTEMPT_S, left), out)
        else:
            ok, why = _caught_up(rows, rid)
            if ok:
                _apply(cluster, PROMOTE, rid, cfg, min(ATTEMPT_S, left), out)
            else:
                if why != said:
                    print(f"waiting: {why}", file=out, flush=True)
                    said = why
                time.sleep(POLL_S)  # polling the replicas' status: there is no event to wait on
        rows = cluster.statuses(also=(rid,))
        cfg = agreed_membership(rows) or cfg


def leave(cluster, rid, timeout_s, out=None) -> int:
    out = out or sys.stdout
    deadline = time.monotonic() + timeout_s
    rows = cluster.statuses()
    cfg = _agreed_or_fail(cluster, rows)
    while True:
        if _role(cfg, rid) == "none":
            print(f"replica {rid} is not a member ({_describe(cfg)})", file=out, flush=True)
            return 0
        left = deadline - time.monotonic()
        if left <= 0:
            raise SmrdError(f"replica {rid} is still a {_role(cfg, rid)} after {timeout_s:g} s "
                            f"({_describe(cfg)}); is a quorum of the voters up?")
        # The leader orders even its own removal; once applied, every replica moves to the next view.
        _apply(cluster, REMOVE, rid, cfg, min(ATTEMPT_S, left), out)
        rows = cluster.statuses()
        cfg = agreed_membership(rows) or cfg


def members(cluster, as_json, out=None) -> int:
    out = out or sys.stdout
    rows = cluster.statuses()
    cfg = _agreed_or_fail(cluster, rows)
    if as_json:
        json.dump({"membership": cfg, "replicas": rows}, out, indent=2)
        print(file=out)
        return 0
    print(f"{_describe(cfg)} (quorum {cfg['quorum']})", file=out)
    cols = ("id", "address", "member", "reports", "state", "view", "leader", "commit", "executed")
    table = [cols]
    for r in rows:
        member = _role(cfg, r["id"])
        if not r["reachable"]:
            table.append((str(r["id"]), r["address"], member, "-", "UNREACHABLE", "-", "-", "-", "-"))
            continue
        seen = r.get("membership", {}).get("index", "?")
        table.append((str(r["id"]), r["address"], member, f"{r.get('role', '?')} @{seen}", state_of(r),
                      str(r["view"]), str(r["leader"]), str(r["commit"]), str(r["executed"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)
    return 0


# ---------------------------------------------------------------------- entry point

def main(args) -> int:
    from ..config.settings import load_config
    config = load_config(args, need_role=False)
    hosts = config.hosts
    command = args.admin_command
    rid = None
    if command in ("join", "leave"):
        if command == "leave" and args.self:
            if args.replica is not None:
                raise ConfigError("leave: give a replica id or --self, not both")
            rid = config.settings.id
            if rid is None:
                raise ConfigError("leave --self needs this replica's id: set SMRD_ID (or id in the settings file)")
        elif args.replica is None:
            raise ConfigError(f"{command}: which replica? give its id (0..{hosts.n - 1})"
                              + (" or --self" if command == "leave" else ""))
        else:
            rid = args.replica
        if rid not in hosts.replicas:
            raise ConfigError(f"replica {rid} is not in {hosts.path} (replica ids 0..{hosts.n - 1}): "
                              f"only candidates listed there can {command}; add a replica line first")
    if command == "leave" and args.if_scaled_down:
        from . import kube  # only here: the rest of smrd never talks to Kubernetes
        if not kube.scaled_down(rid):
            log.info("replica %d stays: its StatefulSet was not scaled down below it (a restart, a "
                     "rolling update, or not in Kubernetes); the membership is unchanged", rid)
            return 0
        log.info("replica %d's StatefulSet was scaled down below it: leaving the membership", rid)
    cluster = Cluster(hosts, config.security, args.query_timeout)
    try:
        if command == "members":
            return members(cluster, args.json)
        if command == "join":
            return join(cluster, rid, args.timeout)
        return leave(cluster, rid, args.timeout)
    finally:
        cluster.close()
