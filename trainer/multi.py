"""Batched perturbations (MobiZO): all 2n evaluations of a step in one forward.

The trainable LoRA tensors are stacked into P = 2n perturbed copies
(theta + eps z_1, theta - eps z_1, ..., theta - eps z_n, z drawn exactly as
`zo.perturb` draws it), the step's prefix (hidden states entering the first
trainable layer) is repeated P times along the batch, and each LoraLinear applies
copy i to rows i*b..(i+1)*b. One pass through the top layers then gives every
L(theta +- eps z_i). The live weights are never modified, so nothing needs restoring.
Only the log's (seed, g, lr) matters for replay, which is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .config import Perturbation
from .lora import lora_modules
from .loss import head_loss_sum
from .params import TrainableSet
from .prefix import Parts, Prefix, run_suffix
from .zo import StepResult, draw, f32


def supported(params: TrainableSet) -> bool:
    """Batched perturbations need LoRA tensors (full fine-tuning would need P copies of the model)."""
    return bool(params.names) and all(n.endswith((".lora_A", ".lora_B")) for n in params.names)


@contextmanager
def perturbed_copies(model: nn.Module, params: TrainableSet, seeds: Sequence[int], eps: float,
                     dist: Perturbation) -> Iterator[int]:
    """Install P = 2 * len(seeds) adapter copies (+eps z_i, -eps z_i, in seed order); yields P."""
    if not supported(params):
        raise ValueError("batched perturbations need trainable LoRA tensors")
    z_by_tensor: list[list[torch.Tensor]] = [[] for _ in params.tensors]
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        for i, t in enumerate(params.tensors):
            z_by_tensor[i].append(draw(t.shape, gen, dist).to(t.dtype))
    stacked: dict[str, torch.Tensor] = {}
    for name, t, zs in zip(params.names, params.tensors, z_by_tensor):
        copies = [t + sign * eps * z for z in zs for sign in (1.0, -1.0)]
        stacked[name] = torch.stack(copies)  # [P, *t.shape]
    p = 2 * len(seeds)
    mods = lora_modules(model)
    try:
        for path, m in mods.items():
            a = stacked.get(f"{path}.lora_A", m.lora_A.data.expand(p, *m.lora_A.shape))
            b = stacked.get(f"{path}.lora_B", m.lora_B.data.expand(p, *m.lora_B.shape))
            m.copies = (a, b)
        yield p
    finally:
        for m in mods.values():
            m.copies = None


def repeat_prefix(prefix: Prefix, p: int) -> Prefix:
    """The prefix repeated p times along the batch (layer kwargs with a batch dimension too)."""
    b = prefix.hidden.shape[0]

    def rep(x: object) -> object:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == b and b > 1:
            return x.repeat(p, *([1] * (x.dim() - 1)))
        if isinstance(x, tuple):
            return tuple(rep(v) for v in x)
        return x

    kwargs = {k: rep(v) for k, v in prefix.layer_kwargs.items()}  # with b == 1, leading 1s broadcast
    return replace(prefix, hidden=prefix.hidden.repeat(p, 1, 1), layer_kwargs=kwargs,
                   input_ids=prefix.input_ids.repeat(p, 1), attention_mask=prefix.attention_mask.repeat(p, 1))


@torch.inference_mode()
def copy_losses(parts: Parts, prefixes: Sequence[Prefix], p: int, chunk_tokens: int) -> list[float]:
    """Mean loss of each of the p installed copies over the step's micro-batches."""
    totals, counts = [0.0] * p, [0] * p
    for pre in prefixes:
        b = pre.hidden.shape[0]
        hidden = run_suffix(parts, repeat_prefix(pre, p))  # [p*b, T, H]
        for i in range(p):
            s, n = head_loss_sum(parts.head, hidden[i * b : (i + 1) * b], pre.input_ids, pre.attention_mask,
                                 chunk_tokens)
            totals[i] += s
            counts[i] += n
    return [t / c if c else float("nan") for t, c in zip(totals, counts)]


def estimate_batched(model: nn.Module, params: TrainableSet, parts: Parts, prefixes: Sequence[Prefix],
                     seeds: Sequence[int], eps: float, dist: Perturbation, chunk_tokens: int) -> StepResult:
    """`zo.estimate`'s result, from one batched pass instead of 2n sequential ones."""
    with perturbed_copies(model, params, seeds, eps, dist) as p:
        losses = copy_losses(parts, prefixes, p, chunk_tokens)
    plus, minus = tuple(losses[0::2]), tuple(losses[1::2])
    if not all(torch.isfinite(torch.tensor(losses)).tolist()):
        return StepResult((), plus, minus, False)
    return StepResult(tuple(f32((lp - lm) / (2 * eps)) for lp, lm in zip(plus, minus)), plus, minus, True)
