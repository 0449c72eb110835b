"""Crash consistency: SIGKILL the trainer, `pocketd ingest` and `pocketd run` at random moments; nothing is lost.

    .venv/bin/python bench/crash_kill.py [--kills 100] [--model tiny|default|both] [--default-kills 3]
                                         [--ingest-kills 12] [--daemon-ingest-kills 6] [--daemon-train-kills 6]
                                         [--notes 3000] [--seed 0] [--keep] [--smoke]

Everything runs in a private temporary home; nothing of the user's is touched (the
default model's converted copy is read from, and cached in, the user's cache dir).

1. trainer: `python -m pocketd.trainer --job FILE` on a store of notes (the tiny test model;
   `--model default` or `both`: also the SmolLM2 GGUF for `--default-kills`), killed with
   SIGKILL `--kills` times at a moment drawn by one of: uniform over the whole life of the
   process (import, load, replay, steps, gate), right after step j + a fraction of a step
   (mid-step), the instant the database's WAL grows after step j (mid-commit), or inside a
   given phase (loading, replaying, evaluating). Sessions have small random step budgets,
   so some reach the evaluation gate and promote or reject their candidate. After every
   kill the next session is started on the same store: training carries on.
2. `pocketd ingest FOLDER` on a generated folder of `--notes` notes (.md, .txt, .jsonl,
   some duplicated, some long enough for several examples), killed mid-ingest, re-run
   until it completes.
3. `pocketd forget --source` and `pocketd checkpoint import` killed at random moments
   (bench/crash_forget_import.py: all or nothing, no step naming a forgotten document).
4. `pocketd run` (fake charger plugged, the folder as its inbox, the tiny model) killed
   mid-ingest of the inbox, then mid-training (alternately the daemon alone, leaving its
   trainer orphaned, and the daemon with its trainer); restarted each time.

After every kill: `PRAGMA integrity_check` is ok; no row that existed before the kill is
missing or changed (documents, examples, checkpoints, steps, hashes, history sessions;
a trained_count may only grow) - "rows lost"; every checkpoint whose steps or hashes
changed replays and matches every stored hash (`checkpoint verify`; unchanged ones were
verified before and are byte-identical); sum(trained_count) == batch size x step rows
(a step and its example marks commit together); every checkpoint has its step-0 hash and
every evaluated one its final hash; at most one checkpoint is current; every stored
document has exactly the examples its text splits into (no partial document) and no
text is stored twice. After the last kill every checkpoint is verified through the
`pocketd checkpoint verify` command, ingest is complete (every distinct note stored
once) and the daemon is asked for `status` and trains again.

A kill is "survived" when all of that holds and the restarted process carries on.

--smoke: one kill of each kind, 150 notes in the folder, 30 in the trainer's store.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import DB_NAME, ROOT, note_text, pid_alive, private_env, sigkill, tail
from pocketd.daemon.client import request
from pocketd.ingest.config import IngestConfig
from pocketd.ingest.normalize import normalize
from pocketd.ingest.split import split_examples
from pocketd.store import content_hash

benchlib.offline_defaults()


# -- generated notes ------------------------------------------------------------------------------


@dataclass
class Corpus:
    folder: Path
    expected: dict[str, list[str]]  # content hash -> the examples its text splits into
    entries: int  # notes written (files + JSONL records), duplicates included

    @property
    def distinct(self) -> int:
        return len(self.expected)


def make_corpus(folder: Path, n: int, rng: random.Random, config: IngestConfig) -> Corpus:
    """`n` notes: ~45% .md files, ~25% .txt files (in subfolders), ~30% JSONL records; ~2% are duplicates."""
    folder.mkdir(parents=True)
    texts: list[str] = []
    expected: dict[str, list[str]] = {}
    jsonl: list[list[str]] = [[] for _ in range(max(1, n // 100))]
    for i in range(n):
        if texts and rng.random() < 0.02:
            text = rng.choice(texts)  # the same text again, elsewhere: stored once
        else:
            text = note_text(rng, i, long=rng.random() < 0.12)
            texts.append(text)
        norm = normalize(text)
        expected[content_hash(norm)] = split_examples(norm, config.example_max_chars)
        r = rng.random()
        if r < 0.45:
            sub = folder / f"notes-{i % 10}"
            sub.mkdir(exist_ok=True)
            (sub / f"{i:05d}.md").write_text(f"{text}\n", encoding="utf-8")
        elif r < 0.70:
            sub = folder / "plain" / f"{i % 7}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:05d}.txt").write_text(text.replace("\n", "\r\n"), encoding="utf-8")
        else:
            jsonl[i % len(jsonl)].append(json.dumps({"text": text, "time": 1_600_000_000 + i * 3600}))
    for k, lines in enumerate(jsonl):
        if lines:
            (folder / f"export-{k:02d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    old = time.time() - 3600  # settled: the daemon's inbox skips files modified in the last seconds
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    return Corpus(folder, expected, n)


# -- database snapshots and checks ------------------------------------------------------------------------


def connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=60000")
    return conn


def integrity(db: Path) -> list[str]:
    conn = connect(db)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()
    return [] if rows == ["ok"] else rows


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()


@dataclass
class Snapshot:
    """Every row that must survive a kill (read in one transaction), plus a few sums."""

    documents: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (content hash, n examples)
    examples: dict[int, tuple[int, str]] = field(default_factory=dict)  # id -> (document id, digest)
    trained: dict[int, int] = field(default_factory=dict)  # example id -> trained_count
    checkpoints: dict[int, tuple[int, str, int | None]] = field(default_factory=dict)  # id -> (n_steps, status, parent)
    steps: dict[tuple[int, int], str] = field(default_factory=dict)
    hashes: dict[tuple[int, int], str] = field(default_factory=dict)
    sessions: set[int] = field(default_factory=set)
    doc_examples: dict[str, list[str]] = field(default_factory=dict)  # content hash -> example texts (ordered)
    val_loss: dict[int, float | None] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.steps)


def snapshot(db: Path, with_texts: bool = False) -> Snapshot:
    s = Snapshot()
    if not db.exists():
        return s
    conn = connect(db)
    try:
        conn.execute("BEGIN")
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
        if "documents" not in tables:
            return s
        hashes_by_doc = {}
        for i, h in conn.execute("select id, content_hash from documents"):
            hashes_by_doc[i] = h
        n_ex: Counter[int] = Counter()
        texts: dict[int, list[tuple[int, str]]] = {}
        for i, d, o, text, tc in conn.execute("select id, document_id, ordinal, text, trained_count from examples"):
            s.examples[i] = (d, _digest(o, text))
            s.trained[i] = tc
            n_ex[d] += 1
            if with_texts:
                texts.setdefault(d, []).append((o, text))
        s.documents = {i: (h, n_ex[i]) for i, h in hashes_by_doc.items()}
        if with_texts:
            s.doc_examples = {hashes_by_doc[d]: [t for _, t in sorted(v)] for d, v in texts.items()}
            for i, h in hashes_by_doc.items():
                s.doc_examples.setdefault(h, [])
        for i, n, st, parent, vl in conn.execute("select id, n_steps, status, parent_id, val_loss from checkpoints"):
            s.checkpoints[i] = (n or 0, st, parent)
            s.val_loss[i] = vl
        for c, st, seeds, grads, lr in conn.execute("select checkpoint_id, step, seeds, grads, lr from steps"):
            s.steps[(c, st)] = _digest(seeds, grads, lr)
        for c, st, sha in conn.execute("select checkpoint_id, step, sha256 from checkpoint_hashes"):
            s.hashes[(c, st)] = sha
        if "sessions" in tables:
            s.sessions = {r[0] for r in conn.execute("select id from sessions")}
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return s


def rows_lost(before: Snapshot, after: Snapshot) -> tuple[int, list[str]]:
    """Rows present before the kill that are missing or changed after it."""
    lost = 0
    notes: list[str] = []

    def gone(kind: str, old: dict[Any, Any], new: dict[Any, Any]) -> None:
        nonlocal lost
        bad = [k for k, v in old.items() if new.get(k) != v]
        if bad:
            lost += len(bad)
            notes.append(f"{len(bad)} {kind} rows lost or changed, e.g. {bad[:3]}")

    gone("document", before.documents, after.documents)
    gone("example", before.examples, after.examples)
    gone("step", before.steps, after.steps)
    gone("hash", before.hashes, after.hashes)
    shrunk = [i for i, t in before.trained.items() if after.trained.get(i, -1) < t]
    if shrunk:
        lost += len(shrunk)
        notes.append(f"{len(shrunk)} examples' trained_count went down")
    ck_lost = [i for i, (n, _, _) in before.checkpoints.items()
               if i not in after.checkpoints or after.checkpoints[i][0] < n]
    if ck_lost:
        lost += len(ck_lost)
        notes.append(f"checkpoints lost or shortened: {ck_lost[:5]}")
    if before.sessions - after.sessions:
        lost += len(before.sessions - after.sessions)
        notes.append(f"history sessions lost: {sorted(before.sessions - after.sessions)[:5]}")
    return lost, notes


def log_invariants(s: Snapshot, batch_size: int | None) -> list[str]:
    out = []
    if batch_size is not None and sum(s.trained.values()) != batch_size * s.total_steps:
        out.append(f"sum(trained_count) {sum(s.trained.values())} != {batch_size} x {s.total_steps} step rows: "
                   "a step and its example marks did not commit together")
    for cid, (n, status, _) in s.checkpoints.items():
        if (cid, 0) not in s.hashes:
            out.append(f"checkpoint {cid} ({status}) has no step-0 hash")
        if status in ("current", "rejected", "superseded") and (cid, n) not in s.hashes:
            out.append(f"checkpoint {cid} ({status}) has no hash after its {n} steps")
        rows = sorted(st for (c, st) in s.steps if c == cid)
        if rows != list(range(n)):
            out.append(f"checkpoint {cid}: step rows are not 0..{n - 1}")
    if sum(1 for (_, st, _) in s.checkpoints.values() if st == "current") > 1:
        out.append("more than one current checkpoint")
    return out


def document_invariants(s: Snapshot, corpus: Corpus) -> list[str]:
    out = []
    empty = [h for h, n in s.documents.values() if n == 0]
    if empty:
        out.append(f"{len(empty)} documents without examples (partial documents)")
    hashes = [h for h, _ in s.documents.values()]
    if len(hashes) != len(set(hashes)):
        out.append(f"{len(hashes) - len(set(hashes))} duplicate documents")
    for h, texts in s.doc_examples.items():
        want = corpus.expected.get(h)
        if want is None:
            out.append(f"document {h[:12]} is not one of the notes")
        elif texts != want:
            out.append(f"document {h[:12]} has {len(texts)} examples, its text splits into {len(want)}")
    return out[:10]


# -- results ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    kind: str
    tried: int = 0
    survived: int = 0
    rows_lost: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    at: Counter[str] = field(default_factory=Counter)  # where the kills landed
    notes: list[str] = field(default_factory=list)

    def record(self, where: str, problems: list[str], lost: int) -> None:
        self.tried += 1
        self.at[where] += 1
        self.rows_lost += lost
        if problems or lost:
            self.problems += [f"kill {self.tried} ({where}): {p}" for p in problems]
        else:
            self.survived += 1


class Verifier:
    """`pocketd checkpoint verify ID` (in this process through click: torch is loaded once), which replays a
    checkpoint (or loads its tensors) and compares every stored hash; remembers what it verified."""

    def __init__(self, model: str, batch_size: int, seq_len: int, cache_dir: Path, work: Path) -> None:
        self.trainer = f'model = "{model}"\nbatch_size = {batch_size}\nseq_len = {seq_len}\n'
        self.cache_dir = cache_dir
        self.work = work
        self.seen: dict[int, tuple[int, int]] = {}  # checkpoint -> (n_steps, hashes) when last verified
        self.verified = 0

    def changed(self, s: Snapshot) -> list[int]:
        out = []
        for cid, (n, _, _) in s.checkpoints.items():
            state = (n, sum(1 for (c, _) in s.hashes if c == cid))
            if self.seen.get(cid) != state:
                out.append(cid)
        return out

    def config(self, db: Path) -> Path:
        """A config file whose store is `db` (data_dir/pocketd.sqlite3)."""
        assert db.name == DB_NAME, db
        path = self.work / "verify-config.toml"
        path.write_text(f'[trainer]\n{self.trainer}[paths]\ndata_dir = "{db.parent}"\ncache_dir = "{self.cache_dir}"\n',
                        encoding="utf-8")
        return path

    def verify(self, db: Path, s: Snapshot, ids: list[int] | None = None) -> list[str]:
        from click.testing import CliRunner

        from pocketd.daemon.cli import cli

        problems = []
        config = self.config(db)
        for cid in self.changed(s) if ids is None else ids:
            r = CliRunner().invoke(cli, ["--config", str(config), "checkpoint", "verify", str(cid)])
            # A session killed after its last hashed step leaves steps that replay against every stored
            # hash but whose final weights no hash records: "unverified (no hashes)", not a mismatch.
            replayed_clean = "replay without error" in r.output
            if (r.exit_code != 0 and not replayed_clean) or (
                    "every stored hash matches" not in r.output and not replayed_clean):
                detail = r.output.strip()[-300:] or repr(r.exception)
                problems.append(f"pocketd checkpoint verify {cid}: exit {r.exit_code}: {detail}")
                continue
            self.verified += 1
            n, _, _ = s.checkpoints[cid]
            self.seen[cid] = (n, sum(1 for (c, _) in s.hashes if c == cid))
        return problems


# -- 1. the trainer -------------------------------------------------------------------------------------------


MODES = ("uniform", "mid-step", "mid-commit", "phase")
MODE_WEIGHTS = (0.25, 0.30, 0.30, 0.15)


@dataclass
class TrainerSetup:
    label: str
    model: str
    cache_dir: Path
    batch_size: int
    seq_len: int
    hash_every: int
    steps: tuple[int, int]  # random step budget per session
    threads: int | None
    eval_examples: int = 8


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _wal_mark(wal: Path) -> tuple[int, int]:
    try:
        st = wal.stat()
    except OSError:
        return (0, 0)
    return (st.st_size, st.st_mtime_ns)


def trainer_kills(setup: TrainerSetup, kills: int, tmp: Path, rng: random.Random, notes: int) -> Tally:
    from pocketd.ingest.pipeline import ingest_text
    from pocketd.store import Store
    from pocketd.trainer.config import TrainerConfig
    from pocketd.trainer.job import TrainingJob

    tally = Tally(f"trainer ({setup.label})")
    t_start = time.monotonic()
    work = tmp / f"trainer-{setup.label}"
    (work / "data").mkdir(parents=True, mode=0o700)
    db = work / "data" / DB_NAME
    wal = db.with_name(db.name + "-wal")
    with Store.open(db) as store:
        for i in range(notes):
            ingest_text(store, note_text(rng, i, long=rng.random() < 0.1), "notes", IngestConfig())
    tcfg = TrainerConfig(model=setup.model, batch_size=setup.batch_size, micro_batch_size=setup.batch_size,
                         seq_len=setup.seq_len, hash_every=setup.hash_every, eval_examples=setup.eval_examples,
                         lr=1e-3, eps=1e-2, threads=setup.threads)
    verifier = Verifier(setup.model, setup.batch_size, setup.seq_len, setup.cache_dir, work)
    env = private_env(work / "home")
    (work / "home").mkdir()
    status_path = work / "status.json"
    stderr_path = work / "trainer.stderr"
    base = snapshot(db)
    est = {"startup": 5.0, "s_per_step": 0.05, "gate": 0.5}
    sessions = completed = 0
    while tally.tried < kills:
        max_steps = rng.randint(*setup.steps)
        job = TrainingJob(database=db, cache_dir=setup.cache_dir, trainer=tcfg, memory_budget_mb=8000,
                          max_steps=max_steps, status_file=status_path)
        job_path = work / "job.json"
        job.write(job_path)
        status_path.unlink(missing_ok=True)
        mode = rng.choices(MODES, MODE_WEIGHTS)[0]
        target_step = rng.randint(1, max(1, max_steps - 1))
        phase = rng.choice(["loading", "replaying", "evaluating"])
        life = est["startup"] + max_steps * est["s_per_step"] + est["gate"]
        kill_at = rng.uniform(0.0, life * 1.1)
        with open(stderr_path, "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "pocketd.trainer", "--job", str(job_path)], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        sessions += 1
        last: dict[str, Any] | None = None
        where = None
        t_training = None
        while proc.poll() is None:
            st = _read_json(status_path)
            if st is not None:
                last = st
                if st.get("phase") == "training" and t_training is None:
                    t_training = time.monotonic()
            now = time.monotonic()
            ph = last.get("phase") if last else None
            if mode == "uniform" and now - t0 >= kill_at:
                where = ph or "startup"
            elif mode in ("mid-step", "mid-commit") and ph == "training" and last["step"] >= target_step:
                if mode == "mid-step":
                    time.sleep(rng.uniform(0.0, est["s_per_step"]))
                    where = "mid-step"
                else:
                    mark = _wal_mark(wal)
                    deadline = time.monotonic() + max(3.0, 20 * est["s_per_step"])
                    while time.monotonic() < deadline and proc.poll() is None:
                        if _wal_mark(wal) != mark:  # frames are being written: a transaction is committing
                            break
                    where = "mid-commit (WAL growing)" if time.monotonic() < deadline else "mid-step"
            elif mode in ("mid-step", "mid-commit") and ph in ("evaluating", "done"):
                where = ph  # the budget ran out before the target step: kill here instead
            elif mode == "phase" and ph == phase:
                time.sleep(rng.uniform(0.0, 2.0 if phase == "loading" else 0.05))
                where = phase
            if where is not None:
                break
            time.sleep(0.002)
        if where is not None and sigkill(proc):
            pass
        else:
            proc.wait()
            where = None
        # learn the timings for the uniform mode
        if last and last.get("s_per_step"):
            est["s_per_step"] = 0.7 * est["s_per_step"] + 0.3 * float(last["s_per_step"])
        if t_training is not None:
            est["startup"] = 0.7 * est["startup"] + 0.3 * (t_training - t0)
        problems: list[str] = []
        if where is None:  # it finished before the kill: it must have exited cleanly
            completed += 1
            if proc.returncode != 0:
                problems.append(f"session exited {proc.returncode}: {tail(stderr_path)}")
        after = snapshot(db)
        problems += integrity(db)
        lost, lost_notes = rows_lost(base, after)
        problems += lost_notes
        problems += log_invariants(after, setup.batch_size)
        problems += verifier.verify(db, after)
        if where is not None:
            tally.record(where, problems, lost)
        elif problems or lost:
            tally.problems += [f"session {sessions} (not killed): {p}" for p in problems]
            tally.rows_lost += lost
        base = after
        if tally.tried and tally.tried % 10 == 0 and where is not None:
            print(f"  {tally.kind}: {tally.tried}/{kills} kills, {after.total_steps} steps logged, "
                  f"{len(after.checkpoints)} checkpoints, {time.monotonic() - t_start:.0f} s", flush=True)
    # carries on: one more session runs to its end
    job = TrainingJob(database=db, cache_dir=setup.cache_dir, trainer=tcfg, memory_budget_mb=8000,
                      max_steps=3, status_file=status_path)
    job.write(work / "job.json")
    with open(stderr_path, "wb") as err:
        code = subprocess.call([sys.executable, "-m", "pocketd.trainer", "--job", str(work / "job.json")], cwd=ROOT,
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    final = snapshot(db)
    if code != 0 or final.total_steps != base.total_steps + 3:
        tally.problems.append(f"the session after the last kill: exit {code}, "
                              f"{final.total_steps - base.total_steps} new steps: {tail(stderr_path)}")
    # every checkpoint once more at the end
    checked = verifier.verified
    tally.problems += verifier.verify(db, final, ids=list(final.checkpoints))
    tally.problems += integrity(db) + log_invariants(final, setup.batch_size)
    resumed = sessions + 1 - len(final.checkpoints)
    statuses = Counter(st for (_, st, _) in final.checkpoints.values())
    tally.notes.append(f"{sessions} sessions killed or ended ({completed} reached their step budget before the "
                       f"kill), then 1 run to its end; {final.total_steps} steps "
                       f"logged in {len(final.checkpoints)} checkpoints ({', '.join(f'{v} {k}' for k, v in sorted(statuses.items()))}); "
                       f"{resumed} sessions resumed a killed session's candidate; "
                       f"{checked} checkpoint replays verified (`pocketd checkpoint verify`) after kills + "
                       f"{len(final.checkpoints)} at the end")
    tally.seconds = time.monotonic() - t_start
    return tally


# -- 2. `pocketd ingest` ----------------------------------------------------------------------------------------


def ingest_kills(corpus: Corpus, kills: int, tmp: Path, rng: random.Random) -> Tally:
    tally = Tally("pocketd ingest FOLDER")
    t_start = time.monotonic()
    work = tmp / "ingest"
    home = work / "home"
    home.mkdir(parents=True)
    unkilled = 0
    r = -1
    while tally.tried < kills and r < 3 * kills:  # rounds of up to 6 kills, each on a fresh database
        r += 1
        n_kills = min(6, kills - tally.tried)
        data = work / f"data-{r}"
        cfg = work / f"config-{r}.toml"
        cfg.write_text(f'[paths]\ndata_dir = "{data}"\n', encoding="utf-8")
        env = private_env(home, config=cfg)
        db = data / DB_NAME
        base = snapshot(db, with_texts=True)
        done = 0
        runs = 0
        while done < n_kills:
            runs += 1
            log_path = work / "ingest.out"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "ingest", str(corpus.folder)], cwd=ROOT,
                                        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            # kill when a random share of what is left has been stored (or at a random time before that)
            left = corpus.distinct - len(base.documents)
            target = len(base.documents) + max(1, int(left * rng.uniform(0.02, 0.6)))
            where = None
            while proc.poll() is None:
                n = _count(db, "documents")
                if n >= target:
                    where = f"{100 * n // corpus.distinct}% stored"
                    break
                time.sleep(rng.uniform(0.001, 0.05))
            killed = where is not None and sigkill(proc)
            if not killed:
                proc.wait()
                unkilled += 1
            after = snapshot(db, with_texts=True)
            problems = integrity(db) + document_invariants(after, corpus)
            lost, notes = rows_lost(base, after)
            problems += notes
            if killed:
                tally.record(where, problems, lost)
                done += 1
            else:
                if proc.returncode != 0:
                    problems.append(f"ingest exited {proc.returncode}: {tail(log_path)}")
                tally.problems += [f"round {r + 1} run {runs} (not killed): {p}" for p in problems]
                break
            base = after
        # re-running completes the rest, with no duplicates
        with open(work / "ingest.out", "wb") as out:
            code = subprocess.call([sys.executable, "-m", "pocketd.daemon", "ingest", str(corpus.folder)], cwd=ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        final = snapshot(db, with_texts=True)
        problems = integrity(db) + document_invariants(final, corpus)
        lost, notes = rows_lost(base, final)
        problems += notes
        if code != 0:
            problems.append(f"the final ingest exited {code}: {tail(work / 'ingest.out')}")
        if len(final.documents) != corpus.distinct:
            problems.append(f"{len(final.documents)} documents stored, {corpus.distinct} distinct notes")
        tally.rows_lost += lost
        tally.problems += [f"round {r + 1} final ingest: {p}" for p in problems]
        tally.notes.append(f"round {r + 1}: {done} kills, then a complete run: {len(final.documents)} documents, "
                           f"{len(final.examples)} examples for {corpus.distinct} distinct notes")
    if unkilled:
        tally.notes.append(f"{unkilled} run(s) finished before their kill moment (not counted; a fresh round followed)")
    tally.seconds = time.monotonic() - t_start
    return tally


def _count(db: Path, table: str) -> int:
    if not db.exists():
        return 0
    try:
        conn = connect(db)
        try:
            return conn.execute(f"select count(*) from {table}").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


# -- 3. `pocketd run` ---------------------------------------------------------------------------------------------


class DaemonRig(benchlib.Daemon):
    """A private `pocketd run`: fake charger plugged, the corpus folder as its inbox, the tiny model."""

    def __init__(self, work: Path, corpus: Corpus, model_dir: Path, batch_size: int,
                 max_session_minutes: float = 0.1) -> None:
        self.work = work
        self.home = work / "home"
        self.home.mkdir(parents=True)
        (self.home / "run").mkdir(mode=0o700)
        self.db = work / "data" / DB_NAME
        self.runtime = work / "run"
        power = work / "power.json"
        benchlib.set_power(power, True)
        self.config = work / "config.toml"
        self.config.write_text(
            f'[daemon]\ninbox = "{corpus.folder}"\ninbox_poll_s = 1\npower_probe = "fake"\n'
            f'fake_power_file = "{power}"\nstop_grace_s = 30\nnice = 0\n'
            f'[policy]\nmax_load = 1000\nmin_available_mb = 0\ncheck_interval_s = 1\ncooldown_minutes = 0\n'
            f'min_battery_percent = 0\nmin_new_examples = 0\nmax_session_minutes = {max_session_minutes}\n'
            f'[trainer]\nmodel = "{model_dir}"\nbatch_size = {batch_size}\nmicro_batch_size = {batch_size}\n'
            f'seq_len = 64\nhash_every = 2\neval_examples = 8\nthreads = 1\nlr = 1e-3\n'
            f'[paths]\ndata_dir = "{self.db.parent}"\ncache_dir = "{work / "cache"}"\n'
            f'state_dir = "{work / "state"}"\nruntime_dir = "{self.runtime}"\n', encoding="utf-8")
        super().__init__(private_env(self.home, config=self.config), work / "daemon.log",
                         sock=self.runtime / "pocketd.sock")


def daemon_kills(corpus: Corpus, ingest_n: int, train_n: int, tmp: Path, rng: random.Random, model_dir: Path,
                 ingest_tally: Tally, train_tally: Tally, max_session_minutes: float = 0.1) -> None:
    t_start = time.monotonic()
    batch = 4
    rig = DaemonRig(tmp / "daemon", corpus, model_dir, batch, max_session_minutes)
    verifier = Verifier(str(model_dir), batch, 64, rig.work / "cache", rig.work)
    base = snapshot(rig.db, with_texts=True)
    orphans: list[int] = []
    try:
        # mid-ingest of the inbox
        for _ in range(ingest_n):
            rig.start()
            left = corpus.distinct - len(base.documents)
            if left <= 0:
                ingest_tally.notes.append("the inbox was fully ingested before all daemon kills were tried")
                rig.stop()
                break
            target = len(base.documents) + max(1, int(left * rng.uniform(0.05, 0.5)))
            where = None
            t0 = time.monotonic()
            while rig.proc.poll() is None and time.monotonic() - t0 < 600:
                n = _count(rig.db, "documents")
                if n >= target:
                    where = f"daemon inbox, {100 * n // corpus.distinct}% stored"
                    break
                time.sleep(rng.uniform(0.001, 0.05))
            if where is None or not sigkill(rig.proc):
                ingest_tally.problems.append(f"daemon exited before the kill: {tail(rig.work / 'daemon.log')}")
                continue
            orphans += _trainer_pids(rig)
            after = snapshot(rig.db, with_texts=True)
            problems = integrity(rig.db) + document_invariants(after, corpus)
            lost, notes = rows_lost(base, after)
            ingest_tally.record(where, problems + notes, lost)
            base = after
        # restart: it finishes the inbox with no duplicates and trains
        rig.start()
        rig.ready()
        rig.wait(lambda: _count(rig.db, "documents") >= corpus.distinct, 600, "the inbox to be ingested")
        time.sleep(1.5)  # a last poll
        after = snapshot(rig.db, with_texts=True)
        problems = integrity(rig.db) + document_invariants(after, corpus)
        if len(after.documents) != corpus.distinct:
            problems.append(f"{len(after.documents)} documents, {corpus.distinct} distinct notes in the inbox")
        ingest_tally.problems += [f"after the restart: {p}" for p in problems]
        ingest_tally.notes.append(f"after the restart the daemon completed the inbox: {len(after.documents)} "
                                  f"documents for {corpus.distinct} distinct notes")
        ingest_tally.seconds = time.monotonic() - t_start
        t_train = time.monotonic()
        base = after
        # mid-training
        last_session = 0
        for k in range(train_n):
            step = rng.randint(1, 30)
            st = rig.wait(lambda: benchlib.training_past(rig.status(), last_session, step), 600,
                          f"a new session to reach step {step}")
            trainer_pid = st["training"]["pid"]
            session_id = st["training"]["session_id"]
            with_trainer = k % 2 == 1
            time.sleep(rng.uniform(0.0, 0.05))
            if not sigkill(rig.proc):
                train_tally.problems.append("the daemon exited before the kill")
                continue
            if with_trainer:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(trainer_pid, signal.SIGKILL)
            where = "daemon + trainer, mid-training" if with_trainer else "daemon alone, trainer orphaned"
            after = snapshot(rig.db)
            problems = integrity(rig.db)
            lost, notes = rows_lost(base, after)
            problems += notes + log_invariants(after, batch) + verifier.verify(rig.db, after)
            # the restart: the orphan (if any) is stopped, the session closed, training resumes
            rig.start()
            try:
                rig.ready()
                st = rig.wait(lambda: benchlib.training_past(rig.status(), session_id, 1), 600, "training to resume")
                last_session = st["training"]["session_id"]
                if pid_alive(trainer_pid):
                    problems.append(f"the previous trainer (pid {trainer_pid}) is still running after the restart")
                hist = request(rig.sock, "history")
                old = [s for s in hist["sessions"] if s["id"] == session_id]
                if not old or not old[0]["ended_at"]:
                    problems.append(f"session {session_id} was not closed after the restart")
            except RuntimeError as e:
                problems.append(str(e))
                last_session = session_id
            after2 = snapshot(rig.db)
            lost2, notes2 = rows_lost(after, after2)
            problems += notes2 + integrity(rig.db)
            train_tally.record(where, problems, lost + lost2)
            base = after2
        # a clean stop at the end; everything still verifies
        code = rig.stop()
        final = snapshot(rig.db)
        if code != 0:
            train_tally.problems.append(f"the daemon's SIGTERM exit status was {code}")
        lost, notes = rows_lost(base, final)
        train_tally.rows_lost += lost
        train_tally.problems += notes + integrity(rig.db) + log_invariants(final, batch)
        train_tally.problems += verifier.verify(rig.db, final, ids=list(final.checkpoints))
        n_sessions = len(final.sessions)
        train_tally.notes.append(f"{rig.starts} daemon starts, {n_sessions} training sessions, {final.total_steps} "
                                 f"steps in {len(final.checkpoints)} checkpoints, all verified at the end")
        train_tally.seconds = time.monotonic() - t_train
    finally:
        if rig.proc is not None and rig.proc.poll() is None:
            sigkill(rig.proc)
        for pid in orphans + _trainer_pids(rig):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _trainer_pids(rig: DaemonRig) -> list[int]:
    out = []
    for p in (rig.work / "state" / "jobs").glob("session-*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(p.read_text().strip())
            if pid_alive(pid):
                out.append(pid)
    return out


# -- main ------------------------------------------------------------------------------------------------------


def print_table(tallies: list[Tally], total_s: float, args: argparse.Namespace) -> None:
    print()
    print(f"crash_kill: seed {args.seed}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'kind':<34}{'tried':>7}{'survived':>10}{'rows lost':>11}{'problems':>10}{'time':>9}")
    for t in tallies:
        print(f"{t.kind:<34}{t.tried:>7}{t.survived:>10}{t.rows_lost:>11}{len(t.problems):>10}{t.seconds:>8.0f}s")
    tried = sum(t.tried for t in tallies)
    print(f"{'total':<34}{tried:>7}{sum(t.survived for t in tallies):>10}{sum(t.rows_lost for t in tallies):>11}"
          f"{sum(len(t.problems) for t in tallies):>10}{total_s:>8.0f}s")
    print()
    for t in tallies:
        if t.at:
            print(f"{t.kind}: kills landed " + ", ".join(f"{k}: {v}" for k, v in sorted(t.at.items(), key=_at_key)))
        for n in t.notes:
            print(f"{t.kind}: {n}")
    problems = [(t.kind, p) for t in tallies for p in t.problems]
    if problems:
        print()
        print("PROBLEMS:")
        for kind, p in problems[:40]:
            print(f"  {kind}: {p}")


def _at_key(item: tuple[str, int]) -> tuple[int, str]:
    order = ["startup", "loading", "replaying", "training", "mid-step", "mid-commit (WAL growing)", "evaluating",
             "done"]
    return (order.index(item[0]) if item[0] in order else len(order), item[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100, help="trainer kills with the tiny model (default 100)")
    parser.add_argument("--model", choices=["tiny", "default", "both"], default="tiny",
                        help="trainer kills on the tiny model (--kills), the default model (--default-kills) or both")
    parser.add_argument("--default-kills", type=int, default=3, help="trainer kills with the default model")
    parser.add_argument("--ingest-kills", type=int, default=12, help="kills of `pocketd ingest FOLDER`")
    parser.add_argument("--daemon-ingest-kills", type=int, default=6, help="kills of `pocketd run` mid-inbox")
    parser.add_argument("--daemon-train-kills", type=int, default=6, help="kills of `pocketd run` mid-training")
    parser.add_argument("--forget-import-kills", type=int, default=6,
                        help="kills of `pocketd forget` and of `pocketd checkpoint import` (each)")
    parser.add_argument("--notes", type=int, default=3000, help="notes in the generated folder")
    parser.add_argument("--trainer-notes", type=int, default=400, help="notes in the trainer's store")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.kills, args.ingest_kills, args.daemon_ingest_kills, args.daemon_train_kills = "tiny", 1, 1, 1, 1
        args.forget_import_kills = 1
        args.notes, args.trainer_notes = 150, 30
    rng = random.Random(args.seed)
    t_all = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pocketd-crash-"))
    tallies: list[Tally] = []
    try:
        model_dir = benchlib.tiny_model(tmp / "tiny-model")
        if args.model in ("tiny", "both") and args.kills > 0:
            setup = TrainerSetup("tiny", str(model_dir), tmp / "cache", batch_size=4, seq_len=64, hash_every=2,
                                 steps=(4, 60), threads=1)
            print(f"trainer (tiny): {args.kills} kills ...", flush=True)
            tallies.append(trainer_kills(setup, args.kills, tmp, rng, args.trainer_notes))
        if args.model in ("default", "both") and args.default_kills > 0:
            import platformdirs

            setup = TrainerSetup("default model", "default", Path(platformdirs.user_cache_dir("pocketd")),
                                 batch_size=2, seq_len=64, hash_every=1, steps=(3, 8), threads=None)
            print(f"trainer (default model): {args.default_kills} kills ...", flush=True)
            tallies.append(trainer_kills(setup, args.default_kills, tmp, rng, min(args.trainer_notes, 120)))
        if args.forget_import_kills > 0:
            from crash_forget_import import forget_import_kills

            print(f"pocketd forget / checkpoint import: {args.forget_import_kills} kills each ...", flush=True)
            t_fg, t_im = Tally("pocketd forget"), Tally("pocketd checkpoint import")
            tallies += [t_fg, t_im]
            try:
                forget_import_kills(args.forget_import_kills, tmp, rng, model_dir, min(args.trainer_notes, 60),
                                    t_fg, t_im)
            except RuntimeError as e:
                t_fg.problems.append(f"gave up: {e}")
        if args.ingest_kills <= 0 and args.daemon_ingest_kills <= 0 and args.daemon_train_kills <= 0:
            return 0 if not any(t.problems or t.rows_lost or t.survived != t.tried for t in tallies) else 1
        corpus = make_corpus(tmp / "notes", args.notes, rng, IngestConfig())
        print(f"generated {corpus.entries} notes ({corpus.distinct} distinct) in {corpus.folder}", flush=True)
        if args.ingest_kills > 0:
            print(f"pocketd ingest: {args.ingest_kills} kills ...", flush=True)
            tallies.append(ingest_kills(corpus, args.ingest_kills, tmp, rng))
        if args.daemon_ingest_kills > 0 or args.daemon_train_kills > 0:
            print(f"pocketd run: {args.daemon_ingest_kills} kills mid-ingest, {args.daemon_train_kills} "
                  "mid-training ...", flush=True)
            t_ing, t_tr = Tally("pocketd run, mid-ingest (inbox)"), Tally("pocketd run, mid-training")
            tallies += [t_ing, t_tr]
            try:
                # smoke: sessions long enough for a trainer start on a busy machine (~10 s) plus steps
                daemon_kills(corpus, args.daemon_ingest_kills, args.daemon_train_kills, tmp, rng, model_dir,
                             t_ing, t_tr, 0.5 if args.smoke else 0.1)
            except RuntimeError as e:  # a timeout: the daemon did not carry on
                t_tr.problems.append(f"gave up: {e}")
    finally:
        print_table(tallies, time.monotonic() - t_all, args)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = any(t.problems or t.rows_lost or t.survived != t.tried for t in tallies)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
