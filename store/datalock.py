"""The trainer lock of a database: one daemon or one foreground `pocketd train` per database.

Two trainers on one database would train the same examples into two candidates (one of them
stranded), so `pocketd run` and `pocketd train` take an exclusive `flock` on a 0600 file beside
the database (`<database>.lock`) before loading anything, and hold it until they exit. The
kernel drops the lock when the process dies, so a crash never leaves it stale. The holder writes
its pid and what it is into the file, for the message the next one gets.

The daemon's own trainer child does not take it: it runs under the daemon's lock (the lock's
descriptor is close-on-exec, so the child neither holds nor needs it). Readers and ingest do not
take it either: SQLite's own locking orders their writes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path
from types import TracebackType

from .errors import DatabaseUnreadable, DataLocked, UnsafeLocation
from .private import FILE_MODE, make_private_dir

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_MAX_HOLDER_BYTES = 256  # what the file says about its holder is read up to this much


def lock_path(database: Path) -> Path:
    """The lock file of `database` (beside it)."""
    database = Path(database)
    return database.with_name(database.name + LOCK_SUFFIX)


class DataLock:
    """An acquired trainer lock; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, database: Path, holder: str) -> "DataLock":
        """Take the lock of `database` for `holder` (e.g. "pocketd run") without waiting.

        DataLocked naming the database and the holder's pid if another process has it;
        UnsafeLocation if the lock path is not a regular file; DatabaseUnreadable if the lock
        cannot be created (a read-only file system, a file where the folder should be, ...).
        The database's missing folders are created 0700.
        """
        path = lock_path(database)
        try:
            make_private_dir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeLocation(f"{path}: the lock file is a symlink; remove it") from None
            raise DatabaseUnreadable(f"{path}: cannot create the database's lock file: {e.strerror or e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeLocation(f"{path}: the lock file is not a regular file; remove it")
            if st.st_uid != os.getuid():
                raise UnsafeLocation(f"{path}: the lock file belongs to another user (uid {st.st_uid}); remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataLocked(
                    f"{database} is in use by {_holder(fd)}: only one pocketd daemon or `pocketd train` "
                    "may train on a database at a time; stop that one first (or wait for it to finish)"
                ) from None
            if stat.S_IMODE(st.st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        log.debug("took the trainer lock %s (%s)", path, holder)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent). The file stays: removing it would race the next taker."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DataLock":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(fd: int) -> str:
    """"pocketd run (pid 1234)" from the lock file's content, or "another pocketd process"."""
    try:
        text = os.pread(fd, _MAX_HOLDER_BYTES, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, what = text.partition(" ")
    if not pid.isdigit():
        return "another pocketd process"
    return f"{what.strip()[:60] or 'pocketd'} (pid {int(pid)})"
