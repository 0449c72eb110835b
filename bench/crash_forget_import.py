"""Kills during `pocketd forget` and `pocketd checkpoint import` (part of bench/crash_kill.py).

One store of notes from two sources is trained for a few steps (the tiny model, the real
trainer) and its current checkpoint exported. Then, `kills` times each, on a fresh copy of
that store, `pocketd forget --source B` or `pocketd checkpoint import FILE` runs in a child
process and is SIGKILLed at a moment drawn uniformly over its measured life. After each kill:

- `PRAGMA integrity_check` is ok;
- forget is all or nothing: source B's documents are all there (and the log is unchanged)
  or all gone, and no step row names a document that no longer exists;
- import leaves nothing or a whole checkpoint: no checkpoint row was added, or the added
  ones hold every step of the file;
- the interrupted command, run again, completes (forget: B is gone; import: the file is
  stored), and every checkpoint that changed verifies (`pocketd checkpoint verify`), or
  says that its rebuilt hashes are pending (a forget killed between its log transaction and
  the replay that records the hashes; the next session records them).

The killed commands and the timing runs are child processes; the setup session, the export, the runs
again and the verifications are the same `pocketd` commands run in this process (click's test runner, the
private environment; the session through the trainer's `run_session`), which loads torch once instead
of once per command.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import DB_NAME, ROOT, note_text, private_env, sigkill

SOURCES = ("alpha", "beta")


def _count(db: Path, sql: str, args: tuple[Any, ...] = ()) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute(sql, args).fetchone()[0])


def _integrity(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        rows = [r[0] for r in c.execute("PRAGMA integrity_check")]
    return [] if rows == ["ok"] else [f"integrity_check: {rows[:3]}"]


def _log_digest(db: Path) -> tuple[Any, ...]:
    with sqlite3.connect(db) as c:
        return (tuple(c.execute("select id, status, n_steps from checkpoints order by id")),
                c.execute("select count(*), total(lr) from steps").fetchone())


def _orphan_steps(db: Path) -> int:
    return _count(db, "select count(*) from step_documents where document_id not in (select id from documents)")


def _copy_store(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, mode=0o700)
    with sqlite3.connect(src) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dst = dst_dir / DB_NAME
    shutil.copy2(src, dst)
    dst.chmod(0o600)
    return dst


class Rig:
    """A store with a trained, exported checkpoint, and the `pocketd` command lines to run on copies of it."""

    def __init__(self, work: Path, model_dir: Path, rng: random.Random, notes: int) -> None:
        from pocketd.ingest import IngestConfig, ingest_text
        from pocketd.store import Store
        from pocketd.trainer.config import TrainerConfig
        from pocketd.trainer.job import TrainingJob
        from pocketd.trainer.session import run_session

        self.work = work
        self.home = work / "home"
        self.home.mkdir(parents=True)
        self.env = private_env(self.home)
        self.cache = work / "cache"
        self.pristine = work / "pristine" / DB_NAME
        self.pristine.parent.mkdir(parents=True, mode=0o700)
        with Store.open(self.pristine) as store:
            for i in range(notes):
                ingest_text(store, note_text(rng, i, long=False), SOURCES[i % 2], IngestConfig())
        self.trainer = (f'model = "{model_dir}"\nbatch_size = 4\nmicro_batch_size = 4\nseq_len = 64\n'
                        "hash_every = 2\neval_examples = 8\nlr = 1e-3\neps = 1e-2\nthreads = 1\n")
        cfg = TrainerConfig(model=str(model_dir), batch_size=4, micro_batch_size=4, seq_len=64, hash_every=2,
                            eval_examples=8, lr=1e-3, eps=1e-2, threads=1)
        job = TrainingJob(database=self.pristine, cache_dir=self.cache, trainer=cfg, memory_budget_mb=8000,
                          max_steps=6, evaluate=False)
        # The trainer's session loop in this process (the kills below need torch here anyway).
        outcome = run_session(job, threading.Event())
        if outcome.steps != 6:
            raise RuntimeError(f"the setup session logged {outcome.steps} of 6 steps ({outcome.end_reason})")
        ck = _count(self.pristine, "select max(id) from checkpoints")
        self.export = work / "current.pkd"
        code, text = self.cli(self.pristine, "checkpoint", "export", str(ck), str(self.export))
        if code != 0:
            raise RuntimeError(f"checkpoint export failed: {text}")
        self.file_steps = _count(self.pristine, "select n_steps from checkpoints where id = ?", (ck,))

    def config(self, db: Path) -> Path:
        path = db.parent.parent / "config.toml"
        path.write_text(f'[trainer]\n{self.trainer}[paths]\ndata_dir = "{db.parent}"\ncache_dir = "{self.cache}"\n',
                        encoding="utf-8")
        path.chmod(0o600)
        return path

    def argv(self, db: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "pocketd.daemon", "--config", str(self.config(db)), *args]

    def run(self, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(db, *args), cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=600)

    def cli(self, db: Path, *args: str) -> tuple[int, str]:
        """`pocketd --config ... ARGS` in this process, in the private environment: (exit code, output)."""
        from click.testing import CliRunner

        from pocketd.daemon.cli import cli

        r = CliRunner().invoke(cli, ["--config", str(self.config(db)), *args], env=self.env)
        detail = "" if r.exception is None or isinstance(r.exception, SystemExit) else f"\n{r.exception!r}"
        return r.exit_code, r.output + detail


def _verify_all(rig: Rig, db: Path) -> list[str]:
    problems = []
    with sqlite3.connect(db) as c:
        ids = [r[0] for r in c.execute("select id from checkpoints where n_steps > 0 order by id")]
    for cid in ids:
        code, text = rig.cli(db, "checkpoint", "verify", str(cid))
        if code != 0 and "pending" not in text.lower():
            problems.append(f"checkpoint verify {cid}: exit {code}: {text.strip()[-300:]}")
    return problems


def forget_import_kills(kills: int, tmp: Path, rng: random.Random, model_dir: Path, notes: int,
                        tally_forget: Any, tally_import: Any) -> None:
    """`kills` kills of each command; results go to the two tallies (crash_kill.Tally)."""
    t0 = time.monotonic()
    rig = Rig(tmp / "forget-import", model_dir, rng, notes)
    # how long each command lives when not killed (on a copy): the kill moments are drawn over that
    life: dict[str, float] = {}
    for kind, args in (("forget", ("forget", "--source", SOURCES[1])), ("import", ("checkpoint", "import",
                                                                                  str(rig.export)))):
        db = _copy_store(rig.pristine, rig.work / f"timing-{kind}" / "data")
        t = time.monotonic()
        out = rig.run(db, *args)
        life[kind] = time.monotonic() - t
        if out.returncode != 0:
            raise RuntimeError(f"pocketd {' '.join(args)} failed unkilled: {out.stdout}{out.stderr}")
    for i in range(kills):
        for kind, tally in (("forget", tally_forget), ("import", tally_import)):
            t_kill = time.monotonic()
            db = _copy_store(rig.pristine, rig.work / f"{kind}-{i}" / "data")
            before_docs = _count(db, "select count(*) from documents d join sources s on s.id = d.source_id "
                                     "where s.name = ?", (SOURCES[1],))
            before_log = _log_digest(db)
            before_cks = _count(db, "select count(*) from checkpoints")
            args = ("forget", "--source", SOURCES[1]) if kind == "forget" else ("checkpoint", "import",
                                                                                str(rig.export))
            proc = subprocess.Popen(rig.argv(db, *args), cwd=ROOT, env=rig.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            at = rng.uniform(0.0, life[kind] * 1.1)
            try:
                proc.wait(timeout=at)
                where = "after exit"
            except subprocess.TimeoutExpired:
                where = "killed" if sigkill(proc) else "after exit"
            if proc.stderr is not None:
                proc.stderr.close()
            problems = _integrity(db)
            if kind == "forget":
                docs = _count(db, "select count(*) from documents d join sources s on s.id = d.source_id "
                                  "where s.name = ?", (SOURCES[1],))
                if docs not in (0, before_docs):
                    problems.append(f"half a forget: {docs} of {before_docs} documents of {SOURCES[1]} left")
                if docs == before_docs and _log_digest(db) != before_log:
                    problems.append("the documents are there but the log changed")
                if _orphan_steps(db):
                    problems.append(f"{_orphan_steps(db)} step rows name forgotten documents")
                code, text = rig.cli(db, "forget", "--source", SOURCES[1])
                if docs and code != 0:
                    problems.append(f"forget again: exit {code}: {text}")
                if _count(db, "select count(*) from documents d join sources s on s.id = d.source_id "
                              "where s.name = ?", (SOURCES[1],)) or _orphan_steps(db):
                    problems.append("after forgetting again, the source or steps naming it remain")
            else:
                added = _count(db, "select count(*) from checkpoints") - before_cks
                if added:
                    steps = _count(db, "select total(n_steps) from checkpoints where id > (select max(id) - ? "
                                       "from checkpoints)", (added,))
                    if steps != rig.file_steps:
                        problems.append(f"a partial import: {added} checkpoints with {steps} of "
                                        f"{rig.file_steps} steps")
                else:
                    code, text = rig.cli(db, "checkpoint", "import", str(rig.export))
                    if code != 0:
                        problems.append(f"import again: exit {code}: {text}")
            problems += _integrity(db) + _verify_all(rig, db)
            tally.record(where, problems, 0)
            tally.seconds += time.monotonic() - t_kill
    tally_forget.notes.append(f"forget lives {life['forget']:.1f} s unkilled, import {life['import']:.1f} s; "
                              f"setup {time.monotonic() - t0:.0f} s in all")
