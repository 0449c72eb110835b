"""Frozen-prefix sharing and the activation cache give the losses of a full forward; the cache is bounded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pocketd.trainer.actcache import ActivationCache, clear, window_key
from pocketd.trainer.config import Trainable
from pocketd.trainer.lora import LoraSpec, attach_lora, lora_modules
from pocketd.trainer.loss import Batch, mean_loss
from pocketd.trainer.params import trainable_set
from pocketd.trainer.prefix import Parts, batch_prefixes, first_trainable_layer, run_prefix, suffix_mean_loss


def model_with_top_lora(layers: int = 4, top: int = 2) -> tuple[LlamaForCausalLM, object]:
    torch.manual_seed(0)  # test-only: model init
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    attach_lora(model, LoraSpec(rank=4, alpha=8, targets="all", layers=top, seed=3))
    params = trainable_set(model, Trainable.LORA)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in params.tensors:  # B is zero at init: make the adapters do something
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return model, params


def padded_batch(seed: int = 1, b: int = 5, t: int = 14) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([t, t - 3, 5, t, 2][:b]):
        mask[row, n:] = 0
        ids[row, n:] = 0
    return Batch(ids, mask)


def test_first_trainable_layer_follows_the_adapters() -> None:
    model, params = model_with_top_lora(layers=4, top=2)
    assert first_trainable_layer(model, params.tensors) == 2
    full = trainable_set(model, Trainable.FULL)
    assert first_trainable_layer(model, full.tensors) == 0  # embeddings are trainable: nothing to share


@pytest.mark.parametrize("at", [0, 1, 2, 3])
@pytest.mark.parametrize("micro", [2, 5])
def test_prefix_then_suffix_equals_the_full_forward(at: int, micro: int) -> None:
    model, _ = model_with_top_lora()
    batch = padded_batch()
    full = mean_loss(model, batch, micro_batch=micro, chunk_tokens=16)
    parts = Parts.of(model)
    shared = suffix_mean_loss(parts, batch_prefixes(parts, batch, at, micro), 16)
    assert shared == pytest.approx(full, rel=1e-6, abs=1e-6)


def test_one_prefix_serves_every_perturbation() -> None:
    """The prefix below the adapters does not change when the adapters do."""
    model, params = model_with_top_lora()
    batch = padded_batch()
    parts = Parts.of(model)
    prefixes = batch_prefixes(parts, batch, 2, 5)
    with torch.no_grad():
        params.tensors[-1].add_(0.5)
    assert suffix_mean_loss(parts, prefixes, 16) == pytest.approx(mean_loss(model, batch, micro_batch=5,
                                                                             chunk_tokens=16), rel=1e-6)


def test_prefix_layer_out_of_range_is_refused() -> None:
    model, _ = model_with_top_lora()
    batch = padded_batch()
    with pytest.raises(ValueError, match="prefix layer 9"):
        run_prefix(Parts.of(model), batch.input_ids, batch.attention_mask, 9)


def make_cache(tmp_path: Path, fingerprint: str = "f" * 64, layer: int = 2, max_bytes: int = 10**6) -> ActivationCache:
    return ActivationCache(tmp_path / "act", fingerprint, layer, torch.float32, 32, max_bytes)


def test_cached_activations_give_the_full_forward_loss(tmp_path: Path) -> None:
    model, _ = model_with_top_lora()
    batch = padded_batch()
    parts = Parts.of(model)
    full = mean_loss(model, batch, micro_batch=5, chunk_tokens=16)
    cache = make_cache(tmp_path)
    cold = suffix_mean_loss(parts, batch_prefixes(parts, batch, 2, 5, cache), 16)
    assert (cache.hits, cache.misses, len(cache)) == (0, 5, 5)
    warm = suffix_mean_loss(parts, batch_prefixes(parts, batch, 2, 5, cache), 16)
    assert cache.hits == 5
    assert cold == pytest.approx(full, rel=1e-6) and warm == pytest.approx(full, rel=1e-6)
    # A batch mixing cached and new windows, padded differently: still the same loss as a full forward.
    other = padded_batch(seed=2, b=3, t=9)
    rows = [2, 4]  # windows of 5 and 2 tokens, cached above, now in a batch padded to 9
    mixed = Batch(torch.cat([batch.input_ids[rows, :9], other.input_ids]),
                  torch.cat([batch.attention_mask[rows, :9], other.attention_mask]))
    mixed_full = mean_loss(model, mixed, micro_batch=5, chunk_tokens=16)
    hits = cache.hits
    got = suffix_mean_loss(parts, batch_prefixes(parts, mixed, 2, 5, cache), 16)
    assert cache.hits == hits + 2
    assert got == pytest.approx(mixed_full, rel=1e-5)


def test_cache_is_keyed_by_base_layer_and_content(tmp_path: Path) -> None:
    h = torch.randn(7, 32)
    key = window_key(torch.arange(7).numpy())
    make_cache(tmp_path).put(key, h)
    assert torch.equal(make_cache(tmp_path).get(key, 7), h)  # survives a new process (reopened)
    assert make_cache(tmp_path, fingerprint="e" * 64).get(key, 7) is None  # another base
    assert make_cache(tmp_path, layer=1).get(key, 7) is None  # another layer spec
    assert make_cache(tmp_path).get(window_key(torch.arange(1, 8).numpy()), 7) is None  # other tokens
    assert window_key(torch.arange(7).numpy()) != window_key(torch.arange(8).numpy())


def test_cache_respects_its_bound_and_evicts_least_recently_used(tmp_path: Path) -> None:
    one = 10 * 32 * 4  # bytes of a [10, 32] float32 window
    cache = make_cache(tmp_path, max_bytes=3 * one)
    keys = [window_key(torch.tensor([i] * 10).numpy()) for i in range(6)]
    for i, k in enumerate(keys[:3]):
        cache.put(k, torch.full((10, 32), float(i)))
        os.utime(cache.dir / f"{k}.act", (1000 + i, 1000 + i))
    assert cache.get(keys[0], 10) is not None  # touched: now the most recent
    for k in keys[3:5]:
        cache.put(k, torch.zeros(10, 32))
        assert cache.bytes_used <= 3 * one
    disk = sum(p.stat().st_size for p in cache.dir.iterdir())
    assert disk == cache.bytes_used <= 3 * one
    assert cache.get(keys[0], 10) is not None and cache.get(keys[1], 10) is None and cache.get(keys[2], 10) is None
    cache.put(keys[5], torch.zeros(100, 32))  # larger than the whole bound: not stored
    assert cache.get(keys[5], 100) is None


def test_damaged_cache_file_is_a_miss_and_removed(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    key = window_key(torch.arange(4).numpy())
    cache.put(key, torch.ones(4, 32))
    path = cache.dir / f"{key}.act"
    path.write_bytes(path.read_bytes()[:-8])  # truncated, as by a full disk
    assert make_cache(tmp_path).get(key, 4) is None
    assert not path.exists()


def test_cache_files_are_private_and_clear_removes_them(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        cache = make_cache(tmp_path)
        cache.put(window_key(torch.arange(4).numpy()), torch.ones(4, 32))
    finally:
        os.umask(old)
    for p in [tmp_path / "act", cache.dir]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    for p in cache.dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert clear(tmp_path / "act") == 1
    assert not (tmp_path / "act").exists()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fa", [False, True])
@pytest.mark.parametrize("at,micro", [(0, 5), (2, 2), (2, 1)])
def test_batched_perturbations_give_the_sequential_losses(n: int, fa: bool, at: int, micro: int) -> None:
    from pocketd.trainer.config import Perturbation
    from pocketd.trainer.multi import estimate_batched
    from pocketd.trainer.zo import Restore, estimate

    model, _ = model_with_top_lora()
    params = trainable_set(model, Trainable.LORA, lora_fa=fa)
    batch = padded_batch()
    parts = Parts.of(model)
    prefixes = batch_prefixes(parts, batch, at, micro)
    seeds = [11, 12, 13][:n]
    before = params.sha256()
    batched = estimate_batched(model, params, parts, prefixes, seeds, 1e-2, Perturbation.RADEMACHER, 16)
    assert params.sha256() == before  # the live weights are never touched
    seq = estimate(params, lambda: mean_loss(model, batch, micro_batch=micro, chunk_tokens=16), seeds, 1e-2,
                   Restore.SNAPSHOT, Perturbation.RADEMACHER)
    assert batched.finite and len(batched.grads) == n
    assert batched.loss_plus == pytest.approx(seq.loss_plus, rel=1e-5)
    assert batched.loss_minus == pytest.approx(seq.loss_minus, rel=1e-5)
    assert batched.grads == pytest.approx(seq.grads, rel=1e-2, abs=1e-3)
    assert all(m.copies is None for m in lora_modules(model).values())
