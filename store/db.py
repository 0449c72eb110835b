"""Opening the database: a private file, WAL mode, migrations applied."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

from sqlite_utils import Database

from .documents import Documents
from .errors import DatabaseUnreadable
from .history import History
from .log import CheckpointLog
from .snapshots import Snapshots
from .private import make_private_dir, tighten_dir, touch_private
from .schema import migrations, refuse_newer_schema

log = logging.getLogger(__name__)


def _writable_hint(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return " (the file system is read-only)"
    if e.errno in (errno.EPERM, errno.EACCES):
        return " (read-only or immutable file: check its mode and `lsattr`)"
    return ""

BUSY_TIMEOUT_S = 30.0


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


class Store(AbstractContextManager["Store"]):
    """The pocketd database. Open with `Store.open(path)`; use as a context manager to close it.

    Feature APIs hang off it: `store.docs` (documents and examples), `store.log`
    (the checkpoint log), `store.snapshots` (verified tensors beside it), `store.history` (sessions and
    decisions).
    """

    def __init__(self, db: Database, path: Path | None) -> None:
        self.db = db
        self.path = path
        self.docs = Documents(db)
        self.log = CheckpointLog(db)
        self.snapshots = Snapshots(db)
        self.history = History(db)

    @classmethod
    def open(cls, path: Path | str) -> "Store":
        """Open (creating if needed) the database at `path`, mode 0600 in a 0700 directory.

        DatabaseUnreadable (one line naming `path`) when it cannot be: a directory or other
        non-file at `path`, a read-only or immutable file or file system, a damaged file, or a
        database made by a newer pocketd (NewerSchema: refused before anything is written).
        UnsafeLocation when its folder is another user's or writable by others.
        """
        path = Path(path)
        try:
            tighten_dir(make_private_dir(path.parent))
            if path.is_dir() or (path.exists() and not path.is_file()):
                kind = "a directory" if path.is_dir() else "not a regular file"
                raise DatabaseUnreadable(f"{path}: the database path is {kind}; set paths.data_dir to a folder "
                                         "where pocketd can keep its database file")
        except OSError as e:
            raise DatabaseUnreadable(f"{path}: cannot prepare the database folder: {e.strerror or e}") from e
        old_umask = os.umask(0o077)  # also covers the -wal and -shm files SQLite creates
        try:
            try:
                touch_private(path)
            except OSError as e:
                raise DatabaseUnreadable(f"{path}: cannot open the database for writing: {e.strerror or e}"
                                         f"{_writable_hint(e)}") from e
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            try:
                db = _Database(conn, execute_plugins=False)
                refuse_newer_schema(db, str(path))  # before anything is written, WAL mode included
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
                migrations.apply(db)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise DatabaseUnreadable(f"{path}: cannot open the database: {e}") from e
            except BaseException:
                conn.close()
                raise
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
