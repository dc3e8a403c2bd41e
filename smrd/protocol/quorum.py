"""The seam between the protocol and its fault model: quorum sizes, how many matching replies a
gateway needs, and message authentication. The crash-fault policy is the one shipped; a
Byzantine policy (n >= 3f+1, signed messages, f+1 matching replies) plugs in here without
touching the replica's or the drivers' code.
"""


class QuorumPolicy:
    """What a fault model must provide. Subclasses are immutable."""

    n: int
    quorum: int          # votes that decide an instance / complete a view change
    reply_quorum: int    # matching replies a gateway waits for by default
    max_faults: int

    def quorum_for(self, voters: int) -> int:
        """Votes that decide among `voters` voters (the membership changes what `n` was)."""
        raise NotImplementedError

    def sign(self, sender: int, frame: bytes) -> bytes:
        """Bytes to append so peers can authenticate `frame` (none for crash faults)."""
        return b""

    def verify(self, sender: int, frame: bytes, tag: bytes) -> bool:
        return True


class CrashFaultPolicy(QuorumPolicy):
    """n >= 2f+1 replicas tolerate f crashes; any two quorums of ceil((n+1)/2) intersect."""

    def __init__(self, n: int):
        if not 1 <= n <= 64:
            raise ValueError(f"replica count must be between 1 and 64, got {n}")
        self.n = n
        self.quorum = n // 2 + 1
        self.max_faults = (n - 1) // 2
        self.reply_quorum = 1

    def quorum_for(self, voters: int) -> int:
        return voters // 2 + 1

    def __repr__(self):
        return f"CrashFaultPolicy(n={self.n}, quorum={self.quorum}, f={self.max_faults})"
