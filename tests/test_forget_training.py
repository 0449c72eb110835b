"""Forgetting while a session trains, on the tiny model with the real session loop (issue 13 items 1 and 2).

In process: the session's status callback (called after every committed step) runs the forget use
case on its own connection, as `pocketd forget` beside a running daemon would. As a real daemon: the
socket's `forget` stops the session first; the CLI's forget beside the daemon's trainer child relies
on the store's commit-time guard alone. Afterwards no step row names a forgotten document, the
session ended cleanly (no traceback, no back-off), and training goes on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from pocketd.daemon.forgetting import SessionEffect, forget
from pocketd.daemon.settings import PathsConfig, PocketdConfig
from pocketd.store import Status, Store
from pocketd.trainer.session import EndReason, run_session

from tests.trainer_helpers import NOTES, make_job


def fill_sources(path: Path) -> None:
    """One source per note (src0 ... src11), so a source is one document."""
    with Store.open(path) as store:
        for i, text in enumerate(NOTES):
            store.docs.add_document(text, [text], source=f"src{i}", source_kind="test", validation_percent=25)


def refs_to_forgotten(store: Store) -> int:
    """Step rows (seed-log steps and saved side steps) that name a document the store no longer holds."""
    return int(store.db.execute(REFS_TO_FORGOTTEN).fetchone()[0])


def query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the database beside an in-process daemon. Not through Store.open: opening and closing the file
    in the daemon's process (touch_private) would drop its SQLite locks (POSIX locks are per process)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


REFS_TO_FORGOTTEN = ("select count(*) from step_documents sd left join documents d on d.id = sd.document_id "
                     "where d.id is null")


def held_documents(store: Store, checkpoint_id: int) -> set[int]:
    return store.log.documents_of(checkpoint_id)


def config_for(tmp: Path) -> PocketdConfig:
    return PocketdConfig(paths=PathsConfig(data_dir=tmp / "data", cache_dir=tmp / "cache", state_dir=tmp / "state"))


CASES = {
    # The candidate already holds the source: forget drops it; the session's next commit is refused.
    "mezo-held": dict(method="mezo", held=True),
    # The trainer loaded the source's examples but has not used them yet: the step that does is refused.
    "mezo-not-held": dict(method="mezo", held=False),
    # Side: the steps are pending (saved every side_save_every_s); the save that would name the source is refused.
    "side-pending": dict(method="side", held=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forget_during_a_session_keeps_nothing_of_the_forgotten_text(case, tmp_path, tiny_model_dir):
    spec = CASES[case]
    extra: dict[str, Any] = {"method": spec["method"]}
    if spec["method"] == "side":
        extra.update(side_part="mlp", side_save_every_s=3600)
    job = make_job(tmp_path, tiny_model_dir, max_steps=40, evaluate=False, **extra)
    job = job.model_copy(update={"database": tmp_path / "data" / "pocketd.sqlite3"})
    fill_sources(job.database)
    config = config_for(tmp_path)
    seen: dict[str, Any] = {}

    def on_status(s: Any) -> None:
        if s.phase != "training" or s.step < (2 if spec["method"] == "mezo" else 3) or "report" in seen:
            return
        with Store.open(job.database) as other:  # as `pocketd forget` would, on its own connection
            train_docs = {d.id for d in other.docs.list(limit=100) if d.split == "train"}
            held = held_documents(other, s.checkpoint_id)
            if spec["method"] == "side":  # nothing saved yet; 3 batches of 4 have used all 9 train examples
                held = train_docs
            pick = sorted(held if spec["held"] else train_docs - held)
            assert pick, f"no document to forget in case {case}"
            doc = other.docs.find(pick[0])
            seen["doc"], seen["candidate"] = doc.id, s.checkpoint_id
            seen["others"] = held - {doc.id}
            seen["report"] = forget(other, config, sources=[doc.source])

    outcome = run_session(job, threading.Event(), on_status)
    assert "report" in seen, "the session never reached step 2"
    assert outcome.end_reason is EndReason.FORGOTTEN and outcome.exit_code == 0, outcome
    report = seen["report"]
    with Store.open(job.database) as store:
        assert refs_to_forgotten(store) == 0
        assert store.log.checkpoints_with_documents([seen["doc"]]) == {}
        cand = store.log.get(seen["candidate"])
        if spec["held"] and spec["method"] == "mezo":
            # Issue 13 item 2: the candidate is dropped, the other documents of its steps are trained again.
            assert seen["candidate"] in report.dropped_checkpoints and cand.status is Status.FORGOTTEN
            counts = store.docs.trained_counts()
            assert seen["others"] and all(
                counts.get(e.id, 0) == 0 for d in seen["others"] for e in store.docs.examples(document_id=d))
        else:
            assert cand.status is Status.CANDIDATE  # clean: resumable
            assert seen["doc"] not in store.log.documents_of(cand.id)
    # Training goes on: the next session (resuming a clean candidate or starting afresh) commits steps.
    again = run_session(job.model_copy(update={"max_steps": 3}), threading.Event())
    assert again.end_reason is EndReason.STEPS and again.steps == 3
    with Store.open(job.database) as store:
        assert refs_to_forgotten(store) == 0


def test_a_chain_rebuilt_without_hashes_gets_its_hash_from_the_next_session(tmp_path, tiny_model_dir, monkeypatch):
    """The socket's forget cannot replay (no torch in the daemon): the next session records the end hash, and
    `checkpoint verify` says "NOT verified" (never "ok") until then."""
    from click.testing import CliRunner

    from pocketd.daemon.cli import cli

    job = make_job(tmp_path, tiny_model_dir, max_steps=6, hash_every=2)
    job = job.model_copy(update={"database": tmp_path / "data" / "pocketd.sqlite3"})
    fill_sources(job.database)
    first = run_session(job, threading.Event())
    with Store.open(job.database) as store:
        store.log.set_status(first.checkpoint_id, Status.CURRENT)  # whatever the gate said
        doc = next(iter(store.log.documents_of(first.checkpoint_id)))
        report = forget(store, config_for(tmp_path), documents=[str(doc)])  # no recorder: as the socket does
        assert report.rebuilt and report.hashes.value == "pending"
        rebuilt = report.current_checkpoint
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[trainer]\nmodel = "{tiny_model_dir}"\nbatch_size = 4\nseq_len = 32\n[paths]\n'
                   f'data_dir = "{tmp_path / "data"}"\ncache_dir = "{tmp_path / "cache"}"\n')
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    result = CliRunner().invoke(cli, ["checkpoint", "verify", str(rebuilt)])
    assert result.exit_code == 1 and "NOT verified" in result.output
    assert "the next training session records its hash" in result.output
    assert " ok " not in result.output
    again = run_session(job.model_copy(update={"max_steps": 2}), threading.Event())
    assert again.steps == 2
    with Store.open(job.database) as store:
        ck = store.log.get(rebuilt)
        assert list(store.log.hashes(rebuilt)) == [ck.n_steps]
    result = CliRunner().invoke(cli, ["checkpoint", "verify", str(rebuilt)])
    assert result.exit_code == 0 and "ok (" in result.output, result.output


def test_the_daemon_socket_forget_stops_the_session_and_trains_again(tmp_path, tiny_model_dir, capfd):
    from pocketd.daemon.client import DaemonError, request
    from pocketd.daemon.service import Daemon
    from pocketd.trainer.config import TrainerConfig
    from tests.daemon_helpers import make_config, set_power, wait_for

    set_power(tmp_path / "power.json", True)
    config = make_config(tmp_path, daemon={"stop_grace_s": 60.0, "nice": 0})
    config.trainer = TrainerConfig(model=str(tiny_model_dir), batch_size=4, seq_len=32, eval_examples=8, seed=3,
                                   hash_every=2)
    fill_sources(config.paths.database)
    d = Daemon(config, supervise_interval_s=0.5)
    d.start()
    try:
        st = wait_for(lambda: (r := request(d.socket_path, "status"))["state"] == "training"
                      and (r["training"] or {}).get("step", 0) >= 3 and r, timeout=120, what="training")
        session, cand = st["training"]["session_id"], st["training"]["checkpoint_id"]
        db = config.paths.database
        ((doc_id, source),) = query(db, "select d.id, s.name from documents d join sources s on s.id = d.source_id "
                                    "where d.id = (select min(document_id) from step_documents "
                                    "where checkpoint_id = ?)", cand)
        reply = request(d.socket_path, "forget", timeout_s=90, sources=[source])
        assert reply["ok"] and [x["id"] for x in reply["documents"]] == [doc_id]
        assert reply["session"]["effect"] == SessionEffect.STOPPED.value and reply["session"]["session_id"] == session
        assert reply["session"]["candidate_dropped"] and cand in reply["dropped_checkpoints"]
        assert query(db, REFS_TO_FORGOTTEN) == [(0,)]
        hist = request(d.socket_path, "history", sessions=5, events=0)["sessions"]
        ended = next(s for s in hist if s["id"] == session)
        assert ended["end_reason"] == "stopped: forget requested" and ended["exit_status"] == 0
        # Not a failure: no back-off; the policy starts a new session on the remaining data.
        assert request(d.socket_path, "status")["backoff"]["failures"] == 0
        wait_for(lambda: (r := request(d.socket_path, "status"))["state"] == "training"
                 and r["training"]["session_id"] != session and (r["training"] or {}).get("step", 0) >= 1,
                 timeout=120, what="a new session")
        with pytest.raises(DaemonError, match="no such document") as info:
            request(d.socket_path, "forget", documents=[str(doc_id)])
        assert info.value.code == "not_found"
    finally:
        d.shutdown()
    assert query(db, REFS_TO_FORGOTTEN) == [(0,)]
    assert "Traceback" not in capfd.readouterr().err


def test_cli_forget_beside_the_daemons_trainer_cuts_it_cleanly(tmp_path, tiny_model_dir, capfd):
    """`pocketd forget` does not go through the daemon: the store's commit-time guard alone ends the session."""
    from pocketd.daemon.client import request
    from pocketd.daemon.service import Daemon
    from pocketd.trainer.config import TrainerConfig
    from tests.daemon_helpers import make_config, set_power, wait_for

    set_power(tmp_path / "power.json", True)
    config = make_config(tmp_path, daemon={"stop_grace_s": 60.0, "nice": 0})
    config.trainer = TrainerConfig(model=str(tiny_model_dir), batch_size=4, seq_len=32, eval_examples=8, seed=3)
    fill_sources(config.paths.database)
    d = Daemon(config, supervise_interval_s=0.5)
    d.start()
    try:
        st = wait_for(lambda: (r := request(d.socket_path, "status"))["state"] == "training"
                      and (r["training"] or {}).get("step", 0) >= 3 and r, timeout=120, what="training")
        session, cand = st["training"]["session_id"], st["training"]["checkpoint_id"]
        db = config.paths.database
        ((source,),) = query(db, "select s.name from documents d join sources s on s.id = d.source_id where d.id = "
                             "(select min(document_id) from step_documents where checkpoint_id = ?)", cand)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        cli = subprocess.run([sys.executable, "-m", "pocketd.daemon", "forget", "--source", source, "--json"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        report = json.loads(cli.stdout)
        assert report["session"]["effect"] == SessionEffect.CUT.value and report["session"]["checkpoint_id"] == cand
        wait_for(lambda: any(s["id"] == session and s["ended_at"]
                             for s in request(d.socket_path, "history", sessions=5, events=0)["sessions"]),
                 timeout=60, what="the cut session to end")
        ended = next(s for s in request(d.socket_path, "history", sessions=5, events=0)["sessions"]
                     if s["id"] == session)
        assert ended["exit_status"] == 0 and ended["end_reason"] == "documents forgotten", ended
        assert request(d.socket_path, "status")["backoff"]["failures"] == 0
        wait_for(lambda: (r := request(d.socket_path, "status"))["state"] == "training"
                 and r["training"]["session_id"] != session and (r["training"] or {}).get("step", 0) >= 1,
                 timeout=120, what="a new session")
        assert query(db, REFS_TO_FORGOTTEN) == [(0,)]
        assert query(db, "select status from checkpoints where id = ?", cand) == [(Status.FORGOTTEN.value,)]
    finally:
        d.shutdown()
    assert "Traceback" not in capfd.readouterr().err
