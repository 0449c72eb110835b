"""The forget use case (daemon.forgetting) on a hand-made log, the store's forget guards, and the CLI's report.

No model here: forgetting only rewrites the log (the CLI's hash replay needs no model when nothing is rebuilt).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.forgetting import ForgetReport, HashState, SessionEffect, StoppedSession, forget
from pocketd.daemon.settings import PathsConfig, PocketdConfig
from pocketd.store import (
    CheckpointForgotten,
    DocumentNotFound,
    DocumentsForgotten,
    DocumentsInTraining,
    SourceNotFound,
    Status,
    StepRecord,
    Store,
)
from pocketd.trainer.job import SessionStatus, write_private_json


@pytest.fixture
def config(tmp_path: Path) -> PocketdConfig:
    return PocketdConfig(paths=PathsConfig(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                           state_dir=tmp_path / "state"))


@pytest.fixture
def store(config: PocketdConfig) -> Iterator[Store]:
    with Store.open(config.paths.database) as s:
        for i, source in enumerate(["a", "b", "c", "d"]):
            s.docs.add_document(f"note {i}", [f"note {i}"], source=source, source_kind="test", validation_percent=0)
        yield s


def step(i: int, docs: tuple[int, ...]) -> StepRecord:
    return StepRecord(i, (i + 1,), (0.5,), 1e-3, 2.0, docs)


def checkpoint(store: Store, parent: int | None, steps: list[tuple[int, ...]], status: Status = Status.CANDIDATE,
               method: str = "mezo") -> int:
    cid = store.log.create(parent_id=parent, method=method, base_fingerprint="base", spec={"s": 1},
                           estimator={"eps": 1e-3}, status=status)
    store.log.add_hash(cid, 0, "0" * 64)
    if method == "side":
        store.log.save_state(cid, len(steps), b"tensors", "f" * 64, list(enumerate(steps)))
    else:
        for i, docs in enumerate(steps):
            store.log.append_step(cid, step(i, docs))
    for docs in steps:
        store.docs.mark_trained([e.id for d in docs for e in store.docs.examples(document_id=d)])
    return cid


def refs_to_deleted(store: Store) -> int:
    return store.db.execute("select count(*) from step_documents sd left join documents d on d.id = sd.document_id "
                            "where d.id is null").fetchone()[0]


def trained(store: Store, doc: int) -> int:
    return sum(store.docs.trained_counts().get(e.id, 0) for e in store.docs.examples(document_id=doc))


def test_current_chain_is_rebuilt_and_candidates_continuing_it_are_dropped(store: Store, config: PocketdConfig):
    cur = checkpoint(store, None, [(1, 2), (2, 3), (3,)], Status.CURRENT)
    cand = checkpoint(store, cur, [(4,), (3,)])  # holds no step of document 1, but continues its steps
    report = forget(store, config, documents=["1"])
    assert [d.id for d in report.documents] == [1] and report.documents[0].source == "a"
    assert report.dropped_steps == {cur: 1} and report.dropped_checkpoints == (cand,)
    assert report.rebuilt and not report.fell_back and report.hashes is HashState.PENDING
    new = store.log.current()
    assert new is not None and report.current_checkpoint == new.id != cur
    assert [r.document_ids for r in store.log.steps(new.id, with_documents=True)] == [(2, 3), (3,)]
    assert store.log.hashes(new.id) == {}  # pending: the next session records it
    for cid in (cur, cand):
        assert store.log.get(cid).status is Status.FORGOTTEN and list(store.log.steps(cid)) == []
    # Document 2 lost its dropped step 0, document 4 the whole candidate: trained again. Document 3 too
    # (the candidate's step used it), although the rebuilt chain kept its other steps.
    assert report.untrained_examples == 3 and trained(store, 2) == trained(store, 4) == trained(store, 3) == 0
    assert refs_to_deleted(store) == 0 and store.log.checkpoints_with_documents([1]) == {}
    assert report.session.effect is SessionEffect.NONE
    assert json.loads(json.dumps(report.to_dict()))["dropped_steps"] == [{"checkpoint_id": cur, "steps": 1}]


def test_a_candidate_holding_the_source_is_dropped_and_its_other_documents_untrained(store, config):
    """Issue 13 item 2: the candidate's steps go, and what they trained on other documents is trained again."""
    cur = checkpoint(store, None, [(2,)], Status.CURRENT)
    cand = checkpoint(store, cur, [(3,), (1, 4)])
    report = forget(store, config, sources=["a"])
    assert report.dropped_checkpoints == (cand,) and report.dropped_steps == {} and not report.rebuilt
    assert store.log.current().id == cur and report.current_checkpoint == cur and report.hashes is HashState.NOT_NEEDED
    assert trained(store, 3) == trained(store, 4) == 0 and trained(store, 2) == 1
    assert report.untrained_examples == 2
    with pytest.raises(CheckpointForgotten, match=f"checkpoint {cand} was dropped by forget"):
        store.log.append_step(cand, step(2, (3,)))  # the running trainer's next commit
    assert store.log.get(cand).n_steps == 0


def test_side_checkpoints_go_whole_and_the_clean_ancestor_becomes_current(store, config):
    root = checkpoint(store, None, [(2,)], Status.SUPERSEDED, method="side")
    mid = checkpoint(store, root, [(1,)], Status.SUPERSEDED, method="side")
    top = checkpoint(store, mid, [(3,)], Status.CURRENT, method="side")
    report = forget(store, config, documents=["1"])
    assert report.fell_back and report.current_checkpoint == root == store.log.current().id
    assert report.dropped_checkpoints == (mid, top) and store.log.state(mid) is None and store.log.state(top) is None
    assert trained(store, 3) == 0 and trained(store, 2) == 1
    assert "the current checkpoint is now checkpoint" in "\n".join(report.lines())


def test_everything_is_one_transaction(store, config, monkeypatch):
    cur = checkpoint(store, None, [(1, 2), (3,)], Status.CURRENT)
    before = (store.log.list(), store.docs.trained_counts(), store.docs.stats().documents,
              store.db.execute("select count(*) from step_documents").fetchone())

    def fail(ids):
        raise RuntimeError("killed after the log was rewritten")

    monkeypatch.setattr(store.docs, "delete_documents", fail)
    with pytest.raises(RuntimeError, match="killed"):
        forget(store, config, documents=["1"])
    after = (store.log.list(), store.docs.trained_counts(), store.docs.stats().documents,
             store.db.execute("select count(*) from step_documents").fetchone())
    assert after == before and store.log.current().id == cur


def test_unknown_names_forget_nothing(store, config):
    checkpoint(store, None, [(1,)], Status.CURRENT)
    with pytest.raises(DocumentNotFound):
        forget(store, config, documents=["1", "99"])
    with pytest.raises(SourceNotFound):
        forget(store, config, documents=["1"], sources=["nowhere"])
    assert store.docs.stats().documents == 4 and store.log.current().n_steps == 1


def test_the_store_refuses_steps_of_forgotten_documents(store, config):
    cand = checkpoint(store, None, [(2,)])
    forget(store, config, documents=["1"])
    with pytest.raises(DocumentsForgotten, match="used document 1, forgotten since"):
        store.log.append_step(cand, step(1, (1, 2)))
    with pytest.raises(DocumentsForgotten):
        store.log.save_state(cand, 2, b"x", "e" * 64, [(1, (1,))])
    assert store.log.get(cand).n_steps == 1 and list(store.log.steps(cand))[-1].step == 0
    store.log.append_step(cand, step(1, (2,)))  # a clean step still commits


def test_a_dropped_checkpoint_takes_nothing_more(store, config):
    cand = checkpoint(store, None, [(1,)])
    forget(store, config, documents=["1"])
    for write in (lambda: store.log.add_hash(cand, 1, "a" * 64),
                  lambda: store.log.set_status(cand, Status.CURRENT),
                  lambda: store.log.save_state(cand, 1, b"x", "e" * 64),
                  lambda: store.log.create(parent_id=cand, method="mezo", base_fingerprint="base", spec={},
                                           estimator={})):
        with pytest.raises(CheckpointForgotten):
            write()
    assert store.log.get(cand).status is Status.FORGOTTEN


def test_the_database_guards_hold_without_the_store_code(store):
    cid = checkpoint(store, None, [(1,)])
    with pytest.raises(sqlite3.IntegrityError, match="forget guard"):
        store.db.execute("insert into step_documents (checkpoint_id, step, document_id) values (?, 0, 99)", [cid])
    with pytest.raises(sqlite3.IntegrityError, match="forget guard"):
        store.db.execute("delete from documents where id = 1")
    with pytest.raises(DocumentsInTraining, match="document 1: training steps still use it"):
        store.docs.delete_documents([1, 2])
    assert store.docs.stats().documents == 4


def test_steps_of_documents_deleted_before_the_guards_are_dropped_too(store, config):
    """A database from a pocketd without the guards: steps name a deleted document. Any forget repairs it."""
    cand = checkpoint(store, None, [(2,), (3,)])
    store.db.execute("drop trigger forget_guard_documents")
    store.db.execute("delete from examples where document_id = 3")
    store.db.execute("delete from documents where id = 3")
    assert refs_to_deleted(store) == 1
    report = forget(store, config, documents=["4"])
    assert report.orphan_documents == (3,) and report.dropped_checkpoints == (cand,)
    assert refs_to_deleted(store) == 0 and trained(store, 2) == 0


def test_a_trainer_running_beside_is_reported(store, config, tmp_path):
    cand = checkpoint(store, None, [(1,)])
    other = checkpoint(store, None, [(2,)])
    jobs = config.paths.state_dir / "jobs"
    jobs.mkdir(parents=True)
    status = jobs / "session-7.status.json"
    write_private_json(status, SessionStatus(phase="training", checkpoint_id=cand, pid=os.getpid()).model_dump(
        mode="json"))
    report = forget(store, config, documents=["1"])
    assert report.session.effect is SessionEffect.CUT and report.session.session_id == 7
    assert report.session.candidate_dropped and "a running session was cut" in report.summary
    write_private_json(status, SessionStatus(phase="training", checkpoint_id=other, pid=os.getpid()).model_dump(
        mode="json"))
    report = forget(store, config, documents=["3"])
    assert report.session.effect is SessionEffect.GUARDED and not report.session.candidate_dropped
    write_private_json(status, SessionStatus(phase="done", checkpoint_id=other, pid=os.getpid()).model_dump(
        mode="json"))
    assert forget(store, config, documents=["4"]).session.effect is SessionEffect.NONE
    stopped = forget(store, config, documents=["2"], stopped=StoppedSession(3, 123, other)).session
    assert stopped.effect is SessionEffect.STOPPED and stopped.candidate_dropped and stopped.session_id == 3


def test_forget_clears_the_activation_cache(store, config):
    acts = config.paths.cache_dir / "activations"
    acts.mkdir(parents=True)
    (acts / "x.act").write_bytes(b"derived from the text")
    report = forget(store, config, documents=["2"])
    assert report.activation_cache_cleared and not acts.exists()
    assert "cleared the activation cache" in report.lines()


# -- the CLI ----------------------------------------------------------------------------------------------

def test_cli_prints_the_report_and_its_json(config: PocketdConfig, monkeypatch, tmp_path: Path):
    from pocketd.daemon.cli import cli

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{config.paths.data_dir}"\ncache_dir = "{config.paths.cache_dir}"\n'
                   f'state_dir = "{config.paths.state_dir}"\n')
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    with Store.open(config.paths.database) as s:
        for i, source in enumerate(["a", "b", "b"]):
            s.docs.add_document(f"note {i}", [f"note {i}"], source=source, source_kind="test", validation_percent=0)
        cur = checkpoint(s, None, [(2,)], Status.CURRENT, method="side")
        cand = checkpoint(s, cur, [(1,), (3,)])
    result = CliRunner().invoke(cli, ["forget", "--source", "a", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == set(ForgetReport(()).to_dict()) and data["dropped_checkpoints"] == [cand]
    assert data["documents"][0]["source"] == "a" and data["session"]["effect"] == "none"
    assert data["untrained_examples"] == 1 and data["hashes"] == "not needed"
    result = CliRunner().invoke(cli, ["forget", "--source", "b"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == "deleted 2 documents" and "the base model" in result.output
    assert "retrains the side part" in result.output and f"whole ({cur})" in result.output


def test_the_torch_free_forget_styles_match_the_methods():
    """trainer.forget cannot import the methods (torch) in the daemon: its table must say what they say."""
    from pocketd.trainer.forget import STYLES, ForgetStyle
    from pocketd.trainer.registry import METHODS

    assert set(STYLES) == set(METHODS)
    for key, method in METHODS.items():
        assert method.drops_whole == (STYLES[key] is ForgetStyle.WHOLE), key
