"""Issue 13 item 8: one trainer per database: a lock beside the database, not beside the socket."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.daemon.settings import PathsConfig
from pocketd.store import DataLock, DataLocked, Store
from pocketd.store.datalock import lock_path

from .daemon_helpers import DaemonFactory


@pytest.fixture
def daemons(tmp_path: Path) -> DaemonFactory:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def test_the_second_taker_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    db = tmp_path / "pocketd.sqlite3"
    with DataLock.acquire(db, "pocketd run") as first:
        assert stat.S_IMODE(os.stat(lock_path(db)).st_mode) == 0o600
        with pytest.raises(DataLocked) as info:
            DataLock.acquire(db, "pocketd train")
        assert f"{db} is in use by pocketd run (pid {os.getpid()})" in str(info.value)
        assert first.held
    with DataLock.acquire(db, "pocketd train"):  # released: free again
        pass


def test_a_lock_path_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "pocketd.sqlite3"
    lock_path(db).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="lock file is a symlink"):
        DataLock.acquire(db, "pocketd run")
    assert not (tmp_path / "elsewhere").exists()


def test_two_daemons_with_different_runtime_dirs_cannot_share_a_data_dir(
        daemons: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = daemons()
    other_rt = tmp_path / "run2"
    other_rt.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(other_rt))  # a second socket: the socket lock does not see it
    assert PathsConfig().runtime_dir != first.config.paths.runtime_dir
    second = daemons(start=False)
    assert second.socket_path != first.socket_path
    with pytest.raises(DataLocked, match=f"in use by pocketd run \\(pid {os.getpid()}\\)"):
        second.start()
    assert not second.socket_path.exists()  # it cleaned up after itself
    assert first.store is not None  # the first goes on
    first.shutdown()
    second.start()  # the lock went with the first daemon
    assert second.socket_path.exists()


def test_foreground_train_refuses_at_once_while_the_database_is_locked(tmp_path: Path) -> None:
    db = PathsConfig().database
    db.parent.mkdir(parents=True, mode=0o700)
    with DataLock.acquire(db, "pocketd run"):
        result = CliRunner().invoke(cli, ["--set", "trainer.model=/nonexistent/model", "train", "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert f"pocketd: error: {db} is in use by pocketd run (pid {os.getpid()})" in result.output
    assert "[loading]" not in result.output  # refused before loading anything
    assert "Traceback" not in result.output


def test_reading_commands_do_not_need_the_lock(tmp_path: Path) -> None:
    db = PathsConfig().database
    db.parent.mkdir(parents=True, mode=0o700)
    Store.open(db).close()
    with DataLock.acquire(db, "pocketd run"):
        result = CliRunner().invoke(cli, ["stats"])
    assert result.exit_code == 0, result.output
