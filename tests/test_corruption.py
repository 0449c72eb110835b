"""Corruption: damaged files give a clear error naming the file; a log that does not verify is never trained on.

- database: truncated, bit-flipped header, bit-flipped schema / data pages -> the CLI
  (`pocketd stats`, `ingest`, `run`) exits 1 with one line naming the database, no traceback;
- checkpoint export file: truncated, bit-flipped anywhere, trailing bytes, or re-signed with
  tampered steps -> `pocketd checkpoint import` names the file and the current checkpoint is unchanged
  (tests/test_checkpoint_cli.py covers the basic truncate / flip / magic cases);
- config file: truncated, bit-flipped, invalid UTF-8 -> the error names the file;
- the checkpoint log: steps, hashes or step counts tampered in the database -> a training
  session refuses before writing anything (ReplayMismatch), `python -m pocketd.trainer` exits BAD_LOG,
  and the daemon reports why in `status` and `history`; a new candidate commits together with its
  step-0 hash (a kill in between leaves nothing half-made).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.store import Status, Store
from pocketd.trainer.ckptfile import MAGIC
from pocketd.trainer.config import TrainerConfig
from pocketd.trainer.errors import ReplayMismatch
from pocketd.trainer.job import ExitCode

from tests.daemon_helpers import wait_for
from tests.trainer_helpers import NOTES, fill_store, make_job, run

DB_NAME = "pocketd.sqlite3"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A store trained once on the tiny model: checkpoint 1 current (6 steps, hashes every 2),
    checkpoint 2 a candidate left by a stopped session (3 steps). Tests copy it; never modify it."""
    tmp = tmp_path_factory.mktemp("trained")
    job = make_job(tmp, tiny_model_dir, max_steps=6, hash_every=2)
    fill_store(job.database, NOTES + [f"{n} (again, day {i})" for i, n in enumerate(NOTES)])
    assert run(job).promoted
    out = run(job.model_copy(update={"max_steps": 100}), stop_after=3)
    assert out.steps == 3 and out.checkpoint_id == 2
    with Store.open(job.database) as store:
        assert store.log.get(1).status is Status.CURRENT and store.log.get(2).status is Status.CANDIDATE
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return job.database


def _copy_db(src: Path, data_dir: Path) -> Path:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    dst = data_dir / DB_NAME
    shutil.copyfile(src, dst)
    dst.chmod(0o600)
    return dst


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Path, trained_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file (tiny model, private paths) and a copy of the trained store; returns the database path."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[trainer]\nmodel = "{tiny_model_dir}"\nbatch_size = 4\nseq_len = 32\nlr = 1e-3\neps = 1e-2\n'
        f'seed = 7\nhash_every = 2\neval_examples = 16\n'
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\ncache_dir = "{tmp_path / "cache"}"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    return _copy_db(trained_db, tmp_path / "data")


def pocketd(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; an exception escaping it (a traceback for the user) fails the test."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def assert_one_line_error(code: int, out: str, path: Path) -> None:
    assert code == 1, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("pocketd: error:")]
    assert errors and str(path) in errors[0], out


def snapshot(db: Path) -> tuple[object, ...]:
    """What a refused operation must leave alone: checkpoints, steps, hashes, trained counts, documents."""
    with Store.open(db) as store:
        q = store.db.execute
        return (
            [(c.id, c.status, c.n_steps) for c in store.log.list()],
            q("select count(*), coalesce(sum(length(grads)), 0) from steps").fetchall(),
            q("select checkpoint_id, step, sha256 from checkpoint_hashes order by 1, 2").fetchall(),
            q("select id, trained_count from examples order by id").fetchall(),
            q("select count(*) from documents").fetchall(),
        )


# -- the database -------------------------------------------------------------------------------


def _root_page(db: Path, table: str) -> tuple[int, int]:
    """(page size, root page number) of a table, read with plain sqlite3."""
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("select rootpage from sqlite_master where name = ?", [table]).fetchone()[0]
    finally:
        conn.close()
    return page_size, root


def damage_database(db: Path, how: str) -> None:
    data = bytearray(db.read_bytes())
    if how == "truncated-half":
        data = data[: len(data) // 2]
    elif how == "truncated-in-header":
        data = data[:60]
    elif how == "flip-magic":  # "SQLite format 3\0"
        data[3] ^= 0x04
    elif how == "flip-page-size":  # header bytes 16-17
        data[16] ^= 0x01
    elif how == "flip-schema-page":  # page 1 after the 100-byte header: sqlite_master's b-tree
        data[100] ^= 0xFF
    elif how.startswith("flip-table-"):  # the b-tree page header of a table's root page
        page_size, root = _root_page(db, how.removeprefix("flip-table-"))
        data[(root - 1) * page_size] ^= 0xFF  # page type byte
    else:  # pragma: no cover
        raise ValueError(how)
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated-half", "truncated-in-header", "flip-magic", "flip-page-size",
                                 "flip-schema-page", "flip-table-documents", "flip-table-sources"])
def test_damaged_database_is_named_by_stats(env: Path, how: str) -> None:
    damage_database(env, how)
    code, out = pocketd("stats")
    assert_one_line_error(code, out, env)


@pytest.mark.parametrize("how", ["flip-table-documents", "flip-table-examples"])
def test_damaged_data_page_is_named_by_ingest(env: Path, tmp_path: Path, how: str) -> None:
    damage_database(env, how)
    note = tmp_path / "new.md"
    note.write_text("A note that cannot be stored in a broken database.\n", encoding="utf-8")
    code, out = pocketd("ingest", str(note))
    assert_one_line_error(code, out, env)


def test_daemon_refuses_to_start_on_a_damaged_database(env: Path) -> None:
    damage_database(env, "flip-magic")
    code, out = pocketd("run")
    assert_one_line_error(code, out, env)


# -- the checkpoint export file ---------------------------------------------------------------------


def _export(tmp_path: Path, checkpoint_id: int = 1) -> Path:
    f = tmp_path / "ck.pkd"
    code, out = pocketd("checkpoint", "export", str(checkpoint_id), str(f))
    assert code == 0, out
    return f


def damage_file(data: bytes, how: str) -> bytes:
    b = bytearray(data)
    (hlen,) = struct.unpack_from("<I", b, len(MAGIC))
    body = len(MAGIC) + 4 + hlen
    if how == "empty":
        return b""
    if how == "truncated-last-byte":
        return bytes(b[:-1])
    if how == "truncated-in-header":
        return bytes(b[: len(MAGIC) + 4 + hlen // 2])
    if how == "flip-header-json":
        b[len(MAGIC) + 4 + hlen // 2] ^= 0x01
    elif how == "flip-header-length":
        b[len(MAGIC)] ^= 0x01
    elif how == "flip-step-seed":
        b[body + 4] ^= 0x80  # first step: lr (f32), then the seed (i64)
    elif how == "flip-checksum":
        b[-1] ^= 0x01
    elif how == "trailing-byte":
        b += b"\x00"
    else:  # pragma: no cover
        raise ValueError(how)
    return bytes(b)


@pytest.mark.parametrize("how", ["empty", "truncated-last-byte", "truncated-in-header", "flip-header-json",
                                 "flip-header-length", "flip-step-seed", "flip-checksum", "trailing-byte"])
def test_damaged_checkpoint_file_is_named_and_nothing_is_imported(env: Path, tmp_path: Path, how: str) -> None:
    f = _export(tmp_path)
    f.write_bytes(damage_file(f.read_bytes(), how))
    before = snapshot(env)
    code, out = pocketd("checkpoint", "import", str(f))
    assert_one_line_error(code, out, f)
    assert snapshot(env) == before


def test_resigned_checkpoint_file_with_tampered_steps_fails_verification(env: Path, tmp_path: Path) -> None:
    """A file whose checksum is valid but whose steps were changed: replay catches it, current is kept."""
    f = _export(tmp_path)
    data = bytearray(f.read_bytes()[:-32])
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    body = len(MAGIC) + 4 + hlen
    struct.pack_into("<f", data, body + 12 + 16, 3.0)  # the second step's projected gradient
    f.write_bytes(bytes(data) + hashlib.sha256(bytes(data)).digest())
    with Store.open(env) as store:
        before = [(c.id, c.status, c.n_steps) for c in store.log.list()]
    code, out = pocketd("checkpoint", "import", str(f))
    assert_one_line_error(code, out, f)
    assert "does not verify" in out and "replay differs" in out
    with Store.open(env) as store:
        assert store.log.current().id == 1
        # An import that does not verify stores nothing (it is checked in memory first).
        assert [(c.id, c.status, c.n_steps) for c in store.log.list()] == before


# -- the config file ------------------------------------------------------------------------------


GOOD_CONFIG = '[trainer]\nbatch_size = 4\nseq_len = 32\n[paths]\ndata_dir = "/nonexistent/pocketd-data"\n'


def damage_config(how: str) -> bytes:
    raw = GOOD_CONFIG.encode("utf-8")
    b = bytearray(raw)
    if how == "truncated-in-string":
        return raw[: raw.index(b"pocketd-data")]
    if how == "truncated-in-table":
        return raw[:5]
    if how == "flip-bracket":  # "[" -> "Z"
        b[0] ^= 0x01
    elif how == "flip-digit":  # "4" -> "t"
        b[raw.index(b"= 4") + 2] ^= 0x40
    elif how == "flip-equals":  # "=" -> "<"
        b[raw.index(b"=")] ^= 0x01
    elif how == "flip-high-bit":  # an ASCII letter becomes a lone continuation byte: invalid UTF-8
        b[3] ^= 0x80
    elif how == "nul-byte":
        b[raw.index(b"seq_len")] = 0
    elif how == "flip-to-comment":  # "3" -> "#": `seq_len = #2`, a key without a value
        b[raw.index(b"= 32") + 2] ^= 0x10
    else:  # pragma: no cover
        raise ValueError(how)
    return bytes(b)


@pytest.mark.parametrize("how", ["truncated-in-string", "truncated-in-table", "flip-bracket", "flip-digit",
                                 "flip-equals", "flip-high-bit", "nul-byte", "flip-to-comment"])
@pytest.mark.parametrize("command", [["stats"], ["run"], ["config", "check"]])
def test_damaged_config_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
                                      command: list[str]) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(damage_config(how))
    if command == ["config", "check"]:
        code, out = pocketd(*command, str(cfg))
    else:
        monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
        code, out = pocketd(*command)
    assert_one_line_error(code, out, cfg)
    assert not Path("/nonexistent/pocketd-data").exists()


# -- a checkpoint log that does not verify -----------------------------------------------------------


TAMPER = {
    # checkpoint 1 is current (6 steps, hashes at 0, 2, 4, 6); 2 is a stopped candidate on top (3 steps)
    "grads-current": "update steps set grads = x'0000803f' where checkpoint_id = 1 and step = 1",
    "seeds-current": "update steps set seeds = x'0100000000000000' where checkpoint_id = 1 and step = 4",
    "lr-candidate": "update steps set lr = lr * 2 where checkpoint_id = 2 and step = 0",
    "hash-candidate": "update checkpoint_hashes set sha256 = '00' || substr(sha256, 3) "
                      "where checkpoint_id = 2 and step = 3",
    "hash-zero-candidate": "update checkpoint_hashes set sha256 = '00' || substr(sha256, 3) "
                           "where checkpoint_id = 2 and step = 0",
    "deleted-last-step": "delete from steps where checkpoint_id = 2 and step = 2",
    "deleted-middle-step": "delete from steps where checkpoint_id = 1 and step = 3",
    "n_steps-raised": "update checkpoints set n_steps = 4 where id = 2",
    "seeds-truncated": "update steps set seeds = substr(seeds, 1, 4) where checkpoint_id = 1 and step = 5",
}


def drop_snapshots(db: Path) -> None:
    """Delete the verified snapshots (trainer.snapshot), so loading replays the whole log."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("delete from checkpoint_snapshots")
        conn.commit()
    finally:
        conn.close()


def tamper(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute(sql).rowcount == 1
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_session_refuses_a_log_that_does_not_verify(env: Path, tmp_path: Path, tiny_model_dir: Path,
                                                    name: str) -> None:
    from pocketd.trainer.checkpoints import load_checkpoint
    from pocketd.trainer.session import run_session

    tamper(env, TAMPER[name])
    # `checkpoint verify` replays the whole log, whatever snapshot the store holds.
    code, out = pocketd("checkpoint", "verify", "2")
    assert code == 1 and "pocketd: error: checkpoint" in out and "Traceback" not in out
    # A session (and loading) starts from the newest verified snapshot and replays only the steps after
    # it (issue 17); without one it replays the whole log and refuses a log that does not verify.
    drop_snapshots(env)
    before = snapshot(env)
    job = make_job(tmp_path, tiny_model_dir, max_steps=3, hash_every=2).model_copy(update={"database": env})
    with pytest.raises(ReplayMismatch, match=r"checkpoint [12]: .*(replay differs|missing|holds|seeds)"):
        run_session(job, threading.Event())
    assert snapshot(env) == before  # nothing trained, nothing written
    with Store.open(env) as store, pytest.raises(ReplayMismatch):
        load_checkpoint(store, job.trainer, job.cache_dir, 2, verify=True)


def test_daemon_reports_a_log_that_does_not_verify(env: Path, tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The real daemon starts the real trainer child on a tampered log: exit BAD_LOG, reason in status/history."""
    from pocketd.daemon.client import request
    from pocketd.daemon.service import Daemon
    from pocketd.daemon.settings import DaemonConfig, PathsConfig, PocketdConfig, PolicyConfig

    tamper(env, TAMPER["grads-current"])
    drop_snapshots(env)  # the session must replay the tampered rows (see the test above)
    before = snapshot(env)
    power = tmp_path / "power.json"
    power.write_text('{"on_power": true, "percent": 90}')
    config = PocketdConfig(
        daemon=DaemonConfig(power_probe="fake", fake_power_file=power, stop_grace_s=5, nice=0),
        policy=PolicyConfig(max_load=1000, min_available_mb=0, check_interval_s=3600, min_battery_percent=0,
                            min_new_examples=0, cooldown_minutes=0),
        trainer=TrainerConfig(model=str(tiny_model_dir), batch_size=4, seq_len=32, lr=1e-3, eps=1e-2,
                              hash_every=2, eval_examples=16, threads=1),
        paths=PathsConfig(data_dir=env.parent, cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                          runtime_dir=tmp_path / "run" / "pocketd"),
    )
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    d = Daemon(config, trainer_command=[sys.executable, "-m", "pocketd.trainer"], supervise_interval_s=0.2)
    d.start()
    try:
        wait_for(lambda: d.supervisor.running is None and d.snapshot().backoff_failures >= 1,
                 timeout=90, interval=0.2, what="the trainer to refuse the log")
        st = request(d.socket_path, "status")
        last = st["last_session"]
        assert last["exit_status"] == ExitCode.BAD_LOG
        assert "refused: checkpoint" in last["end_reason"] and "replay differs" in last["end_reason"]
        hist = request(d.socket_path, "history")
        assert any("replay differs" in (s.get("end_reason") or "") for s in hist["sessions"])
        assert st["daemon"]["pid"] == os.getpid()  # the daemon itself carries on
    finally:
        d.shutdown()
    assert snapshot(env) == before


def test_a_new_candidate_is_created_with_its_start_hash_in_one_transaction(tmp_path: Path, tiny_model_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between creating a candidate and storing its step-0 hash (and its parent's validation loss)
    must leave neither: a candidate without them would be resumed unverified and gated against +inf."""
    from pocketd.store.log import CheckpointLog
    from pocketd.trainer.session import run_session

    job = make_job(tmp_path, tiny_model_dir, max_steps=2)
    fill_store(job.database)

    def killed(self: CheckpointLog, *args: object, **kwargs: object) -> None:
        raise RuntimeError("killed here")  # stands in for SIGKILL: the open transaction never commits

    monkeypatch.setattr(CheckpointLog, "add_hash", killed)
    with pytest.raises(RuntimeError, match="killed here"):
        run_session(job, threading.Event())
    with Store.open(job.database) as store:
        assert store.log.list() == []
