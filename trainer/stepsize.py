"""The step size of each ZO step: the update rule and the divergence guard. Pure: no I/O, no torch.

Whatever is decided here ends up in one number per step, the learning rate stored in
the log, so replay never needs this module's state: it is exact by construction.

* `StepRule.SGD`: lr as configured (MeZO's rule; the right lr depends on the loss
  scale and the dimension, which users cannot tune).
* `StepRule.NORMALIZED`: lr / sqrt(EMA of g^2), so |lr_eff * g| is about lr: each
  step moves every coordinate by about lr * |z|, whatever the size of the raw
  projected gradients. This makes one lr work across models and data.
* The guard: the mean training loss of the first `warm` steps is the reference; if
  the running (EMA) loss later rises `tolerance` above it, the step size is halved
  and the reference re-measured. A diverging session backs off instead of
  producing a useless checkpoint (the promotion gate stays the last line).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import StepRule


@dataclass
class StepSizer:
    rule: StepRule
    guard: bool = True
    g2_beta: float = 0.9  # EMA of squared projected gradients (normalized rule)
    loss_beta: float = 0.9  # EMA of step losses (guard)
    warm: int = 20  # steps that set the guard's reference loss
    tolerance: float = 0.10  # relative rise of the running loss that halves the step
    min_scale: float = 1.0 / 1024
    scale: float = 1.0  # product of the guard's halvings
    backoffs: int = 0
    _g2: float | None = None
    _loss_ema: float | None = None
    _warm_losses: list[float] = field(default_factory=list)
    _reference: float | None = None

    def lr(self, base_lr: float, grads: Sequence[float]) -> float:
        """The step's effective learning rate, given its projected gradients (updates the RMS state)."""
        lr = base_lr * self.scale
        if self.rule is StepRule.NORMALIZED:
            g2 = sum(g * g for g in grads) / max(len(grads), 1)
            self._g2 = g2 if self._g2 is None else self.g2_beta * self._g2 + (1 - self.g2_beta) * g2
            lr /= math.sqrt(self._g2) if self._g2 > 0 else 1.0
        return lr

    def observe(self, loss: float) -> bool:
        """Feed a step's training loss; True when the guard halved the step size."""
        if not (self.guard and math.isfinite(loss)):
            return False
        self._loss_ema = loss if self._loss_ema is None else self.loss_beta * self._loss_ema + (1 - self.loss_beta) * loss
        if self._reference is None:
            self._warm_losses.append(loss)
            if len(self._warm_losses) >= self.warm:
                self._reference = sum(self._warm_losses) / len(self._warm_losses)
            return False
        if self._loss_ema > self._reference * (1 + self.tolerance) and self.scale > self.min_scale:
            self.scale /= 2
            self.backoffs += 1
            self._loss_ema, self._reference, self._warm_losses = None, None, []
            return True
        return False
