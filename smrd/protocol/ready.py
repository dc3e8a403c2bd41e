# The core's only output. The driver must handle a Ready strictly in this order:
#   1. make every record in `persist` durable (in order; one fsync may cover them all),
#   2. send `messages`,
#   3. execute `apply` in order on the app (each request as its plan says), then
#   4. return `replies` (answers the core could give without executing anything).
# Sending before persisting would let a peer count a vote that a crash then forgets.
from dataclasses import dataclass, field


@dataclass
class Ready:
    persist: list = field(default_factory=list)   # records (smrd.protocol.records), in order
    messages: list = field(default_factory=list)  # (destination replica id, message)
    apply: list = field(default_factory=list)     # (instance, value, plan), consecutive from applied+1;
                                                  # plan: (client_id, seq, status, payload) per request
    replies: list = field(default_factory=list)   # (origin, client_id, seq, status, payload)

    def __bool__(self):
        return bool(self.persist or self.messages or self.apply or self.replies)
