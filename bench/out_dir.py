# The --out directory of a benchmark command: created if missing, or one line on stderr and exit
# status 2 (argparse's usage error) when it cannot be: a file of that name, no permission, a
# read-only file system. Never a traceback for a bad path.
import argparse
from pathlib import Path


def make_out_dir(parser: argparse.ArgumentParser, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        parser.error(f"--out {path}: a file of that name exists; give a directory")
    except OSError as e:
        parser.error(f"--out {path}: cannot create the directory: {e.strerror or e}")
