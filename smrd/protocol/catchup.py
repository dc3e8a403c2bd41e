"""Catch-up: decided values fetched from peers by a replica that is behind.

Owns: whom to ask (the members; every id of hosts.conf while this replica's membership says
nothing about who holds them) and when; answering peers' requests from memory, in chunks of at
most Options.catchup_max_entries / catchup_max_bytes; handing requests for evicted values to the
driver (Ready.serve_log); and starting a state transfer (Ready.transfer) when a peer's log no
longer holds what this replica needs.
Must never: take a value from a catch-up reply as anything but decided (peers send only values
up to their commit point), overwrite a decided slot (R4), or ask for values while a state
transfer that covers them is under way.
"""
from . import messages as m
from .log import Slot
from .records import DecideRecord
from .status import NORMAL, RECOVERING, VIEW_CHANGE


class CatchupMixin:
    """Part of Replica (smrd.protocol.replica): catch-up from peers, and state transfer's start."""

    def _catchup_peers(self) -> tuple:
        """Whom to ask for decided values: the members, or every id of hosts.conf while the
        membership this replica holds says nothing about who has them (it recovers from an
        empty disk, with the bootstrap membership; or it holds no member but itself)."""
        if self.status == RECOVERING or not self._peers:
            return tuple(r for r in range(self.n) if r != self.id)
        return self._peers

    def _request_catchup(self) -> None:
        peers = self._catchup_peers()
        if not peers or self.transfer_from is not None:
            return  # a state transfer is under way: the values it covers are not in any log
        self.catchup_sent = self.now
        self.stats["catchup_requests"] += 1
        if self.status == NORMAL and self.leader != self.id and self.catchup_peer == 0:
            peer = self.leader
        else:
            peer = peers[self.catchup_peer % len(peers)]
        self._send(peer, m.CatchupRequest(self.view, self.commit + 1))

    def _on_catchup_request(self, sender, msg) -> None:
        if msg.start <= self.low:
            # Those values are only in our checkpoint now: the sender must fetch state.
            self._send(sender, m.LogTruncated(self.view, self.low))
            return
        if msg.start <= self.evicted:
            self._ready.serve_log.append((sender, msg.start))  # from the log files
            return
        entries = []
        size = 0
        opt = self.opt
        for i in range(max(msg.start, 1), self.commit + 1):
            value = self.log[i].value
            if entries and (len(entries) >= opt.catchup_max_entries or size + len(value) > opt.catchup_max_bytes):
                break
            entries.append((i, value))
            size += len(value)
        self._send(sender, m.CatchupReply(self.view, self.commit, tuple(entries)))

    def _on_catchup_reply(self, sender, msg) -> None:
        progressed = False
        for i, value in msg.entries:
            slot = self.log.get(i)
            if slot is not None and slot.decided:
                continue
            self.log[i] = Slot(slot.view if slot is not None else 0, value, True)
            if i > self.top:
                self.top = i
            self._ready.persist.append(DecideRecord(i, value))
            progressed = True
        if msg.commit > self.catchup_target:
            self.catchup_target = msg.commit
        if progressed:
            self.catchup_sent = -1 << 60  # ask for the next chunk at once
        if self.status == VIEW_CHANGE and self.leader == self.id:
            self._advance_commit()
            self._try_finish_view_change()

    def _on_log_truncated(self, sender, msg) -> None:
        if msg.checkpoint <= self.commit or self.transfer_from is not None:
            return  # we hold everything up to there already, or are fetching it
        self.transfer_from = (sender, msg.checkpoint)
        self._ready.transfer = self.transfer_from
