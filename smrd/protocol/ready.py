# The core's only output. The driver must handle a Ready strictly in this order:
#   1. make every record in `persist` durable (in order; one fsync may cover them all),
#   2. send `messages`,
#   3. execute `apply` in order on the app (each request as its plan says), then
#   4. return `replies` (answers the core could give without executing anything),
#   5. take `checkpoints` when execution reaches them; start a state `transfer` if asked.
# Sending before persisting would let a peer count a vote that a crash then forgets.
from dataclasses import dataclass, field


@dataclass
class Ready:
    persist: list = field(default_factory=list)   # records (smrd.protocol.records), in order
    messages: list = field(default_factory=list)  # (destination replica id, message)
    apply: list = field(default_factory=list)     # (instance, value, plan), consecutive from applied+1;
                                                  # plan: (client_id, seq, status, payload) per request
    replies: list = field(default_factory=list)   # (origin, client_id, seq, status, payload)
    # (instance, SessionsImage): after executing `instance` (an entry of this or an earlier
    # `apply`), store a checkpoint: the app's snapshot plus the image, its replies filled in as
    # the requests up to `instance` execute. Then call Replica.checkpoint_stored(instance).
    checkpoints: list = field(default_factory=list)
    # (peer, instance) or None: the log this replica needs was truncated at `peer` up to its
    # checkpoint `instance`; fetch a checkpoint >= instance, then Replica.install_checkpoint().
    transfer: tuple = None
    # (peer, start): a catch-up request for values this replica evicted from memory (they are
    # in its log files): the driver reads them back and sends the CatchupReply itself.
    serve_log: list = field(default_factory=list)

    def __bool__(self):
        return bool(self.persist or self.messages or self.apply or self.replies or
                    self.checkpoints or self.transfer or self.serve_log)
