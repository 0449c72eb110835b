"""Verified snapshots beside the seed log (issue 17): stored at a session's end hash, used to skip the
replay of the steps before them, pruned to the current/candidate checkpoints, dropped by forget, and
never trusted blindly (a corrupt or missing snapshot falls back to the full replay)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pocketd.store import Status, Store
from pocketd.store.schema import known_migrations
from pocketd.trainer.checkpoints import load_checkpoint
from pocketd.trainer.errors import ReplayMismatch
from pocketd.trainer.forget import forget_in_log
from pocketd.trainer.model import load_base
from pocketd.trainer.registry import method_of

from tests.trainer_helpers import fill_store, make_job, run


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    j = make_job(tmp_path, tiny_model_dir)
    fill_store(j.database)
    return j


def _load(store, job, ck_id, **kw):
    """(sha of the loaded tensors, steps replayed by the load)."""
    replayed = []
    _, params, _ = load_checkpoint(store, job.trainer, job.cache_dir, ck_id, verify=True,
                                   progress=lambda done, total: replayed.append(done), **kw)
    return params.sha256(), len(replayed)


def _full(store, job, ck_id):
    return _load(store, job, ck_id, snapshots=False)


def test_the_migration_is_last():
    assert known_migrations()[-1] == "m006_snapshots"


def test_a_session_stores_a_verified_snapshot_and_a_load_replays_nothing_before_it(job):
    out = run(job)
    assert out.promoted
    with Store.open(job.database) as store:
        ck = store.log.get(out.checkpoint_id)
        snap = store.snapshots.get(ck.id)
        assert snap is not None and snap.n_steps == ck.n_steps == 5
        assert snap.sha256 == store.log.hashes(ck.id)[5]
        assert store.snapshots.sizes() == {ck.id: len(snap.data)}
        full_sha, full_steps = _full(store, job, ck.id)
        assert full_steps == 5  # `checkpoint verify` still replays the whole log
        sha, steps = _load(store, job, ck.id)
        assert (sha, steps) == (full_sha, 0)


def test_a_parent_snapshot_serves_the_child_and_only_the_tail_is_replayed(job):
    first = run(job)
    child = run(job.model_copy(update={"max_steps": 4, "evaluate": False}))
    assert child.checkpoint_id != first.checkpoint_id
    with Store.open(job.database) as store:
        assert store.log.get(child.checkpoint_id).parent_id == first.checkpoint_id
        # One snapshot per checkpoint: the current parent's and the candidate's.
        assert set(store.snapshots.sizes()) == {first.checkpoint_id, child.checkpoint_id}
        full_sha, full_steps = _full(store, job, child.checkpoint_id)
        assert full_steps == 9
        assert _load(store, job, child.checkpoint_id) == (full_sha, 0)
        store.snapshots.drop(child.checkpoint_id)
        assert _load(store, job, child.checkpoint_id) == (full_sha, 4)  # from the parent's snapshot


def test_promotion_and_rejection_prune_the_snapshots_nothing_loads_any_more(job):
    first = run(job)
    child = run(job.model_copy(update={"max_steps": 2, "evaluate": False}))
    with Store.open(job.database) as store:
        store.log.set_status(child.checkpoint_id, Status.CURRENT)  # the parent is superseded
        assert set(store.snapshots.sizes()) == {child.checkpoint_id}
        store.log.set_status(child.checkpoint_id, Status.REJECTED)
        assert store.snapshots.sizes() == {}
        # A snapshot is only stored where the log records the same hash.
        store.log.set_status(first.checkpoint_id, Status.CURRENT)
        store.snapshots.save(first.checkpoint_id, 5, b"x", "0" * 64)
        store.snapshots.save(first.checkpoint_id, 4, b"x", store.log.hashes(first.checkpoint_id)[5])
        assert store.snapshots.sizes() == {}


def _corrupt_bytes(store, ck_id):
    snap = store.snapshots.get(ck_id)
    data = bytearray(snap.data)
    data[-3] ^= 0x5A  # a flipped bit in the last tensor's values
    store.db["checkpoint_snapshots"].update(ck_id, {"data": bytes(data)})


def _garbage(store, ck_id):
    store.db["checkpoint_snapshots"].update(ck_id, {"data": b"\x00" * 7})


def _wrong_step(store, ck_id):  # a snapshot claiming a step whose logged hash is another's
    store.db["checkpoint_snapshots"].update(ck_id, {"n_steps": 3})


def _nan_with_forged_hashes(store, job, ck_id):
    """Non-finite tensors whose hash the log and the snapshot both (falsely) record."""
    from safetensors.torch import load, save

    from pocketd.trainer.params import TrainableSet

    snap = store.snapshots.get(ck_id)
    tensors = load(snap.data)
    tensors[sorted(tensors)[0]][0] = float("nan")
    ck = store.log.get(ck_id)
    method = method_of(ck)
    base = load_base(job.trainer.model, job.cache_dir, job.trainer.dtype)
    names = method.attach(base.model, method.spec_from_dict(ck.spec)).params.names
    sha = TrainableSet(names, tuple(tensors[n] for n in names)).sha256()
    store.db["checkpoint_snapshots"].update(ck_id, {"data": save(tensors), "sha256": sha})
    store.db.execute("update checkpoint_hashes set sha256 = ? where checkpoint_id = ? and step = ?",
                     [sha, ck_id, snap.n_steps])


@pytest.mark.parametrize("damage", [_corrupt_bytes, _garbage, _wrong_step, "missing"])
def test_a_corrupt_or_missing_snapshot_falls_back_to_the_replay_with_a_warning(job, damage, caplog):
    out = run(job)
    with Store.open(job.database) as store:
        full_sha, _ = _full(store, job, out.checkpoint_id)
        if damage == "missing":
            store.snapshots.drop(out.checkpoint_id)
        else:
            damage(store, out.checkpoint_id)
        with caplog.at_level(logging.WARNING, logger="pocketd.trainer.snapshot"):
            assert _load(store, job, out.checkpoint_id) == (full_sha, 5)
        if damage != "missing":
            assert any("replaying the log instead" in r.getMessage() for r in caplog.records)


def test_non_finite_snapshot_tensors_are_never_loaded_even_with_matching_hashes(job, caplog):
    out = run(job)
    with Store.open(job.database) as store:
        _nan_with_forged_hashes(store, job, out.checkpoint_id)
        with caplog.at_level(logging.WARNING, logger="pocketd.trainer.snapshot"):
            # The log's final hash was forged too, so the replay then refuses the checkpoint: never a wrong model.
            with pytest.raises(ReplayMismatch):
                _load(store, job, out.checkpoint_id)
        assert any("NaN or infinite" in r.getMessage() for r in caplog.records)


def test_forget_drops_the_snapshots_of_checkpoints_losing_steps_and_the_rebuilt_chain_gets_a_fresh_one(job):
    first = run(job)
    with Store.open(job.database) as store:
        doc = sorted(store.log.documents_of(first.checkpoint_id))[0]
        with store.db.atomic():
            done = forget_in_log(store, [doc])
            store.docs.delete_documents([doc])
        assert first.checkpoint_id in done.dropped and done.result.rebuilt
        assert store.snapshots.sizes() == {}  # the dropped checkpoint's snapshot is gone with its steps
        new = done.result.current_id
        base = load_base(job.trainer.model, job.cache_dir, job.trainer.dtype)
        method_of(store.log.get(new)).record_hashes(store, base.model, base.fingerprint, new)
        snap = store.snapshots.get(new)
        assert snap is not None and snap.sha256 == store.log.hashes(new)[snap.n_steps]
        full_sha, full_steps = _full(store, job, new)
        assert full_steps == store.log.get(new).n_steps
        assert _load(store, job, new) == (full_sha, 0)


def _cli_env(tmp: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, validation: int) -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[trainer]\nmodel = "{model_dir}"\nbatch_size = 4\nseq_len = 32\nlr = 1e-3\nseed = 3\n'
                   f'hash_every = 2\neval_examples = 16\n[paths]\ndata_dir = "{tmp / name}"\n'
                   f'cache_dir = "{tmp / "cache"}"\n')
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    fill_store(tmp / name / "pocketd.sqlite3", validation_percent=validation)
    return tmp / name / "pocketd.sqlite3"


def _cli(*args: str) -> str:
    from click.testing import CliRunner

    from pocketd.daemon.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_show_and_stats_report_the_bytes_verify_replays_all_and_import_builds_a_snapshot(
        tmp_path, tiny_model_dir, monkeypatch):
    db = _cli_env(tmp_path, tiny_model_dir, monkeypatch, "a", 25)
    _cli("train", "--steps", "3")
    with Store.open(db) as store:
        size = store.snapshots.sizes()[1]
    shown = json.loads(_cli("checkpoint", "show", "1"))
    assert shown["snapshot"] == {"n_steps": 3, "bytes": size} and shown["snapshot_bytes_on_chain"] == size
    assert json.loads(_cli("stats", "--json"))["snapshot_bytes"] == size
    assert "ok (3 steps replayed" in _cli("checkpoint", "verify", "1")  # the log, not the snapshot
    _cli("checkpoint", "export", "1", str(tmp_path / "ck.pkd"))
    assert json.loads(_cli("checkpoint", "show", "1"))["snapshot"] is not None  # export leaves it alone

    db2 = _cli_env(tmp_path, tiny_model_dir, monkeypatch, "b", 0)  # no validation split: verified -> current
    assert "now current" in _cli("checkpoint", "import", str(tmp_path / "ck.pkd"))
    with Store.open(db2) as store:
        ck = store.log.current()
        snap = store.snapshots.get(ck.id)
        assert snap is not None and snap.n_steps == 3 and snap.sha256 == store.log.hashes(ck.id)[3]


def test_a_chain_rebuilt_by_the_socket_forget_gets_its_snapshot_from_the_next_session(job):
    first = run(job)
    with Store.open(job.database) as store:
        doc = sorted(store.log.documents_of(first.checkpoint_id))[0]
        with store.db.atomic():
            done = forget_in_log(store, [doc])  # no replay here: no hashes, no snapshot
            store.docs.delete_documents([doc])
        new = done.result.current_id
        assert store.snapshots.get(new) is None and store.log.hashes(new) == {}
    run(job.model_copy(update={"max_steps": 1, "evaluate": False}))  # loads (and hashes) the rebuilt chain
    with Store.open(job.database) as store:
        snap = store.snapshots.get(new)
        assert snap is not None and snap.sha256 == store.log.hashes(new)[store.log.get(new).n_steps]
        full_sha, _ = _full(store, job, new)
        assert _load(store, job, new) == (full_sha, 0)
