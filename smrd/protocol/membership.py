"""Which replicas vote, as part of the replicated state.

Owns: the Membership value (voters, learners, how many changes made it), the membership-change
entries that travel through consensus like requests, and the one deterministic rule that applies
a change or refuses it. Every replica applies the same decided changes in the same order, so
every replica computes the same membership at the same instance.
Must never: look at clocks, liveness or sockets. "Would this lose quorum?" depends on who is up,
so the leader asks it before it proposes a change (smrd.protocol.membership_changes), not here.

Why one change at a time, each adding or removing a single voter: any majority of a membership
and any majority of the next one intersect, so a decision taken by either is seen by a view
change that gathers either. Each change names the membership it applies to (`base`); a change
decided after another one took effect is refused at execution, which is what keeps two changes
proposed concurrently (by two leaders of different views) from both taking effect.
"""
import json
from dataclasses import dataclass

# The client id of membership-change entries inside a request batch. Gateways draw client ids
# below 2^63, so no outside request can carry it.
SYSTEM_CLIENT = (1 << 64) - 1

ADD_LEARNER = "add-learner"   # a replica that is not a member starts receiving the stream
PROMOTE = "promote"           # a learner becomes a voter (it caught up)
REMOVE = "remove"             # a voter or learner leaves
OPS = (ADD_LEARNER, PROMOTE, REMOVE)

_MAGIC = b"smrd-membership/1 "


@dataclass(frozen=True)
class Change:
    op: str
    replica: int
    base: int        # the Membership.index this change applies to

    def encode(self) -> bytes:
        return _MAGIC + json.dumps([self.op, self.replica, self.base]).encode()

    @classmethod
    def decode(cls, payload) -> "Change":
        """The change in a SYSTEM_CLIENT entry, or None if the bytes are not one."""
        payload = bytes(payload)
        if not payload.startswith(_MAGIC):
            return None
        try:
            op, replica, base = json.loads(payload[len(_MAGIC):])
        except (ValueError, TypeError):
            return None
        if op not in OPS or type(replica) is not int or type(base) is not int or replica < 0 or base < 0:
            return None
        return cls(op, replica, base)


@dataclass(frozen=True)
class Membership:
    index: int                 # changes applied since the bootstrap membership (index 0)
    voters: frozenset
    learners: frozenset = frozenset()

    @classmethod
    def bootstrap(cls, voters) -> "Membership":
        voters = frozenset(voters)
        if not voters:
            raise ValueError("the bootstrap membership needs at least one voter")
        return cls(0, voters)

    @property
    def quorum(self) -> int:
        """The crash-fault majority (what operators see; the core asks its QuorumPolicy)."""
        return len(self.voters) // 2 + 1

    @property
    def members(self) -> frozenset:
        return self.voters | self.learners

    def role(self, replica: int) -> str:
        if replica in self.voters:
            return "voter"
        if replica in self.learners:
            return "learner"
        return "none"

    def quorum_in(self, replicas, quorum: int = None) -> bool:
        """Do `replicas` include a quorum of the voters (by default a majority)?"""
        need = self.quorum if quorum is None else quorum
        return sum(1 for r in replicas if r in self.voters) >= need

    def check(self, change: Change, candidates: int):
        """(new Membership, "") if `change` applies to this membership, else (None, why not)."""
        if change.base != self.index:
            return None, (f"stale change: it was made for membership change {change.base}, and "
                          f"the membership is at change {self.index} now; read it and retry")
        r = change.replica
        if not 0 <= r < candidates:
            return None, f"replica {r} is not in hosts.conf (ids 0..{candidates - 1})"
        if change.op == ADD_LEARNER:
            if r in self.voters or r in self.learners:
                return None, f"replica {r} is already a {self.role(r)}"
            return Membership(self.index + 1, self.voters, self.learners | {r}), ""
        if change.op == PROMOTE:
            if r not in self.learners:
                return None, f"replica {r} is not a learner (it is {self.role(r)}); add it first"
            return Membership(self.index + 1, self.voters | {r}, self.learners - {r}), ""
        if r in self.learners:
            return Membership(self.index + 1, self.voters, self.learners - {r}), ""
        if r not in self.voters:
            return None, f"replica {r} is not a member"
        if len(self.voters) == 1:
            return None, f"replica {r} is the last voter; removing it would leave no quorum at all"
        return Membership(self.index + 1, self.voters - {r}, self.learners), ""

    def describe(self) -> dict:
        return {"index": self.index, "voters": sorted(self.voters), "learners": sorted(self.learners),
                "quorum": self.quorum}

    def encode(self) -> bytes:
        return json.dumps([self.index, sorted(self.voters), sorted(self.learners)]).encode()

    @classmethod
    def decode(cls, blob) -> "Membership":
        try:
            index, voters, learners = json.loads(bytes(blob))
            m = cls(int(index), frozenset(int(v) for v in voters), frozenset(int(v) for v in learners))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a membership: {exc}") from None
        if not m.voters or m.voters & m.learners or m.index < 0:
            raise ValueError(f"not a valid membership: {m}")
        return m


def change_entry(change: Change, seq: int):
    """The (client_id, seq, payload) batch entry that carries `change` through consensus."""
    return (SYSTEM_CLIENT, seq, change.encode())
