"""What a replica must remember across a crash, as records the driver appends to durable storage,
and the fold that rebuilds the replica's durable state from them. This module owns the meaning
of each record; storage (the WAL) owns bytes, files and fsync.
"""
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True, slots=True)
class ViewRecord:
    """The replica promised `view`: it will never accept a proposal of a lower view."""
    view: int


@dataclass(frozen=True, slots=True)
class AcceptRecord:
    """The replica accepted `value` for `instance` in `view` (a Paxos acceptor's vote)."""
    instance: int
    view: int
    value: bytes


@dataclass(frozen=True, slots=True)
class DecideRecord:
    """`value` is decided for `instance` (learned from a peer, so no AcceptRecord may exist)."""
    instance: int
    value: bytes


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """Every instance up to `commit` is decided, with the value last recorded for it."""
    commit: int


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """The app state and the session table after executing every instance <= `instance` are
    stored durably in a checkpoint file whose sha256 is `digest` (32 bytes) and whose size is
    `size` bytes. From then on the log need not hold any value of an instance <= `instance`."""
    instance: int
    digest: bytes
    size: int


@dataclass
class DurableState:
    """The fold of a replica's records: what it knew durably when it stopped."""
    view: int = 0
    entries: dict = field(default_factory=dict)  # instance -> [view, value, decided]
    commit: int = 0
    # The checkpoint with the highest instance (at equal instances, the later record: it names
    # the file written last). Entries at or below its instance are dropped, and ignored when
    # they come later; the commit point is at least its instance.
    checkpoint: Optional[CheckpointRecord] = None
    # How many records were folded: 0 means this replica never wrote any. Not part of equality:
    # two logs that fold to the same state are the same state.
    records: int = field(default=0, compare=False)

    def add(self, record) -> None:
        self.records += 1
        if isinstance(record, AcceptRecord):
            if self.checkpoint is not None and record.instance <= self.checkpoint.instance:
                return  # covered by the checkpoint: the app state already holds its effect
            old = self.entries.get(record.instance)
            if old is not None and old[2]:
                return  # a decided value is never replaced
            self.entries[record.instance] = [record.view, record.value, False]
        elif isinstance(record, DecideRecord):
            if self.checkpoint is not None and record.instance <= self.checkpoint.instance:
                return
            self.entries[record.instance] = [0, record.value, True]
        elif isinstance(record, CommitRecord):
            if record.commit > self.commit:
                self.commit = record.commit
        elif isinstance(record, ViewRecord):
            if record.view > self.view:
                self.view = record.view
        elif isinstance(record, CheckpointRecord):
            if self.checkpoint is None or record.instance >= self.checkpoint.instance:
                self.checkpoint = record
                for instance in [i for i in self.entries if i <= record.instance]:
                    del self.entries[instance]
                if record.instance > self.commit:
                    self.commit = record.instance
        else:
            raise TypeError(f"not a durable record: {record!r}")

    @classmethod
    def fold(cls, records) -> "DurableState":
        state = cls()
        for record in records:
            state.add(record)
        return state
