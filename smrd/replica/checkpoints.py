"""Checkpoint files: the app's snapshot plus the session table after a given instance, stored
zstd-compressed beside the write-ahead log, named by instance, identified by the sha256 of their
uncompressed content (so replicas that executed the same prefix hold byte-identical content,
whatever zstd made of it).

Owns: the file format, writing (temp file, fsync, rename, fsync of the directory), reading with
verification, importing a file fetched from a peer (verified while streaming: memory stays
bounded whatever the state's size), listing and deleting.
Never: decides when to checkpoint (the protocol core does) or talks to the app or to peers.

Content (before compression):
  "SMCK" | version u8 | instance u64 | session table length u64 | app state length u64
  | session table bytes (smrd.protocol.sessions image) | app state bytes (the snapshot hook's reply)
"""
import hashlib
import os
import re
import struct

import zstandard

from ..errors import SmrdError
from .durable import fsync_dir

_HEAD = struct.Struct("<4sBQQQ")
_MAGIC = b"SMCK"
_VERSION = 1
_NAME = re.compile(r"^checkpoint-([0-9a-f]{16})\.zst$")
_PART = ".part"
_READ = 1 << 20


class CheckpointError(SmrdError):
    """A checkpoint file is missing, damaged or does not match the digest it was stored with."""


def encode_content(instance: int, sessions_blob: bytes, app_state: bytes) -> bytes:
    return b"".join((_HEAD.pack(_MAGIC, _VERSION, instance, len(sessions_blob), len(app_state)),
                     sessions_blob, app_state))


def decode_content(content, instance: int):
    """(session table bytes, app state bytes); CheckpointError if the content is not the
    checkpoint of `instance`."""
    if len(content) < _HEAD.size:
        raise CheckpointError("checkpoint content shorter than its header")
    magic, version, at, slen, alen = _HEAD.unpack_from(content, 0)
    if magic != _MAGIC or version != _VERSION:
        raise CheckpointError(f"not a checkpoint (magic {magic!r}, version {version})")
    if at != instance:
        raise CheckpointError(f"checkpoint content is for instance {at}, not {instance}")
    if _HEAD.size + slen + alen != len(content):
        raise CheckpointError("checkpoint content length does not match its header")
    start = _HEAD.size
    return bytes(content[start:start + slen]), bytes(content[start + slen:])


class CheckpointStore:
    """The checkpoint files in one directory. info() lists (instance, file size, digest)."""

    def __init__(self, directory: str, fsync: bool = True, level: int = 3):
        self.directory = os.fspath(directory)
        self.fsync = fsync
        self.level = level
        os.makedirs(self.directory, exist_ok=True)
        self._known = {}  # instance -> (size, digest)
        for name in os.listdir(self.directory):
            if name.endswith(_PART):
                os.unlink(os.path.join(self.directory, name))  # an interrupted write or transfer

    # ------------------------------------------------------------------------------ naming

    def path(self, instance: int) -> str:
        return os.path.join(self.directory, f"checkpoint-{instance:016x}.zst")

    def part_path(self, instance: int) -> str:
        return self.path(instance) + _PART

    def instances(self) -> list:
        return sorted(int(m.group(1), 16) for n in os.listdir(self.directory) if (m := _NAME.match(n)))

    def info(self) -> list:
        """(instance, file size, sha256 of content) of every stored checkpoint, oldest first.
        Digests of files found on disk are computed once (a streaming read)."""
        out = []
        for instance in self.instances():
            known = self._known.get(instance)
            if known is None:
                try:
                    known = self._known[instance] = self.verify_file(self.path(instance))
                except (CheckpointError, OSError):
                    continue  # damaged: never offered to a peer
            out.append((instance, *known))
        return out

    # ------------------------------------------------------------------------------ write

    def write(self, instance: int, sessions_blob: bytes, app_state: bytes):
        """Store a checkpoint durably; returns (file size, digest). Blocking: run it in a thread."""
        content = encode_content(instance, sessions_blob, app_state)
        digest = hashlib.sha256(content).digest()
        data = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                        write_content_size=True).compress(content)
        part = self.part_path(instance)
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        self._publish(part, instance)
        self._known[instance] = (len(data), digest)
        return len(data), digest

    def _publish(self, part: str, instance: int) -> None:
        os.rename(part, self.path(instance))
        if self.fsync:
            fsync_dir(self.directory)

    def import_part(self, instance: int, digest: bytes):
        """Verify a transferred file at part_path(instance) against `digest` and store it.
        Returns its size; CheckpointError (and the part file is removed) if it does not match."""
        part = self.part_path(instance)
        try:
            size, got = self.verify_file(part)
        except CheckpointError:
            os.unlink(part)
            raise
        if got != digest:
            os.unlink(part)
            raise CheckpointError(f"transferred checkpoint {instance} has sha256 {got.hex()[:16]}…, "
                                  f"the peers reported {digest.hex()[:16]}…")
        if self.fsync:
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._publish(part, instance)
        self._known[instance] = (size, digest)
        return size

    # ------------------------------------------------------------------------------ read

    def verify_file(self, path: str):
        """(file size, sha256 of the decompressed content), streaming; CheckpointError if the
        file is not a complete zstd stream with a valid checksum."""
        h = hashlib.sha256()
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=False)
                while chunk := reader.read(_READ):
                    h.update(chunk)
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"checkpoint file {path} is damaged: {exc}") from None
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        return size, h.digest()

    def read(self, instance: int, digest: bytes):
        """(session table bytes, app state bytes) of a stored checkpoint, verified against the
        digest its record holds."""
        path = self.path(instance)
        try:
            with open(path, "rb") as f:
                content = zstandard.ZstdDecompressor().stream_reader(f).read()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"checkpoint file {path} is damaged: {exc}") from None
        if hashlib.sha256(content).digest() != digest:
            raise CheckpointError(f"checkpoint file {path} does not match the digest in the log")
        return decode_content(content, instance)

    def read_chunk(self, instance: int, offset: int, length: int):
        """(total size, bytes) of a stored file, for a peer's transfer; (0, b"") if gone."""
        try:
            fd = os.open(self.path(instance), os.O_RDONLY)
        except FileNotFoundError:
            return 0, b""
        try:
            return os.fstat(fd).st_size, os.pread(fd, length, offset)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------ delete

    def delete_below(self, instance: int) -> int:
        """Delete checkpoints older than `instance`; returns how many."""
        gone = 0
        for at in self.instances():
            if at < instance:
                try:
                    os.unlink(self.path(at))
                except FileNotFoundError:
                    pass
                self._known.pop(at, None)
                gone += 1
        return gone
