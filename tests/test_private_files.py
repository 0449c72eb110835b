"""pocketd.store.private: directories 0700 (parents included), atomic 0600 writes, one f32."""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.store import atomic_write, f32, make_private_dir, tighten_dir, touch_private
from pocketd.store import private

ROOT = Path(__file__).resolve().parent.parent


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def loose_umask() -> Iterator[None]:
    """umask 022: a file or directory created without an explicit mode would be world-readable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(private.TMP_SUFFIX))


# -- directories ---------------------------------------------------------------------------------


def test_a_chain_of_new_directories_is_all_private(tmp_path: Path, loose_umask: None) -> None:
    base = tmp_path / "user"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    leaf = base / ".local" / "state" / "pocketd" / "jobs"
    assert make_private_dir(leaf) == leaf
    for p in (base / ".local", base / ".local/state", base / ".local/state/pocketd", leaf):
        assert p.is_dir() and mode(p) == 0o700, (p, oct(mode(p)))
    assert mode(base) == 0o755  # the existing parent keeps its mode


def test_existing_directories_are_left_alone(tmp_path: Path, loose_umask: None) -> None:
    mine = tmp_path / "exports"
    mine.mkdir()
    mine.chmod(0o750)
    make_private_dir(mine)
    assert mode(mine) == 0o750
    make_private_dir(mine / "a" / "b")
    assert (mode(mine), mode(mine / "a"), mode(mine / "a" / "b")) == (0o750, 0o700, 0o700)
    assert tighten_dir(mine) == mine and mode(mine) == 0o700  # explicit, for pocketd's own folders


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        make_private_dir(tmp_path / "f")
    with pytest.raises(FileExistsError):
        make_private_dir(tmp_path / "f" / "sub")


def test_a_directory_created_meanwhile_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b"
    real_mkdir = Path.mkdir

    def racing_mkdir(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        if self == target.parent:  # another process creates it first
            real_mkdir(self, mode=0o755)
            os.chmod(self, 0o755)
        real_mkdir(self, mode=mode, parents=parents, exist_ok=exist_ok)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    make_private_dir(target)
    assert mode(target.parent) == 0o755 and mode(target) == 0o700


def test_touch_private(tmp_path: Path, loose_umask: None) -> None:
    f = tmp_path / "marker"
    touch_private(f)
    assert mode(f) == 0o600 and f.read_bytes() == b""
    f.write_text("keep")
    f.chmod(0o644)
    touch_private(f)
    assert mode(f) == 0o600 and f.read_text() == "keep"


# -- atomic writes ---------------------------------------------------------------------------------


def test_atomic_write_is_private_and_replaces(tmp_path: Path, loose_umask: None) -> None:
    f = tmp_path / "status.json"
    atomic_write(f, "first")
    assert f.read_text() == "first" and mode(f) == 0o600
    f.chmod(0o644)
    atomic_write(f, b"second")
    assert f.read_bytes() == b"second" and mode(f) == 0o600
    atomic_write(f, "run script", mode=0o755)  # an explicit mode, exactly (the umask does not apply)
    assert mode(f) == 0o755
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              fail_at: str) -> None:
    f = tmp_path / "config.toml"
    atomic_write(f, "old content")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, f"{fail_at} failed")

    monkeypatch.setattr(private.os, fail_at, broken)
    with pytest.raises(OSError, match=f"{fail_at} failed"):
        atomic_write(f, "new content " * 1000)
    monkeypatch.undo()
    assert f.read_text() == "old content" and mode(f) == 0o600
    assert leftovers(tmp_path) == []


def test_an_interrupted_write_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "job.json"
    atomic_write(f, "old")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(private.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(f, "new")
    monkeypatch.undo()
    assert f.read_text() == "old" and leftovers(tmp_path) == []


def test_durable_writes_fsync_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(private.os, "fsync", counting)
    atomic_write(tmp_path / "a", "x")
    assert synced == [False, True]  # the file, then its directory (after the rename)
    synced.clear()
    atomic_write(tmp_path / "b", "x", durable=False)
    assert synced == []


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", "x")
    assert not (tmp_path / "nope").exists()


def _writer(path: str, marker: int, rounds: int) -> None:
    payload = bytes([marker]) * (256 * 1024 + marker)  # each writer's own byte and length
    for _ in range(rounds):
        atomic_write(Path(path), payload)


def test_concurrent_writers_never_produce_a_torn_file(tmp_path: Path) -> None:
    f = tmp_path / "status.json"
    atomic_write(f, b"\0")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(f), m, 25)) for m in (1, 2, 3, 4)]
    for w in writers:
        w.start()
    reads = 0
    try:
        while any(w.is_alive() for w in writers) or reads < 10:
            data = f.read_bytes()
            reads += 1
            if data == b"\0":
                continue
            marker = data[0]
            assert len(data) == 256 * 1024 + marker and data.count(marker) == len(data), "torn file"
    finally:
        for w in writers:
            w.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    assert mode(f) == 0o600 and leftovers(tmp_path) == []


# -- f32 -------------------------------------------------------------------------------------------


def test_f32_rounds_like_float32() -> None:
    assert f32(1.5) == 1.5 and f32(0.1) != 0.1 and f32(f32(0.1)) == f32(0.1)
    assert f32(0.1) == 0.10000000149011612
    assert f32(1e39) == math.inf and f32(-1e39) == -math.inf  # beyond float32: an infinity, as IEEE and torch do
    assert math.copysign(1.0, f32(-0.0)) == -1.0 and math.isnan(f32(math.nan))
    assert f32(1e-46) == 0.0  # below the smallest subnormal


def test_one_definition_of_each_helper() -> None:
    """f32, the atomic write and the private mkdir exist once; the packages use them from store.private."""
    sources = {p: p.read_text(encoding="utf-8") for pkg in ("daemon", "ingest", "store", "trainer")
               for p in sorted((ROOT / pkg).rglob("*.py"))}
    defs = [str(p.relative_to(ROOT)) for p, text in sources.items() if re.search(r"^def f32\(", text, re.M)]
    assert defs == ["store/log.py"]
    for p, text in sources.items():
        rel = p.relative_to(ROOT)
        if rel == Path("store/private.py"):
            continue
        assert "parents=True" not in text, f"{rel}: mkdir(parents=True) makes loose parents; use make_private_dir"
        assert "os.replace(" not in text and ".replace(tmp" not in text, f"{rel}: use store.atomic_write"
