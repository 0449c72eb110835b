"""Private files and directories: the one place pocketd creates them.

Everything pocketd writes is for its user only: directories 0700, files 0600, whatever the
umask. Every package may import this module (store imports no other pocketd package).

- `make_private_dir`: `mkdir -p` whose every created directory is 0700.
- `atomic_write`: replace a file's content all at once, durably, mode 0600 by default.
- `touch_private`: create an empty 0600 file (or tighten an existing one).
- `check_owned`: refuse a file or folder that is not the user's own or that others may write to
  (as ssh does for its files): the config file and every data/state/cache/runtime folder.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from enum import Enum
from pathlib import Path

from .errors import UnsafeLocation

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
TMP_SUFFIX = ".tmp"  # temp files are `.<name>.<random>.tmp` next to their target


def make_private_dir(path: Path) -> Path:
    """Create `path` and its missing parents, each one mode 0700; return `path`.

    Directories that already exist, `path` included, are left as they are (a user's folder keeps
    its mode); to also tighten an existing directory of pocketd's own, call `tighten_dir` after.
    (`mkdir(parents=True)` would create the parents 0777 & ~umask, e.g. ~/.local/state/pocketd
    0755 when only ~/.local/state/pocketd/jobs was asked for.)
    Safe against a concurrent creator: a directory that appears meanwhile counts as existing.
    Raises FileExistsError if `path` or a parent exists and is not a directory, OSError otherwise.
    """
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        if current.exists() or current.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(current))
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # created by someone else meanwhile: theirs, left alone
        # mkdir's mode is masked by the umask; a umask cannot add bits, but set it exactly anyway
        if stat.S_IMODE(folder.stat().st_mode) != DIR_MODE:
            folder.chmod(DIR_MODE)
    return path


class Kind(str, Enum):
    """What `check_owned` expects to find."""

    FILE = "file"
    DIRECTORY = "directory"


def check_owned(path: Path, what: str, kind: Kind, *, root_ok: bool = False) -> os.stat_result:
    """Refuse `path` (UnsafeLocation naming it, `what` it is and the fix) unless it is a `kind`
    owned by the current user (or by root, with `root_ok`) and not writable by group or others.

    A symlink is followed: its target is what pocketd would use, so the target is checked (and
    never changed here). Returns the target's stat. OSError (e.g. missing) propagates.
    """
    st = os.stat(path)
    is_kind = stat.S_ISDIR(st.st_mode) if kind is Kind.DIRECTORY else stat.S_ISREG(st.st_mode)
    if not is_kind:
        expected = "directory" if kind is Kind.DIRECTORY else "regular file"
        raise UnsafeLocation(f"{path}: the {what} is not a {expected}")
    uid = os.getuid()
    if st.st_uid != uid and not (root_ok and st.st_uid == 0):
        raise UnsafeLocation(
            f"{path}: the {what} belongs to another user (uid {st.st_uid}, you are uid {uid}); "
            f"pocketd only uses its user's own files: use a {kind.value} of your own, or chown it to uid {uid}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        raise UnsafeLocation(f"{path}: the {what} is writable by {who} (mode {mode:04o}); fix: chmod go-w {path}")
    return st


def tighten_dir(path: Path) -> Path:
    """Set an existing directory of pocketd's own to 0700 (if it is not already); return it.

    Refuses (UnsafeLocation) a directory of another user or one others may write to (what they put
    there stays), and never chmods through a symlink: a linked directory must already be 0700.
    """
    st = check_owned(path, "folder", Kind.DIRECTORY)
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        if os.path.islink(path):
            raise UnsafeLocation(f"{path}: a symlink to a folder others may read (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}); fix: chmod 700 {os.path.realpath(path)}")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino == st.st_ino:  # still the directory checked above
                os.fchmod(fd, DIR_MODE)
        finally:
            os.close(fd)
    return path


def touch_private(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing; tighten it to 0600 if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, *, mode: int = FILE_MODE, durable: bool = True) -> None:
    """Replace `path` with `data` (str is written as UTF-8) so readers see the old or the new content, never a mix.

    The data goes to a unique temp file in the same directory (`tempfile.mkstemp`, so concurrent
    writers never share one), gets `mode` (0600 unless told), is flushed and fsynced, then
    `os.replace`s the target; the directory is fsynced so the rename survives a power cut.
    `durable=False` skips both fsyncs (for caches whose readers validate what they read).
    On any failure the temp file is removed, the old file is untouched, and the error
    (OSError, or whatever writing raised) propagates. The directory must exist.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def publish(tmp: Path, path: Path) -> None:
    """The last half of an atomic write, for a file streamed into `tmp` (same directory, already fsynced):
    `os.replace` it onto `path` and fsync the directory."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory (making renames in it durable); a filesystem that cannot is logged, not fatal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.debug("cannot open %s to fsync it: %s", path, e)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EROFS):
            raise
        log.debug("%s: directory fsync not supported: %s", path, e)
    finally:
        os.close(fd)
