"""A data set built beside its directory, then swapped in for the earlier one in one step.

`prepare_data.py --force` must never lose the data set it replaces. The new one is built in a sibling
directory on the same filesystem (`.NAME.prepare-PID`), completed there (its manifest last), and then
exchanged with --out by one renameat2(RENAME_EXCHANGE); the earlier one, now under the sibling's name,
is removed after. Until that exchange --out is not touched, so a failure, a signal or a full disk at
any moment leave it byte for byte as it was.

What a killed run leaves (SIGKILL cannot be caught) is removed by the next run, under a lock: an
exclusive flock on `.NAME.prepare.lock` beside --out is held for a whole preparation, so a run that
takes it knows that no preparation of this directory is alive and that every sibling of ours is a
leftover. A lock rather than the PID in the name: the kernel drops it when its holder dies, in any PID
namespace (in containers every run may be PID 1, so a PID tells nothing of a dead pod's leftovers,
and a live run on the next pod may have a PID that is free here), and it keeps two preparations of one
directory from swapping at the same time. The PID in the sibling's name only says who made it.

A mount point (a Kubernetes claim mounted at /data) cannot be renamed: there the build, the lock and
the leftovers live inside it, as hidden entries, and a first preparation moves the finished splits into
place, the manifest last (there is nothing earlier to lose, and a directory without a manifest is no
data set). A data set already at a mount point is never replaced there: that could not be one step.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

from pipeline.data.manifest import MANIFEST_NAME
from pipeline.data.prepare_pause import forced_renames, pause
from pipeline.data.space import FULL
from pipeline.data.staging import STAGING_DIR
from pipeline.errors import DataError

AT_FDCWD = -100
RENAME_EXCHANGE = 2
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)  # where no build can be made


class Replacement:
    """Holds the lock of a directory's preparation; builds beside it (`start`) and swaps (`swap`).

    Used as a context manager: entering takes the lock and removes the leftovers of killed runs;
    leaving removes an unfinished build and releases the lock."""

    def __init__(self, out: Path, dataset: str, say: Callable[[str], None] = lambda line: None,
                 hold: Callable[[], AbstractContextManager] = nullcontext):
        self.out = out  # as the user named it, for messages
        self.dir = Path(os.path.realpath(out))  # a symlinked --out: its target is what gets replaced
        self.dataset = dataset
        self.say = say
        self.hold = hold  # signals wait while the swap or the clean-up runs (pipeline/data/interrupt.py)
        self.build: Path | None = None
        self._lock_fd: int | None = None
        self._unwritable: OSError | None = None  # why the lock file could not be made
        self.mounted = is_mount(self.dir)  # then builds, the lock and leftovers live inside it
        self.beside = self.dir if self.mounted else self.dir.parent

    def sibling(self, kind: str) -> Path:
        return self.beside / (f".{kind}" if self.mounted else f".{self.dir.name}.{kind}")

    def __enter__(self) -> Replacement:
        try:
            self._lock_fd = _take_lock(self.sibling("prepare.lock"), self.out)
        except OSError as err:
            if err.errno not in UNWRITABLE:
                raise
            self._unwritable = err  # a no-op rerun needs no lock (a read-only data set); start refuses
        self._tidy()
        return self

    def __exit__(self, *exc) -> None:
        with self.hold():
            if self.build is not None:
                shutil.rmtree(self.build, ignore_errors=True)
                self.build = None
            if self._lock_fd is not None:
                # Unlinked while still held: a run that opened the old file sees it is gone and takes a new one.
                self.sibling("prepare.lock").unlink(missing_ok=True)
                os.close(self._lock_fd)
                self._lock_fd = None

    def start(self) -> Path:
        """A new empty directory beside --out, on its filesystem, to build the data set in."""
        if self.mounted and (self.dir / MANIFEST_NAME).exists():
            raise self._mount_point()
        build = self.sibling(f"prepare-{os.getpid()}")
        try:
            if self._unwritable is not None:  # the lock file could not be made: neither can the build
                raise self._unwritable
            build.mkdir()
        except OSError as err:
            if err.errno in FULL:
                raise
            raise DataError(
                f"cannot create {build} beside --out {self.out} ({err.strerror or err}): a new data set is built beside "
                f"--out and then takes its place, so {self.dir.parent} must be writable. Nothing was written; "
                "choose another --out or fix the permissions") from None
        self.build = build
        return build

    def _mount_point(self) -> DataError:
        return DataError(
            f"--out {self.out} is a mount point that already holds a data set. prepare_data.py builds a new data set "
            "beside the one it replaces and swaps it in once it is complete, so that a failure or an interruption "
            "never loses the one already there; a mount point cannot be swapped. Nothing was written. Prepare into "
            f"a subdirectory of the mount instead (--out {self.out.as_posix().rstrip('/')}/{self.dataset}) and point "
            "data.dir at it, or remove the earlier data set yourself first")

    def swap(self) -> None:
        """The complete build takes --out's place in one step; the earlier data set is removed after."""
        with self.hold():
            build = self.build
            if self.dir.is_dir():  # the replacement keeps the directory's permissions (set last: they may deny writing)
                os.chmod(build, stat.S_IMODE(self.dir.stat().st_mode))
            try:
                if self.mounted:
                    _move_in(build, self.dir)  # nothing to keep: start refused a mount that holds a data set
                    old = None
                elif not self.dir.exists():
                    os.rename(build, self.dir)  # nothing to keep
                    old = None
                elif not forced_renames() and _exchange(build, self.dir):
                    old = build  # the earlier data set, now under the build's name
                else:
                    old = self._swap_by_renames(build)
            except OSError as err:
                if err.errno in (errno.EXDEV, errno.EBUSY):  # a mount point after all (_is_mount is best effort)
                    raise self._mount_point() from None
                raise
            self.build = None  # from here --out holds the new data set
            pause("swapped")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # a leftover if this fails; the next run removes it

    def _swap_by_renames(self, build: Path) -> Path:
        """Where the filesystem cannot exchange: two renames, and the earlier data set back on failure.
        A SIGKILL between them leaves --out missing: the next run puts the earlier one back (`_tidy`)."""
        replaced = self.sibling(f"replaced-{os.getpid()}")
        os.rename(self.dir, replaced)
        try:
            pause("renamed")
            os.rename(build, self.dir)
        except BaseException:
            os.rename(replaced, self.dir)
            raise
        return replaced

    def _tidy(self) -> None:
        """Remove what killed preparations left: builds, earlier data sets set aside, an old-style
        `.staging` inside --out; put back an earlier data set that a kill left set aside. One line says so."""
        said = []
        ours = []
        if self._lock_fd is not None:  # only under the lock is every sibling of ours a dead run's
            prefixes = (self.sibling("prepare-").name, self.sibling("replaced-").name)
            ours = sorted(p for p in self.beside.iterdir() if p.name.startswith(prefixes))
        replaced = [p for p in ours if p.name.startswith(self.sibling("replaced-").name)]
        if replaced and not self.dir.exists():
            back = max(replaced, key=lambda p: p.stat().st_ctime)  # the latest set aside; a rename sets ctime
            os.rename(back, self.dir)
            ours.remove(back)
            said.append(f"put the earlier data set back in {self.out} from {back.name}, where a killed preparation had left it")
        if (self.dir / STAGING_DIR).is_dir():
            ours.append(self.dir / STAGING_DIR)
        if ours:
            size = sum(_size(p) for p in ours)
            for path in ours:
                _remove(path)
            names = ", ".join(str(p.relative_to(self.dir.parent)) for p in ours)
            said.append(f"removed what an interrupted preparation left beside {self.out} ({names}; {size / 2**20:.1f} MiB)")
        if said:
            self.say("; ".join(said))


def _move_in(build: Path, out: Path) -> None:
    """A finished build's entries into `out` (a mount point with no data set), the manifest last: until
    it lands, `out` is no data set. Splits a killed first preparation moved in before are replaced."""
    for entry in sorted(build.iterdir(), key=lambda p: p.name == MANIFEST_NAME):
        _remove(out / entry.name)
        os.rename(entry, out / entry.name)
    build.rmdir()


def _take_lock(path: Path, out: Path) -> int:
    """An exclusive flock on `path`, held until closed; refused while a live preparation holds it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataError(f"another preparation of --out {out} is running (pid {holder}, holding {path}); "
                            "wait for it to end, or stop it, and run this again") from None
        try:
            here = os.stat(path)
            same = (here.st_ino, here.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # its holder removed it as we opened it: take the next one


def is_mount(path: Path) -> bool:
    """A mount point, bind mounts of a directory of the same filesystem included (os.path.ismount compares
    devices, so it misses those; /proc/self/mountinfo lists them, with octal escapes)."""
    if os.path.ismount(path):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]) == str(path):
            return True
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the kernel, the C
    library or the filesystem cannot (ENOSYS, EINVAL): the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # not Linux, or a C library without it (glibc < 2.28)
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
