"""The write-ahead log's upkeep, run in worker threads beside appending: deleting the segments a
checkpoint covers (truncate_before), compressing closed segments (compress_closed), and reading
decided values back for a peer that is catching up or an app being rebuilt (read_decided).

Owns: those three operations, as a part of WriteAheadLog (see smrd.replica.wal.log for the
locks they share with it: a segment is claimed by one of them at a time).
Never: appends records, or changes what the log says (truncation removes only what a durable
checkpoint covers; a compressed segment replaces its .log only once read back and fsynced).
"""
import hashlib
import logging
import os

import zstandard

from .records import (_CHUNK, ZSTD_LEVEL, StorageError, _Damaged, _decompress, _index_records,
                      decode_record, segment_name)

log = logging.getLogger("smrd.replica.wal.log")  # one logger for the whole log, as operators know it


class Upkeep:
    """Mixin of WriteAheadLog: its upkeep and reading back."""

    def truncate_before(self, instance: int) -> tuple:
        """Delete the oldest segments that hold no Accept/Decide record above `instance`;
        -> (segments deleted, bytes freed on disk).

        Precondition: a CheckpointRecord with an instance >= `instance` was appended and
        synced (ValueError otherwise): the checkpoint file it names holds everything the
        deleted values produced, and must be durable before the record is appended.

        First it syncs what was appended (like sync()). If the active segment holds an
        Accept/Decide record, all at or below `instance` (or it has no header yet), that write
        goes to a new segment, written and fsynced now even if nothing was appended, whose
        header repeats the view, commit point and checkpoint (an active segment with a value
        above `instance` stays: it could not be deleted anyway). Then it deletes closed
        segments oldest first, while each one's highest Accept/Decide instance is <=
        `instance`, and stops earlier if the first segment left would not start with a
        complete header; so the segments left are gap-free, and the fold of what is left equals
        the fold of everything (the values deleted are all covered by the checkpoint). It
        fsyncs the directory after each deletion, so that a crash leaves a prefix deleted (the
        order of unlinks is not otherwise durable). A segment being compressed is waited for (its compression is told
        to give up). Blocks on disk I/O: call from a worker thread. "memory": does nothing."""
        if self._memory:
            return 0, 0
        with self._truncate_lock:
            with self._sync_lock:
                self._check_open()
                cp = self._wsum.checkpoint
                if cp is None or cp.instance < instance:
                    raise ValueError(
                        f"truncate_before({instance}) needs a synced checkpoint at or above "
                        f"{instance}; the latest synced one is "
                        f"{'none' if cp is None else cp.instance}")
                active = self._segs[self._seq]
                self._sync_locked(not self._size or not active.header
                                  or 0 <= active.top <= instance)
            victims = self._claim_prefix(instance)
            deleted = freed = 0
            try:
                for seg in victims:
                    # The .zst first: one that a failed compression left beside the .log must
                    # not outlive it. One directory fsync per file: a crash must leave a prefix
                    # deleted, never an older segment brought back after a newer one went.
                    for name in (segment_name(seg.seq, True), segment_name(seg.seq)):
                        try:
                            os.unlink(os.path.join(self.directory, name))
                        except FileNotFoundError:
                            continue
                        except OSError as exc:
                            raise StorageError(f"write-ahead log {self.directory}: cannot "
                                               f"delete {name}: {exc}") from exc
                        self._fsync_dir_or_fail(f"deleting {name}")
                    with self._meta:
                        del self._segs[seg.seq]
                    deleted += 1
                    freed += seg.size
            finally:
                with self._meta:
                    for seg in victims:
                        seg.busy = False
                    self._meta.notify_all()
                self.segments_deleted += deleted
                self.bytes_deleted += freed
            if deleted:
                log.info("write-ahead log %s: deleted %d segment(s) up to instance %d (%d bytes)",
                         self.directory, deleted, instance, freed)
            return deleted, freed

    def _claim_prefix(self, instance: int) -> list:
        with self._meta:
            while True:
                victims = []
                for seq in sorted(self._segs):
                    seg = self._segs[seq]
                    if seq >= self._seq or seg.top > instance:
                        break
                    victims.append(seg)
                # Whatever is left must start with a self-sufficient segment. The segment after
                # the last victim exists: victims are closed, and numbers have no gaps.
                while victims and not self._segs[victims[-1].seq + 1].header:
                    victims.pop()
                busy = [seg for seg in victims if seg.busy]
                if not busy:
                    for seg in self._segs.values():
                        seg.cancel = False
                    for seg in victims:
                        seg.busy = True
                    return victims
                for seg in busy:
                    seg.cancel = True
                self._meta.wait()

    def compress_closed(self) -> tuple:
        """Compress every closed segment still stored as wal-<seq>.log into wal-<seq>.log.zst,
        oldest first; -> (segments compressed, bytes before, bytes after). Never the active
        segment. Each: compress (zstd level 3, content size and checksum), fsync it, read it
        back and compare, fsync the directory, unlink the .log, fsync the directory. A failure
        removes the .zst and raises StorageError; the .log stays and the log goes on (a failed
        fsync stops the log, as everywhere). Runs with no lock held while it compresses: call it from a worker thread while the loop goes on
        appending and syncing. "memory": does nothing."""
        if self._memory:
            return 0, 0, 0
        self._check_open()
        done = before = after = 0
        with self._compress_lock:
            while True:
                with self._meta:
                    if self._state != "open":
                        break
                    # not one that truncate_before() is waiting to delete (cancel)
                    seg = next((s for seq, s in sorted(self._segs.items()) if seq < self._seq
                                and not (s.compressed or s.busy or s.cancel)), None)
                    if seg is None:
                        break
                    seg.busy = True
                try:
                    sizes = self._compress(seg)
                finally:
                    with self._meta:
                        seg.busy = False
                        self._meta.notify_all()
                if sizes is not None:
                    done += 1
                    before += sizes[0]
                    after += sizes[1]
                    self.segments_compressed += 1
        if done:
            log.info("write-ahead log %s: compressed %d segment(s), %d -> %d bytes",
                     self.directory, done, before, after)
        return done, before, after

    def _compress(self, seg):
        """Compress one claimed segment; (bytes before, after), or None if it gave up because
        truncate_before() wants the segment or the log closed."""
        src = os.path.join(self.directory, segment_name(seg.seq))
        dst = os.path.join(self.directory, segment_name(seg.seq, True))
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True,
                                        write_content_size=True)
        created = False
        try:
            with open(src, "rb") as fin:
                size = os.fstat(fin.fileno()).st_size
                digest = hashlib.blake2b()
                cobj = cctx.compressobj(size=size)
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                created = True
                with open(fd, "wb") as fout:
                    left = size
                    while left:
                        if seg.cancel or self._state != "open":
                            return self._give_up(dst)
                        chunk = fin.read(min(_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{src} shrank while being compressed")
                        digest.update(chunk)
                        fout.write(cobj.compress(chunk))
                        left -= len(chunk)
                    fout.write(cobj.flush())
                    fout.flush()
                    packed = fout.tell()
                    if self._fsync:
                        try:
                            os.fsync(fout.fileno())
                        except OSError as exc:
                            self._fail(f"fsync of {dst}", exc)
            # Read it back the way recovery will: the .log goes only if this gives its bytes.
            with open(dst, "rb") as f:
                raw = f.read()
            try:
                content = _decompress(raw)
            except _Damaged as exc:
                raise OSError(f"{dst} does not read back: {exc}") from exc
            if len(content) != size or hashlib.blake2b(content).digest() != digest.digest():
                raise OSError(f"{dst} reads back different bytes than {src}")
            del content, raw
        except StorageError:
            raise
        except (OSError, zstandard.ZstdError) as exc:
            if created:
                self._give_up(dst)
            raise StorageError(f"write-ahead log {self.directory}: cannot compress {src}: "
                               f"{exc}") from exc
        self._fsync_dir_or_fail(f"writing {dst}")
        with self._meta:
            # Under _meta: close() waits for busy segments before it lets the directory lock go,
            # so the .log is never unlinked once another process may own the directory.
            if seg.cancel or self._state != "open":
                give_up = True
            else:
                give_up = False
                try:
                    os.unlink(src)
                except OSError as exc:  # both files stay: recovery keeps the .log
                    raise StorageError(f"cannot remove {src} after compressing it: {exc}") from exc
                seg.compressed, seg.size = True, packed
        if give_up:
            return self._give_up(dst)
        self._fsync_dir_or_fail(f"removing {src}")
        return size, packed

    def _give_up(self, dst: str) -> None:
        # The .zst must be gone durably before truncate_before() unlinks its .log: a .zst that
        # outlived its .log would be read as a complete segment.
        self._remove_quietly(dst)
        self._fsync_dir_or_fail(f"removing {dst}")
        return None

    def _remove_quietly(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            log.warning("write-ahead log %s: cannot remove %s: %s", self.directory, path, exc)

    def read_decided(self, start: int, upto: int, max_entries: int, max_bytes: int) -> list:
        """The decided values of instances start, start+1, ... (never beyond `upto`, which the
        caller must know decided: at most its commit point), as [(instance, value)], at most
        max_entries and about max_bytes (at least one entry), read back from the segment files:
        catch-up for a peer, or a replay, once the values left memory. An instance's value is
        the last record of it in the log: once it is decided no record of it follows (the core
        never re-accepts a decided slot), and every record of a decided instance was synced
        before the commit point passed it. Blocking file reads: call it from a worker thread.
        Stops early (fewer entries) at a gap, e.g. instances covered by a checkpoint."""
        if self._memory or start > upto:
            return []
        self._check_open()
        with self._meta:
            seqs = sorted(seq for seq, seg in self._segs.items() if seg.top >= start)
        found = {}                      # instance -> (seq, ordinal, data, start, end) of its last record
        last = min(upto, start + max_entries - 1)
        for seq in seqs:
            loaded = self._read_segment_for_catchup(seq)
            if loaded is None:
                continue  # deleted meanwhile (truncated behind a checkpoint)
            data, latest, final_commit, final_pos = loaded
            for i in range(start, last + 1):
                where = latest.get(i)
                if where is not None:
                    found[i] = (seq, where[0], data, where[1], where[2])
            # What max_bytes lets us send, as far as we know the values (at least one).
            size, i = 0, start
            while i <= last and i in found:
                n = found[i][4] - found[i][3]
                if i > start and size + n > max_bytes:
                    last = i - 1
                    break
                size += n
                i += 1
            if i <= last:
                continue  # some wanted instance is further on
            # Final once a commit point >= last follows every record taken from this segment:
            # no record of those instances can come after it.
            newest = max((f[1] for f in found.values() if f[0] == seq), default=-1)
            if final_commit >= last and final_pos > newest:
                break
        out, size = [], 0
        for i in range(start, last + 1):
            where = found.get(i)
            if where is None:
                break
            data, off, end = where[2:]
            value = decode_record(data[off:end]).value  # checksum checked here, for what we send
            if out and size + len(value) > max_bytes:
                break
            out.append((i, value))
            size += len(value)
        return out

    def _read_segment_for_catchup(self, seq: int):
        # Serving a long catch-up walks the segments in order, a chunk per call: keep the last
        # closed segment read, with an index of its records (closed segments never change).
        cache = self._catchup_cache
        if seq in cache:
            return cache[seq]
        data = self._load_segment(seq)
        if data is None:
            return None
        loaded = (data, *_index_records(data))
        if seq < self._seq:
            if len(cache) >= 2:  # a chunk may straddle two segments: keep both
                del cache[next(iter(cache))]
            cache[seq] = loaded
        return loaded

    def _load_segment(self, seq: int):
        for compressed in (False, True):  # a compression may replace the .log while we look
            path = os.path.join(self.directory, segment_name(seq, compressed))
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            if not compressed:
                return raw
            try:
                return _decompress(raw)
            except _Damaged as exc:
                raise StorageError(f"log segment {path} is damaged: {exc}") from exc
        return None
