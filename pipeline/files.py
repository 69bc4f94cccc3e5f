"""Small file facts shared by the data, training and inference stages."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and IDX files need not fit in memory twice)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(stream: BinaryIO) -> str:
    """Hex sha256 of what a binary stream holds to its end (a file, a shard over the network), 1 MiB at a time."""
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Held by one process at a time, on this machine or a shared volume: the others wait at `with`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` whole or not at all: written beside it, then renamed over it, so that a reader (a run
    starting from a config, a user reading a report) never sees half a file. The partial name holds the pid:
    two writers of one path never share it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


# scheme://userinfo@ : the userinfo ends at the last '@' before the authority ends ('/', '?', '#').
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")


def mask_url(text: str) -> str:
    """`text` with the credentials of every URL in it masked: https://user:token@host/x -> https://***@host/x.

    For whatever is written or printed; the real URL is still the one to read from."""
    return _USERINFO.sub(r"\g<scheme>***@", text)
