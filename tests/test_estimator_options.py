"""Every estimator option trains and replays exactly: prefix sharing, activation cache, LoRA-FA,
Rademacher z, the normalized step rule and the divergence guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from pocketd.store import Store
from pocketd.trainer.config import StepRule, TrainerConfig
from pocketd.trainer.lora import lora_modules
from pocketd.trainer.model import load_base
from pocketd.trainer.checkpoints import load_checkpoint
from pocketd.trainer.replay import Spec, prepare_model
from pocketd.trainer.stepsize import StepSizer

from tests.trainer_helpers import fill_store, make_job, run


def trained(tmp_path: Path, model_dir: Path, **trainer: Any) -> tuple[Any, Any]:
    job = make_job(tmp_path, model_dir, **trainer)
    fill_store(job.database)
    out = run(job)
    assert out.steps == trainer.get("max_steps", 5)
    return job, out


def replayed(job: Any, ck_id: int) -> Any:
    with Store.open(job.database) as store:
        return load_checkpoint(store, job.trainer, job.cache_dir, ck_id, verify=True)


def logged(job: Any, ck_id: int) -> list[Any]:
    with Store.open(job.database) as store:
        return list(store.log.steps(ck_id))


OPTIONS = [
    dict(lora_layers=1),  # prefix sharing (tiny model: 2 layers) with the activation cache
    dict(lora_layers=1, activation_cache_mb=0),
    dict(lora_fa=True, lora_layers=1),
    dict(perturbation="rademacher"),
    dict(perturbation="sparse", lora_layers=1),
    dict(batched_perturbations=True, n_perturbations=2, perturbation="sparse"),
    dict(step_rule="normalized", lr=1e-3),
    dict(step_rule="normalized", perturbation="rademacher", lora_fa=True, lora_layers=1, n_perturbations=3),
    dict(trainable="full", perturbation="rademacher", step_rule="normalized", lr=1e-5),
    dict(batched_perturbations=True, n_perturbations=2, lora_layers=1),
    dict(batched_perturbations=True, lora_fa=True),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_replays_exactly(tmp_path: Path, tiny_model_dir: Path, options: dict[str, Any]) -> None:
    job, out = trained(tmp_path, tiny_model_dir, evaluate=False, **options)
    _, params, ck = replayed(job, out.checkpoint_id)  # verify=True: every stored hash, incl. the last
    with Store.open(job.database) as store:
        assert params.sha256() == store.log.hashes(out.checkpoint_id)[5]
    assert ck.estimator["z"] == TrainerConfig(**options).perturbation.value


def test_prefix_sharing_takes_the_same_steps_as_full_forwards(tmp_path: Path, tiny_model_dir: Path) -> None:
    shared_job, shared = trained(tmp_path / "a", tiny_model_dir, lora_layers=1, evaluate=False)
    plain_job, plain = trained(tmp_path / "b", tiny_model_dir, lora_layers=1, prefix_sharing=False, evaluate=False)
    a, b = logged(shared_job, shared.checkpoint_id), logged(plain_job, plain.checkpoint_id)
    assert [r.seeds for r in a] == [r.seeds for r in b]
    for ra, rb in zip(a, b):
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
        assert ra.grads[0] == pytest.approx(rb.grads[0], rel=1e-2, abs=1e-4)
    assert any((shared_job.cache_dir / "activations").rglob("*.act"))  # windows were cached...
    assert not (plain_job.cache_dir / "activations").exists()  # ...only where sharing was on


def test_a_second_session_reads_the_cache_and_replays(tmp_path: Path, tiny_model_dir: Path) -> None:
    job, first = trained(tmp_path, tiny_model_dir, lora_layers=1, evaluate=False, max_steps=6)
    files = {p.name: p.stat().st_mtime_ns for p in (job.cache_dir / "activations").rglob("*.act")}
    second = run(job.model_copy(update={"max_steps": 3}))
    after = {p.name: p.stat().st_mtime_ns for p in (job.cache_dir / "activations").rglob("*.act")}
    assert any(after[n] != t for n, t in files.items() if n in after)  # hits touch their files
    replayed(job, second.checkpoint_id)


def test_lora_fa_keeps_a_frozen(tmp_path: Path, tiny_model_dir: Path) -> None:
    job, out = trained(tmp_path, tiny_model_dir, lora_fa=True, evaluate=False)
    base, params, _ = replayed(job, out.checkpoint_id)
    assert params.names and all(name.endswith("lora_B") for name in params.names)
    fresh = load_base(job.trainer.model, job.cache_dir)
    prepare_model(fresh.model, Spec.from_config(job.trainer))
    trained_mods, fresh_mods = lora_modules(base.model), lora_modules(fresh.model)
    assert all(torch.equal(trained_mods[k].lora_A, fresh_mods[k].lora_A) for k in fresh_mods)  # A: its init
    assert any(m.lora_B.abs().sum() > 0 for m in trained_mods.values())  # B moved


def test_sparse_z_perturbs_about_a_tenth_of_the_coordinates_with_unit_variance() -> None:
    import torch

    from pocketd.trainer.config import Perturbation
    from pocketd.trainer.zo import SPARSE_DENSITY, draw

    z = draw(torch.Size([200, 500]), torch.Generator().manual_seed(5), Perturbation.SPARSE)
    again = draw(torch.Size([200, 500]), torch.Generator().manual_seed(5), Perturbation.SPARSE)
    assert torch.equal(z, again)
    assert (z != 0).float().mean().item() == pytest.approx(SPARSE_DENSITY, abs=0.01)
    assert z.pow(2).mean().item() == pytest.approx(1.0, abs=0.05)


def test_normalized_rule_moves_by_about_lr() -> None:
    s = StepSizer(StepRule.NORMALIZED, guard=False)
    for g in [1e-4, 2e-4, 1.5e-4]:
        lr = s.lr(1e-3, [g])
        assert 1e-4 < lr * g / 1e-3 < 10  # |step| is lr times a number of order one, whatever g's scale
    big = StepSizer(StepRule.NORMALIZED, guard=False)
    assert big.lr(1e-3, [1e4]) * 1e4 == pytest.approx(1e-3)


def test_sgd_rule_is_the_configured_lr() -> None:
    assert StepSizer(StepRule.SGD, guard=False).lr(3e-4, [123.0]) == 3e-4


def test_guard_halves_on_a_rising_loss_and_not_on_noise() -> None:
    noisy = StepSizer(StepRule.SGD)
    gen = torch.Generator().manual_seed(0)
    for x in torch.normal(3.0, 0.3, (500,), generator=gen).tolist():
        assert not noisy.observe(x)  # stationary noise: never backs off
    rising = StepSizer(StepRule.SGD)
    losses = [3.0] * 20 + [3.0 + 0.05 * i for i in range(40)]
    fired = [rising.observe(x) for x in losses]
    assert any(fired) and rising.scale == 0.5 ** rising.backoffs
    assert rising.lr(1e-3, [1.0]) == pytest.approx(1e-3 * rising.scale)
    assert not StepSizer(StepRule.SGD).observe(float("nan"))


@pytest.mark.parametrize("field,value", [("perturbation", "uniform"), ("step_rule", "adam"),
                                         ("activation_cache_mb", -1), ("batched_perturbations", "maybe")])
def test_options_are_validated_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        TrainerConfig(**{field: value})


def test_batched_perturbations_are_refused_for_full() -> None:
    with pytest.raises(ValidationError, match="batched_perturbations"):
        TrainerConfig(trainable="full", batched_perturbations=True)


def test_lora_options_are_ignored_by_full(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = TrainerConfig(trainable="full", lora_layers=1, lora_fa=True)
    assert Spec.from_config(cfg).lora is None  # the log records no adapters


def test_budget_estimate_counts_batched_copies(tiny_model_dir: Path) -> None:
    from pocketd.trainer.budget import estimate_need_mb

    seq = TrainerConfig(n_perturbations=4, batch_size=64, micro_batch_size=64, seq_len=512)
    batched = seq.model_copy(update={"batched_perturbations": True})
    assert estimate_need_mb(batched, tiny_model_dir) > estimate_need_mb(seq, tiny_model_dir) + 100
