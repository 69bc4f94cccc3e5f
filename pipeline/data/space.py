"""Room for a new data set beside the earlier one, and a full disk said in one paragraph.

The new data set is built beside --out while the earlier one stays until the swap, so both must fit;
the build holds the staged cases and the shards cut from them at once. Once the cases are staged their
size is known and the shards' size is estimated from it (tar headers and padding, `shard_bytes`):
`Room.check` refuses before any shard is written where they cannot fit, and a disk that fills anyway
(another writer, a quota) ends in the same paragraph (`Room.full`), after the build is removed.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.shards import MEMBERS
from pipeline.data.staging import Staging
from pipeline.errors import DataError

FULL = (errno.ENOSPC, errno.EDQUOT)
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a whole record
NPY_HEADER = 128  # np.save's header for these small 1-2 dimensional arrays
ID_BYTES = 4 + 8 + 8  # a case's length (int32), label and id (int64) beside its values
MANIFEST_BYTES = 16 * 2**10  # the manifest without its shard list: statistics, histograms, splits
MANIFEST_PER_SHARD = 256


class DiskFull(DataError):
    """Not enough room for a new data set beside --out: the directory, the space needed and free."""


class NoRoom(OSError):
    """The shards would not fit (estimated): said as a full disk is, once the build is removed."""


def shard_bytes(values: int, cases: int, blocks: int, shards: int) -> int:
    """At most the size of `shards` shards of `blocks` records holding `cases` cases, `values` bytes of steps.
    Each record holds its arrays as .npy members: a header block each, payloads padded to a block."""
    per_block = len(MEMBERS) * (TAR_BLOCK + NPY_HEADER + TAR_BLOCK - 1)
    per_shard = 2 * TAR_BLOCK + TAR_RECORD - 1  # the end-of-archive blocks, the padding to a record
    return values + cases * ID_BYTES + blocks * per_block + shards * (per_shard + MANIFEST_PER_SHARD) + MANIFEST_BYTES


@dataclass
class Room:
    out: Path  # as the user named it
    volume: Path  # the directory the build is made in (--out's parent)
    staging: Staging | None = None  # the cases staged so far (pipeline/data/staging.py)
    shards: int | None = None  # the shards' estimated size, once the splits are cut

    @property
    def staged(self) -> int:
        return self.staging.bytes if self.staging is not None else 0

    def check(self) -> None:
        """Before the shards are written: raise where they cannot fit beside the staged cases."""
        if self.shards is not None and self.shards > shutil.disk_usage(self.volume).free:
            raise NoRoom(errno.ENOSPC, "estimated before the shards are written")

    def full(self, err: OSError) -> DiskFull:
        """The paragraph for a full disk, told once the build has been removed."""
        free, old = _free(self.volume), _tree_bytes(self.out)
        if self.shards is not None:
            need = self.staged + self.shards
            needed = (f"needs about {_mib(need)} there ({_mib(self.staged)} of cases staged, then {_mib(self.shards)} "
                      "of shards with their tar headers)")
        elif self.staged:  # the disk filled while staging: only a lower bound is known
            need = 2 * self.staged
            needed = (f"needs more than {_mib(need)} there (the {_mib(self.staged)} of cases read before the disk filled, "
                      "staged once and about as much again as shards)")
        else:
            need, needed = 0, "needs room for its cases, staged once and about as much again as shards"
        why = "" if isinstance(err, NoRoom) else f" ({err.strerror or err})"
        if old:
            kept = (f", besides the {_mib(old)} of the earlier data set in {self.out}, which stays until the new one is "
                    f"complete. {self.out} is unchanged")
            delete = f", or delete {self.out} first if the earlier data set is not needed"
        else:
            kept, delete = ". Nothing was written", ""
        free_more = f"Free at least {_mib(need - free)}" if need > free else "Free space"
        return DiskFull(f"not enough space to prepare {self.out}{why}: {self.volume} has {_mib(free)} free, and the new "
                        f"data set {needed}{kept}. {free_more} on that volume, prepare into a directory with more room "
                        f"(--out){delete}")


def _mib(n: int) -> str:
    return f"{max(n, 0) / 2**20:.1f} MiB"


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _tree_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
