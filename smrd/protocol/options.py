"""Tunables of the consensus core, in ticks and counts. The core never reads a clock: the driver
calls tick() every tick_ms and converts the user's millisecond settings into ticks here.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    window: int = 4                   # W: instances in flight at once (1 = BFT-SMaRt's order)
    batch_max_requests: int = 1024
    batch_max_bytes: int = 1 << 20
    heartbeat_ticks: int = 5          # leader sends COMMIT when it has sent nothing for this long
    election_ticks: int = 50          # follower suspects a silent leader after this long
    request_ticks: int = 100          # a pending request older than this is forwarded; 2x: suspect
    retransmit_ticks: int = 20        # leader re-sends unacknowledged PROPOSEs; catch-up retries
    max_view_change_backoff: int = 8  # a stuck view change waits election_ticks * 2^k, k capped
    catchup_max_entries: int = 256
    catchup_max_bytes: int = 4 << 20
    max_pending: int = 200_000        # requests held waiting for order; beyond it they are refused
    max_pending_per_origin: int = 4096  # the same, per gateway (one gateway cannot fill it alone)
    checkpoint_every: int = 0         # requests between checkpoints (0: never; the log is kept)

    def __post_init__(self):
        for name in ("window", "batch_max_requests", "batch_max_bytes", "heartbeat_ticks",
                     "election_ticks", "request_ticks", "retransmit_ticks",
                     "max_view_change_backoff", "catchup_max_entries", "catchup_max_bytes",
                     "max_pending", "max_pending_per_origin"):
            if getattr(self, name) < 1:
                raise ValueError(f"Options.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"Options.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.heartbeat_ticks >= self.election_ticks:
            raise ValueError("heartbeat_ticks must be smaller than election_ticks")

    @classmethod
    def from_millis(cls, tick_ms: int, heartbeat_ms: int, election_timeout_ms: int,
                    request_timeout_ms: int, **counts) -> "Options":
        def ticks(ms):
            return max(1, -(-ms // tick_ms))
        return cls(heartbeat_ticks=ticks(heartbeat_ms), election_ticks=ticks(election_timeout_ms),
                   request_ticks=ticks(request_timeout_ms),
                   retransmit_ticks=max(1, ticks(heartbeat_ms) * 2), **counts)
