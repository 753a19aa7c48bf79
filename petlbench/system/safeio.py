"""Writing inside a folder petlbench owns: never through a symbolic link, never half a file under its final name.

Every file petlbench writes goes through here (results, timelines, logs, snapshots, the lock, reports, figures,
budgets baselines). The rules (docs/guarantees.md, "Writes"):

- A file is written under a fresh temp name in its final folder, opened with O_CREAT | O_EXCL | O_NOFOLLOW, and
  renamed over the final name: the rename replaces a link or a file that is there instead of writing through it,
  and an interrupted write leaves only a temp file (removed on the way out), never a truncated file.
- A log is appended to while a worker runs, so it cannot be renamed into place; the old entry is unlinked first
  and the log created with O_EXCL | O_NOFOLLOW: a symlink, a hard link or a FIFO left at its name is replaced, and
  whatever it pointed at is untouched.
- A folder petlbench creates below the one it was given (`logs/`, `timelines/`, `snapshots/`) must not be a
  symlink. The folder a user names (`--results-dir`, `--out`) may be one: that is where they chose to write.

Paths are handed to the OS as they are (os.open encodes them with the filesystem encoding), so a path that is not
valid UTF-8 works; libraries that would re-encode a path themselves (pyarrow) are given an open file instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)
FILE_MODE: Final = 0o644


def temp_name(path: Path) -> Path:
    """A temp name beside `path` no other writer uses (pid + random), hidden from readers by its leading dot."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def create_new(path: Path) -> int:
    """A file descriptor of a new file at `path`: fails (FileExistsError) when anything is there, a link included."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """`with atomic_writer(p) as f: f.write(...)`: `p` appears whole when the block ends, or not at all (an error or
    an interrupt removes the temp file and leaves an older `p` as it was)."""
    tmp = temp_name(path)
    handle = os.fdopen(create_new(tmp), "wb")
    try:
        with handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def open_log(path: Path) -> int:
    """A fresh log file at `path` for a child's stdout/stderr (a file descriptor): what was at that name (an older
    log, a symlink, a hard link, a FIFO) is unlinked first, never written through."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)


def subfolder(parent: Path, name: str) -> Path:
    """`parent/name`, created if missing; an OSError (ELOOP) when it is a symlink (petlbench does not write through
    a link inside a folder it owns)."""
    path = parent / name
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise OSError(errno.ELOOP, "a symbolic link; petlbench does not write through links, remove it", str(path))
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_lock(path: Path) -> int:
    """A lock file's descriptor, read-write, created if missing: refused (OSError) when `path` is a symlink, not a
    regular file, or a hard link shared with another name (its content is replaced by the holder's PID)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK, FILE_MODE)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "a hard link to another file"
        raise OSError(errno.EPERM, f"{what}; remove it", str(path))
    return fd


def move_into(source: Path, target: Path) -> None:
    """Move `source` to `target` (another folder, maybe another filesystem) replacing whatever is at `target`,
    never moving into a folder or through a link that is there."""
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with open(source, "rb") as src, atomic_writer(target) as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.unlink(source)


def is_link_error(exc: OSError) -> bool:
    """An OSError from one of the guards above (a symlink where a file or folder of petlbench's should be)."""
    return exc.errno == errno.ELOOP
