"""The zeroth-order step (MeZO / central-difference SPSA with the seed trick). Pure: no I/O.

For trainable tensors theta and a seed s, z ~ N(0, I) (or Rademacher, +-1) comes
from a private torch.Generator seeded with s (never the global RNG), drawn tensor
by tensor in the TrainableSet's fixed order. One step with seeds s_1..s_n on one batch:

    g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)      (rounded to float32, as logged)
    theta <- theta - (lr / n) * sum_i g_i z_i

Only (s_i, g_i, lr) are logged; `apply_update` is the whole of replay.

Restoring theta after the two evaluations is exact: `Restore.SNAPSHOT` copies the
trainable tensors (cheap for LoRA); `Restore.DANCE` is MeZO's in-place
+eps, -2eps, +eps (no extra memory, for full fine-tuning), which does not return
to the same floats, so replay repeats the same dance (`replay_step`) and stays
bit-exact. The dance's drift per step is measured by tests (see tests/test_zo.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from pocketd.store.log import f32  # pocketd's one float32 rounding (what the log stores)

from .config import Perturbation
from .params import TrainableSet

GAUSSIAN = Perturbation.GAUSSIAN


class Restore(str, Enum):
    SNAPSHOT = "snapshot"  # copy the trainable tensors, copy back: exact, memory = trainable size
    DANCE = "dance"  # +eps, -2eps, +eps in place: no memory, replay repeats it


SPARSE_DENSITY = 0.1  # Perturbation.SPARSE: fraction of coordinates perturbed per seed


def draw(shape: torch.Size, gen: torch.Generator, dist: Perturbation) -> torch.Tensor:
    """One tensor of z (float32) from the generator."""
    if dist is Perturbation.RADEMACHER:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    if dist is Perturbation.SPARSE:  # a random mask from the same generator; E[z z^T] stays I
        keep = torch.rand(shape, generator=gen, dtype=torch.float32) < SPARSE_DENSITY
        z.mul_(keep).mul_(1.0 / math.sqrt(SPARSE_DENSITY))
    return z


@torch.no_grad()
def perturb(params: TrainableSet, seed: int, scale: float, dist: Perturbation = GAUSSIAN) -> None:
    """theta += scale * z(seed), z drawn tensor by tensor from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    for t in params.tensors:
        z = draw(t.shape, gen, dist)  # same shape as t
        t.add_(z.to(t.dtype), alpha=scale)


@dataclass(frozen=True)
class StepResult:
    grads: tuple[float, ...]  # projected gradient per seed (float32-rounded); () if not finite
    loss_plus: tuple[float, ...]
    loss_minus: tuple[float, ...]
    finite: bool

    @property
    def loss(self) -> float:
        """The step's loss estimate: mean of L(+) and L(-) over perturbations."""
        vals = self.loss_plus + self.loss_minus
        return sum(vals) / len(vals)


def estimate(
    params: TrainableSet, loss_fn: Callable[[], float], seeds: Sequence[int], eps: float, restore: Restore,
    dist: Perturbation = GAUSSIAN,
) -> StepResult:
    """Evaluate the projected gradients for `seeds` at theta; theta is restored afterwards."""
    saved = params.snapshot() if restore is Restore.SNAPSHOT else None
    grads: list[float] = []
    plus: list[float] = []
    minus: list[float] = []
    for seed in seeds:
        perturb(params, seed, eps, dist)
        lp = loss_fn()
        if saved is not None:
            params.restore(saved)
            perturb(params, seed, -eps, dist)
        else:
            perturb(params, seed, -2 * eps, dist)
        lm = loss_fn()
        if saved is not None:
            params.restore(saved)
        else:
            perturb(params, seed, eps, dist)
        plus.append(lp)
        minus.append(lm)
        if not (math.isfinite(lp) and math.isfinite(lm)):
            return StepResult((), tuple(plus), tuple(minus), False)
        grads.append(f32((lp - lm) / (2 * eps)))
    return StepResult(tuple(grads), tuple(plus), tuple(minus), True)


def apply_update(params: TrainableSet, seeds: Sequence[int], grads: Sequence[float], lr: float,
                 dist: Perturbation = GAUSSIAN) -> None:
    """theta <- theta - (lr / n) * sum_i g_i z_i: the step's update, and all that replay does."""
    n = len(seeds)
    for seed, g in zip(seeds, grads):
        perturb(params, seed, -lr * g / n, dist)


def replay_step(
    params: TrainableSet, seeds: Sequence[int], grads: Sequence[float], lr: float, eps: float, restore: Restore,
    dist: Perturbation = GAUSSIAN,
) -> None:
    """Redo a logged step's arithmetic exactly as training did it."""
    if restore is Restore.DANCE:
        for seed in seeds:
            perturb(params, seed, eps, dist)
            perturb(params, seed, -2 * eps, dist)
            perturb(params, seed, eps, dist)
    apply_update(params, seeds, grads, lr, dist)
