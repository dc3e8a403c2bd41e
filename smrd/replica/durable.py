"""Making a change of names in a directory durable: after creating, renaming or removing a file,
fsync the directory, or a power loss may bring back the old name (or lose the new one).

Owns: the directory fsync the write-ahead log, the checkpoint store and the driver's recovery mark
need. Never: fsyncs file contents (their writers do) or decides when durability is needed.
"""
import os


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_touch(path) -> None:
    """An empty file at `path`, there after a power loss."""
    with open(path, "wb") as f:
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def durable_unlink(path) -> None:
    """`path` removed, and gone after a power loss."""
    os.unlink(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
