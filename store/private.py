"""Private files and directories: the one place pocketd creates them.

Everything pocketd writes is for its user only: directories 0700, files 0600, whatever the
umask. Every package may import this module (store imports no other pocketd package).

- `make_private_dir`: `mkdir -p` whose every created directory is 0700.
- `atomic_write`: replace a file's content all at once, durably, mode 0600 by default.
- `touch_private`: create an empty 0600 file (or tighten an existing one).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from pathlib import Path

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


def tighten_dir(path: Path) -> Path:
    """Set an existing directory of pocketd's own to 0700 (if it is not already); return it."""
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        path.chmod(DIR_MODE)
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
