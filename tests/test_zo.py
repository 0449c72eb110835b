"""The ZO step: private RNG, exact restore, replay equals training bit for bit, drift bound of the dance."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pocketd.trainer.config import Trainable
from pocketd.trainer.lora import LoraSpec, attach_lora
from pocketd.trainer.loss import Batch, mean_loss
from pocketd.trainer.params import trainable_set
from pocketd.trainer.zo import Restore, apply_update, estimate, perturb, replay_step


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # test-only: model init
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def batch(seed: int = 1, b: int = 4, t: int = 12) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t // 2 :] = 0  # one padded row
    return Batch(ids, mask)


def lora_model(seed: int = 0):
    model = tiny_llama(seed)
    attach_lora(model, LoraSpec(rank=4, alpha=8, targets="all", layers=None, seed=3))
    return model, trainable_set(model, Trainable.LORA)


def test_perturb_is_deterministic_and_leaves_global_rng_alone():
    _, p1 = lora_model()
    _, p2 = lora_model()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    perturb(p1, seed=42, scale=0.1)
    after = torch.rand(3)
    perturb(p2, seed=42, scale=0.1)
    assert torch.equal(before, after)  # global RNG untouched
    assert p1.sha256() == p2.sha256()
    perturb(p2, seed=43, scale=0.1)
    assert p1.sha256() != p2.sha256()


def test_snapshot_restore_is_exact_and_estimate_restores():
    model, params = lora_model()
    b = batch()
    h0 = params.sha256()
    res = estimate(params, lambda: mean_loss(model, b, micro_batch=2, chunk_tokens=7), [1, 2, 3], 1e-2,
                   Restore.SNAPSHOT)
    assert res.finite and len(res.grads) == 3
    assert params.sha256() == h0


@pytest.mark.parametrize("trainable,restore", [(Trainable.LORA, Restore.SNAPSHOT), (Trainable.FULL, Restore.DANCE)])
def test_replay_equals_training_bit_for_bit(trainable, restore):
    if trainable is Trainable.LORA:
        model, params = lora_model()
        _, fresh = lora_model()
    else:
        model = tiny_llama()
        params = trainable_set(model, Trainable.FULL)
        fresh = trainable_set(tiny_llama(), Trainable.FULL)
    log = []
    for step in range(6):
        b = batch(seed=step)
        seeds = [1000 + 2 * step, 1001 + 2 * step]
        res = estimate(params, lambda: mean_loss(model, b, micro_batch=4, chunk_tokens=16), seeds, 1e-2, restore)
        assert res.finite
        apply_update(params, seeds, res.grads, 1e-2)
        log.append((seeds, res.grads))
    for seeds, grads in log:
        replay_step(fresh, seeds, grads, 1e-2, 1e-2, restore)
    assert fresh.sha256() == params.sha256()
    # and a wrong scalar gives a different result
    replay_step(fresh, [7], [0.5], 1e-2, 1e-2, restore)
    assert fresh.sha256() != params.sha256()


def test_dance_drift_bound_in_float32():
    """MeZO's in-place +eps, -2eps, +eps does not return to the same floats; measure how far it lands."""
    model = tiny_llama()
    params = trainable_set(model, Trainable.FULL)
    saved = params.snapshot()
    for seed in range(20):
        perturb(params, seed, 1e-3)
        perturb(params, seed, -2e-3)
        perturb(params, seed, 1e-3)
    worst = max(float((t - s).abs().max()) for t, s in zip(params.tensors, saved))
    scale = max(float(s.abs().max()) for s in saved)
    assert worst > 0  # the drift is real, which is why replay repeats the dance
    assert worst < 20 * 4 * scale * 2**-23 + 1e-8  # a few ulps per dance at most


def test_nonfinite_loss_reports_and_restores():
    _, params = lora_model()
    h0 = params.sha256()
    values = iter([1.0, float("nan")])
    res = estimate(params, lambda: next(values), [5], 1e-2, Restore.SNAPSHOT)
    assert not res.finite and res.grads == ()
    assert params.sha256() == h0


def test_grad_sign_descends_on_a_quadratic():
    """On L = ||theta||^2 the ZO update lowers the loss on average."""
    theta = torch.ones(50)
    from pocketd.trainer.params import TrainableSet

    params = TrainableSet(("theta",), (theta,))
    loss = lambda: float((theta**2).sum())  # noqa: E731
    start = loss()
    for step in range(200):
        res = estimate(params, loss, [step], 1e-3, Restore.SNAPSHOT)
        apply_update(params, [step], res.grads, 1e-2)
    assert loss() < 0.5 * start and math.isfinite(loss())
