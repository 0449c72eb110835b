"""Training sessions on the tiny model: the log, replay, resume, gate, base check, non-finite steps."""

from __future__ import annotations

import pytest

from pocketd.store import Status, Store
from pocketd.trainer.errors import BaseMismatch, OverBudget
from pocketd.trainer.model import load_base
from pocketd.trainer.checkpoints import load_checkpoint
from pocketd.trainer.replay import Spec, prepare_model, replay
from pocketd.trainer.session import EndReason
from pocketd.trainer.tiny import make_tiny_model_dir

from tests.trainer_helpers import fill_store, make_job, run


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    j = make_job(tmp_path, tiny_model_dir)
    fill_store(j.database)
    return j


def test_session_logs_every_step_and_replay_matches_live_weights(job, monkeypatch):
    live = {}
    import pocketd.trainer.methods.mezo as mezo

    real = mezo.apply_update

    def spy(params, seeds, grads, lr, *rest):
        real(params, seeds, grads, lr, *rest)
        live["sha"] = params.sha256()

    monkeypatch.setattr(mezo, "apply_update", spy)
    out = run(job)
    assert out.steps == 5 and out.end_reason is EndReason.STEPS
    with Store.open(job.database) as store:
        steps = list(store.log.steps(out.checkpoint_id, with_documents=True))
        assert [s.step for s in steps] == list(range(5))
        assert all(len(s.seeds) == 1 and s.document_ids for s in steps)
        hashes = store.log.hashes(out.checkpoint_id)
        assert set(hashes) == {0, 3, 5}
        assert hashes[5] == live["sha"]  # the last stored hash is the live weights' hash
        _, params, _ = load_checkpoint(store, job.trainer, job.cache_dir, out.checkpoint_id, verify=True)
        assert params.sha256() == live["sha"]  # replay is bit-for-bit


def test_stop_mid_session_leaves_a_verifiable_candidate_that_the_next_session_resumes(job):
    first = run(job.model_copy(update={"max_steps": 50}), stop_after=2)
    assert first.end_reason is EndReason.STOPPED and first.steps == 2 and first.promoted is None
    with Store.open(job.database) as store:
        assert store.log.get(first.checkpoint_id).status is Status.CANDIDATE
        load_checkpoint(store, job.trainer, job.cache_dir, first.checkpoint_id, verify=True)
    second = run(job.model_copy(update={"max_steps": 3}))
    assert second.checkpoint_id == first.checkpoint_id  # resumed, not restarted
    with Store.open(job.database) as store:
        assert store.log.get(first.checkpoint_id).n_steps == 5
        load_checkpoint(store, job.trainer, job.cache_dir, first.checkpoint_id, verify=True)


def test_gate_rejects_a_checkpoint_that_made_validation_worse(job):
    good = run(job.model_copy(update={"max_steps": 2}))
    with Store.open(job.database) as store:
        store.log.set_status(good.checkpoint_id, Status.CURRENT)  # a known current checkpoint
    bad_job = job.model_copy(update={"trainer": job.trainer.model_copy(update={"lr": 50.0, "eps": 1.0})})
    bad = run(bad_job)
    assert bad.promoted is False and bad.val_loss > bad.parent_val_loss
    with Store.open(job.database) as store:
        assert store.log.get(bad.checkpoint_id).status is Status.REJECTED
        assert store.log.current().id == good.checkpoint_id


def test_gate_promotes_an_improvement(job):
    out = run(job.model_copy(update={"max_steps": 30, "trainer": job.trainer.model_copy(update={"lr": 3e-2})}))
    assert out.val_loss is not None and out.parent_val_loss is not None
    with Store.open(job.database) as store:
        status = store.log.get(out.checkpoint_id).status
    assert status is (Status.CURRENT if out.val_loss < out.parent_val_loss else Status.REJECTED)
    assert out.promoted == (out.val_loss < out.parent_val_loss)


def test_checkpoint_refuses_a_different_base(job, tmp_path):
    out = run(job)
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    base = load_base(str(other), job.cache_dir)
    with Store.open(job.database) as store:
        params = prepare_model(base.model, Spec.from_dict(store.log.get(out.checkpoint_id).spec))
        with pytest.raises(BaseMismatch, match="different|trained on base"):
            replay(store, params, out.checkpoint_id, base.fingerprint)


def test_nonfinite_losses_are_skipped_and_not_logged(job, monkeypatch):
    import pocketd.trainer.methods.mezo as mezo

    calls = {"n": 0}
    real = mezo.mean_loss

    def flaky(*a, **kw):
        calls["n"] += 1
        return float("nan") if calls["n"] in (3, 4) else real(*a, **kw)

    monkeypatch.setattr(mezo, "mean_loss", flaky)
    out = run(job.model_copy(update={"max_steps": 4}))
    assert out.skipped_nonfinite == 1 and out.steps == 4
    with Store.open(job.database) as store:
        assert store.log.get(out.checkpoint_id).n_steps == 4
        load_checkpoint(store, job.trainer, job.cache_dir, out.checkpoint_id, verify=True)


def test_persistent_nonfinite_loss_stops_the_session(job, monkeypatch):
    import pocketd.trainer.methods.mezo as mezo

    monkeypatch.setattr(mezo, "mean_loss", lambda *a, **kw: float("inf"))
    out = run(job)
    assert out.end_reason is EndReason.DIVERGED and out.steps == 0


def test_over_budget_is_refused_before_loading(job, monkeypatch):
    import pocketd.trainer.model as model

    monkeypatch.setattr(model, "load_base", lambda *a, **k: pytest.fail("loaded despite the budget"))
    with pytest.raises(OverBudget, match="memory_budget_mb"):
        run(job.model_copy(update={"memory_budget_mb": 64}))


def test_full_mode_replays_exactly(job):
    from pocketd.trainer.config import TrainerConfig

    cfg = TrainerConfig.model_validate({**job.trainer.model_dump(), "trainable": "full", "lr": 1e-4})
    full = job.model_copy(update={"trainer": cfg})
    out = run(full.model_copy(update={"max_steps": 3}))
    with Store.open(job.database) as store:
        load_checkpoint(store, full.trainer, job.cache_dir, out.checkpoint_id, verify=True)


def test_no_training_data_is_a_clean_noop(tmp_path, tiny_model_dir):
    job = make_job(tmp_path, tiny_model_dir)
    Store.open(job.database).close()
    out = run(job)
    assert out.end_reason is EndReason.NO_DATA and out.checkpoint_id is None


def test_rss_past_the_budget_stops_cleanly_after_the_step(job, monkeypatch):
    import pocketd.trainer.session as session
    from pocketd.trainer.job import ExitCode

    monkeypatch.setattr(session, "rss_mb", lambda: job.memory_budget_mb + 1.0)
    out = run(job.model_copy(update={"max_steps": 50}))
    assert out.end_reason is EndReason.OVER_BUDGET and out.exit_code is ExitCode.OVER_BUDGET
    assert out.steps == 1 and out.peak_rss_mb > job.memory_budget_mb
    with Store.open(job.database) as store:
        ck = store.log.get(out.checkpoint_id)
        assert ck.status is Status.CANDIDATE and ck.n_steps == 1
        load_checkpoint(store, job.trainer, job.cache_dir, ck.id, verify=True)
