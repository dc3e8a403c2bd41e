"""What a simulated run is made of and what it gives back: its parameters (fault rates, sizes,
the swarm's random choice of them per seed), its result, and the Violation a check raises.

Owns: Params, Result, Violation. Never: runs anything.
"""
import random
from dataclasses import dataclass, field, replace

from ..protocol.options import Options


class Violation(AssertionError):
    """An invariant failed. The message says which, where and when."""


# The share of swarm seeds that handle Readies in bursts (Params.bursts).
BURSTS = 0.3


@dataclass(frozen=True)
class Params:
    n: int = 3
    clients: int = 3
    client_window: int = 2       # requests a client keeps outstanding
    reply_cache: int = 8         # k; must be >= client_window
    keys: int = 4
    drop: float = 0.0
    duplicate: float = 0.0
    max_delay: int = 2           # ticks; random delays reorder messages
    crash: float = 0.0           # chance per tick that some replica crashes
    crash_mid_ready: float = 0.0 # chance that a crash lands between persist and send
    wipe: float = 0.0            # chance per tick that a replica dies and loses its disk
    restart_after: int = 40      # ticks a crashed replica stays down (at most)
    partition: float = 0.0       # chance per tick that the link pattern changes
    fault_ticks: int = 400
    liveness_ticks: int = 3000   # after healing, every request must complete within this
    encode: bool = False         # push every message through the wire codec
    evict_keep: int = -1         # >= 0: values more than this far below applied leave memory
    directed: float = 0.0        # chance that a client's first send of a request goes to one random
                                 # replica alone, marked directed (a gateway's leader hint, often stale)
    bursts: bool = False         # handle Readies as the daemon's loop does: a replica steps every
                                 # message delivered to it in a time step, then its tick, and only
                                 # then are the Readies handled (one group commit, one fsync), so a
                                 # Ready holds what many messages produced. False: after every
                                 # message and every tick, so a Ready holds what one produced
    # Membership (all off: the n replicas are the voters for good, as before membership changes).
    voters: tuple = None         # the bootstrap voters; None: all n
    joiners: tuple = ()          # (replica, tick): a replica outside `voters` starts at that tick as
                                 # a fresh pod (empty disk) with auto_join; 0: from the start
    leave: float = 0.0           # chance per tick that a member is asked to leave (request_leave)
    rejoin: float = 0.0          # chance per tick that a replica asked to leave is asked back
    admin: float = 0.0           # chance per tick that an operator submits changes itself
    options: Options = field(default_factory=lambda: Options(
        window=2, batch_max_requests=8, batch_max_bytes=4096, heartbeat_ticks=3,
        election_ticks=20, request_ticks=40, retransmit_ticks=6, max_view_change_backoff=4))

    @property
    def membership(self) -> bool:
        """Does this run change its membership?"""
        return bool(self.voters is not None or self.joiners or self.leave or self.rejoin or self.admin)

    def without_membership(self) -> "Params":
        """The same run with a fixed membership: what the seed drew before membership changes."""
        return replace(self, voters=None, joiners=(), leave=0.0, rejoin=0.0, admin=0.0)

    @classmethod
    def swarm(cls, seed: int, membership: bool = True, bursts: bool = True) -> "Params":
        """Each seed draws its own cluster size, fault mix and workload (swarm testing).
        membership=False / bursts=False: what the seed drew before membership changes / bursts."""
        r = random.Random(seed * 7919 + 17)
        window = r.choice([1, 2, 4])
        # Drawn from its own generator so that adding checkpoints left every older seed's
        # scenario as it was (the pinned regression seeds replay what once failed).
        extra = random.Random(seed * 31 + 5)
        every = extra.choice([0, 0, 3, 16])
        evict_keep = extra.choice([-1, -1, 0, 4])
        opts = Options(window=window, batch_max_requests=r.choice([1, 3, 16]),
                       batch_max_bytes=r.choice([64, 4096]), heartbeat_ticks=3,
                       election_ticks=20, request_ticks=40, retransmit_ticks=6,
                       max_view_change_backoff=4, catchup_max_entries=r.choice([1, 4, 64]),
                       checkpoint_every=every)
        client_window = r.choice([1, 2, 3])
        p = cls(
            n=r.choice([3, 3, 5, 5, 7]), clients=r.randint(1, 4), client_window=client_window,
            reply_cache=client_window + r.choice([0, 1, 4]), keys=r.choice([1, 3, 8]),
            drop=r.choice([0.0, 0.01, 0.05, 0.15]), duplicate=r.choice([0.0, 0.02, 0.1]),
            max_delay=r.choice([0, 1, 3, 8]), crash=r.choice([0.0, 0.003, 0.01, 0.02]),
            crash_mid_ready=r.choice([0.0, 0.3]), restart_after=r.choice([5, 40, 150]),
            partition=r.choice([0.0, 0.005, 0.02]), fault_ticks=r.choice([200, 400, 600]),
            wipe=r.choice([0.0, 0.0, 0.002, 0.006]),
            encode=r.random() < 0.25, options=opts, evict_keep=evict_keep,
            # Bursts come from a generator of their own too: a seed drawn without them runs the
            # scenario it ran before they existed. (The same draw with membership=False.)
            bursts=bursts and random.Random(seed * 2003 + 19).random() < BURSTS)
        # Membership changes come from a third generator, for the same reason; about a third of
        # the seeds keep a fixed membership and run exactly the scenario they ran before.
        mem = random.Random(seed * 4099 + 11)
        if not membership or mem.random() < 0.3:
            return p
        n = p.n
        if mem.random() < 0.35:
            voters = tuple(range(n))
        else:
            voters = tuple(sorted(mem.sample(range(n), mem.randint(1, n - 1))))
        joiners = tuple((c, 0 if mem.random() < 0.3 else mem.randint(1, p.fault_ticks - 1))
                        for c in range(n) if c not in voters)
        leave = mem.choice([0.0, 0.002, 0.005])
        rejoin = mem.choice([0.0, 0.004, 0.01])
        admin = mem.choice([0.0, 0.0, 0.004, 0.02])
        if not joiners and not leave and not admin:
            leave = 0.003  # every membership seed changes something
        return replace(p, voters=voters, joiners=joiners, leave=leave, rejoin=rejoin, admin=admin)


@dataclass
class Result:
    seed: int
    params: Params
    ok: bool
    violation: str
    summary: dict

    def replay_command(self):
        directed = f" --directed {self.params.directed:g}" if self.params.directed else ""
        if self.params.bursts != Params.swarm(self.seed).bursts:
            directed += " --bursts" if self.params.bursts else " --no-bursts"
        return f"python -m smrd.simulation --seed {self.seed}{directed} --trace"
