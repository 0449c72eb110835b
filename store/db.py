"""Opening the database: a private file, WAL mode, migrations applied."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from sqlite_utils import Database

from .errors import DatabaseUnreadable
from .schema import migrations

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0


def utcnow() -> str:
    """The current UTC time as ISO 8601 text, the store's one time format."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Database(Database):
    """sqlite-utils' Database whose outermost `atomic()` takes the write lock at once (BEGIN IMMEDIATE).

    The daemon (socket and inbox ingest, history) and the trainer (a step per commit) write the
    same file. A deferred transaction that reads and then writes fails at once with "database is
    locked" when another connection committed in between (SQLite cannot wait for a newer
    snapshot); an immediate one waits for the lock under busy_timeout instead.
    """

    @contextlib.contextmanager
    def atomic(self) -> Iterator["Database"]:
        if self.conn.in_transaction:  # nested: sqlite-utils' savepoints
            with super().atomic():
                yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.rollback()
                raise


def make_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700, and its missing parents 0700 too; tighten `path` if it already exists.

    (`mkdir(parents=True)` would make the parents 0777 & ~umask: e.g. ~/.local/state/pocketd 0755
    when only ~/.local/state/pocketd/jobs was asked for. The XDG spec asks for 0700 as well.)
    """
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def touch_private(path: Path) -> None:
    """Create `path` with mode 0600 if missing; tighten it if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    if stat.S_IMODE(path.stat().st_mode) != 0o600:
        path.chmod(0o600)


class Store(AbstractContextManager["Store"]):
    """The pocketd database. Open with `Store.open(path)`; use as a context manager to close it.

    Feature APIs hang off it: `store.docs` (documents and examples), `store.log`
    (the checkpoint log), `store.history` (sessions and decisions).
    """

    def __init__(self, db: Database, path: Path | None) -> None:
        from .documents import Documents
        from .history import History
        from .log import CheckpointLog

        self.db = db
        self.path = path
        self.docs = Documents(db)
        self.log = CheckpointLog(db)
        self.history = History(db)

    @classmethod
    def open(cls, path: Path | str) -> "Store":
        """Open (creating if needed) the database at `path`, mode 0600 in a 0700 directory."""
        path = Path(path)
        make_private_dir(path.parent)
        old_umask = os.umask(0o077)  # also covers the -wal and -shm files SQLite creates
        try:
            touch_private(path)
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                db = _Database(conn, execute_plugins=False)
                migrations.apply(db)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise DatabaseUnreadable(f"{path}: cannot open the database: {e}") from e
        finally:
            os.umask(old_umask)
        return cls(db, path)

    @classmethod
    def memory(cls) -> "Store":
        """An in-memory store, for tests and dry runs."""
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn.execute("PRAGMA foreign_keys=ON")
        db = Database(conn, execute_plugins=False)
        migrations.apply(db)
        return cls(db, None)

    def integrity_check(self) -> list[str]:
        """Run `PRAGMA integrity_check`; return the problems ([] when the file is sound)."""
        rows = [r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else rows

    def schema_version(self) -> list[str]:
        """Names of the applied migrations, oldest first."""
        return [m.name for m in migrations.applied(self.db)]

    def close(self) -> None:
        self.db.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
