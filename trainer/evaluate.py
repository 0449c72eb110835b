"""Validation loss and perplexity on a fixed, deterministic set of held-out windows."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from torch import nn

from .data import Item, collate
from .loss import loss_sum
from .stopping import PrepPhase, check_stop


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token cross-entropy (nats)
    tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if math.isfinite(self.loss) else float("inf")


def eval_items(items: list[Item], limit: int) -> list[Item]:
    """The first `limit` windows in example order: the same set every time for the same data."""
    return items[:limit]


def evaluate(
    model: nn.Module, items: list[Item], *, pad_id: int, batch_size: int, micro_batch: int, chunk_tokens: int,
    stop: threading.Event | None = None,
) -> EvalResult:
    """Mean next-token loss of `model` over `items`; Stopped if `stop` is set (checked between batches)."""
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        check_stop(stop, PrepPhase.EVALUATING)
        batch = collate(items[start : start + batch_size], pad_id)
        s, n = loss_sum(model, batch, micro_batch=micro_batch, chunk_tokens=chunk_tokens)
        total += s
        count += n
    return EvalResult(total / count if count else float("nan"), count, len(items))
