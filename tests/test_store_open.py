"""Issue 13 (low): databases pocketd cannot or must not use give one clean line, and lose nothing."""

from __future__ import annotations

import errno
import hashlib
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.daemon.client import DaemonError, request
from pocketd.daemon.settings import PathsConfig
from pocketd.store import DatabaseUnreadable, Store
from pocketd.store.errors import NewerSchema

from .daemon_helpers import DaemonFactory


@pytest.fixture
def daemons(tmp_path: Path) -> DaemonFactory:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def _one_clean_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("pocketd: error: ")]
    assert len(lines) == 1, result.output  # (`run` logs its probe choice first)
    return lines[0]


def test_a_database_path_that_is_a_directory(tmp_path: Path) -> None:
    db = PathsConfig().database
    db.mkdir(parents=True)
    with pytest.raises(DatabaseUnreadable, match="the database path is a directory"):
        Store.open(db)
    for args in (["stats"], ["run"]):
        line = _one_clean_line(CliRunner().invoke(cli, args))
        assert f"{db}: the database path is a directory" in line, args


def test_a_file_where_the_data_folder_should_be(tmp_path: Path) -> None:
    data_dir = PathsConfig().data_dir
    data_dir.parent.mkdir(parents=True)
    data_dir.write_text("not a folder")
    for args in (["stats"], ["run"], ["train", "--steps", "1"]):
        line = _one_clean_line(CliRunner().invoke(cli, args))
        assert str(data_dir) in line, (args, line)
    assert data_dir.read_text() == "not a folder"


def test_a_read_only_or_immutable_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = PathsConfig().database
    Store.open(db).close()
    before = db.read_bytes()
    import pocketd.store.db as store_db

    def refuse(path: Path) -> None:  # what chattr +i (EPERM, even for root) or a 0400 file (EACCES) does
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(store_db, "touch_private", refuse)
    with pytest.raises(DatabaseUnreadable, match="cannot open the database for writing: Operation not permitted"):
        Store.open(db)
    for args in (["stats"], ["run"], ["train", "--steps", "1"]):
        line = _one_clean_line(CliRunner().invoke(cli, args))
        assert f"{db}: cannot open the database for writing" in line and "immutable" in line, (args, line)
    assert db.read_bytes() == before


def test_a_database_from_a_newer_pocketd_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "newer.sqlite3"
    with Store.open(db) as store:
        store.db["_sqlite_migrations"].insert(
            {"migration_set": "pocketd", "name": "m999_from_the_future", "applied_at": "2099-01-01"})
        store.db.execute("PRAGMA journal_mode=DELETE")  # as a newer pocketd might leave it
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(NewerSchema, match=f"{db}: this database was made by a newer pocketd "
                                          "\\(schema m999_from_the_future\\); upgrade pocketd"):
        Store.open(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert not Path(f"{db}-wal").exists()  # not even switched to WAL
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_newer_database_through_the_cli(tmp_path: Path) -> None:
    db = PathsConfig().database
    with Store.open(db) as store:
        store.db["_sqlite_migrations"].insert(
            {"migration_set": "pocketd", "name": "m999_from_the_future", "applied_at": "2099-01-01"})
    line = _one_clean_line(CliRunner().invoke(cli, ["stats"]))
    assert "made by a newer pocketd" in line


def test_disk_full_during_socket_ingest_is_a_store_error(daemons: DaemonFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d = daemons()
    ok = request(d.socket_path, "ingest", text="a first note that is stored")
    assert ok["ok"]
    from pocketd.store.documents import Documents

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Documents, "add_document", full)
    with pytest.raises(DaemonError) as info:
        request(d.socket_path, "ingest", text="a second note that does not fit")
    assert info.value.code == "store_error"
    assert "cannot store the text: database or disk is full" in str(info.value)
    monkeypatch.undo()
    assert request(d.socket_path, "status")["data"]["documents"] == 1  # the daemon goes on, nothing lost
