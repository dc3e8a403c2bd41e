# One measured point: drive a system with the closed-loop load generator and, at the edges of the
# load generator's window, sample with psutil the CPU time of every process of the system (by
# role), the whole machine's CPU, and each process's RSS. Everything is per operation or per
# second of the same window, so one point's numbers can be compared with a baseline measured
# beside it.
#
# CPU-µs per op of a role = (CPU seconds its processes used in the window) / (ops completed in
# the window). "smrd" = replicas + gateways (the app's own CPU is reported apart as "app");
# "server" = everything on the serving side (smrd + app, or the unreplicated app, or etcd).
# "other" cores = machine busy cores - server - load generator: what the rest of the machine
# (other people's tests) took during the window; a high value means the point is less reliable.
import time

import psutil

from bench import loadgen


def _cpu(p):
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def _rss_mb(p):
    try:
        return round(p.memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None


def _machine_busy():
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Sampler:
    def __init__(self, system):
        self.system = system
        self.roles = system.processes()
        self.before = self.after = None

    def _sample(self):
        return {"t": time.monotonic(), "machine": _machine_busy(),
                "cpu": {role: [_cpu(p) for p in ps] for role, ps in self.roles.items()},
                "batch": self.system.batch_counters()}

    def start(self):
        self.before = self._sample()

    def end(self):
        self.after = self._sample()
        self.rss = {f"{role}-{i}": _rss_mb(p) for role, ps in self.roles.items()
                    for i, p in enumerate(ps)}

    def result(self, ops):
        b, a = self.before, self.after
        seconds = a["t"] - b["t"]
        per_role = {}
        per_process = {}
        for role, before in b["cpu"].items():
            total = 0.0
            for i, (x, y) in enumerate(zip(before, a["cpu"][role])):
                used = (y - x) if x is not None and y is not None else 0.0
                per_process[f"{role}-{i}"] = used
                total += used
            per_role[role] = total
        smrd = per_role.get("replica", 0.0) + per_role.get("gateway", 0.0)
        server = sum(per_role.values())

        def us(cpu_s):
            return round(cpu_s * 1e6 / ops, 1) if ops else None

        out = {
            "window_s": round(seconds, 3),
            "cpu_us_per_op": {**{role: us(v) for role, v in per_role.items()},
                              **({"smrd": us(smrd)} if "replica" in per_role else {}),
                              "server": us(server)},
            "cpu_us_per_op_by_process": {name: us(v) for name, v in per_process.items()},
            "cores": {**{role: round(v / seconds, 3) for role, v in per_role.items()},
                      "server": round(server / seconds, 3),
                      "machine_busy": round((a["machine"] - b["machine"]) / seconds, 3)},
            "rss_mb": self.rss,
        }
        if b["batch"] and a["batch"] and a["batch"][1] > b["batch"][1]:
            out["leader_batch_mean"] = round((a["batch"][0] - b["batch"][0]) /
                                             (a["batch"][1] - b["batch"][1]), 1)
        return out


def measure(system, *, clients, mix, seconds, warmup, procs=None):
    """One point: the load generator's figures plus the system's CPU, RSS and batch size."""
    system.check_alive()
    sampler = Sampler(system)
    framing = system.config["framing"]
    load = loadgen.run_load(ports=system.ports, framing=framing, clients=clients, seconds=seconds,
                            warmup=warmup, mix=mix, procs=procs, on_window_start=sampler.start,
                            on_window_end=sampler.end)
    system.check_alive()
    point = {**load, **sampler.result(load["ops"])}
    lg = load["loadgen"]["cores"]
    point["cores"]["loadgen"] = lg
    point["cores"]["other"] = round(max(0.0, point["cores"]["machine_busy"]
                                        - point["cores"]["server"] - lg), 3)
    return point
