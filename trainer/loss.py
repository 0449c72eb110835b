"""The language-model loss without ever holding [batch, seq, vocab] logits.

The backbone runs in micro-batches; the LM head and cross-entropy run over
chunks of target positions, so peak memory depends on the chunk and
micro-batch sizes, not on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    example_ids: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def n_targets(self) -> int:
        """Number of predicted positions (every real token after the first)."""
        return int(self.attention_mask[:, 1:].sum().item())


@torch.inference_mode()
def head_loss_sum(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  chunk_tokens: int) -> tuple[float, int]:
    """Summed cross-entropy of the LM head on final hidden states [b, T, H] against ids [b, T]."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b*(T-1), H]
    targets = ids[:, 1:].reshape(-1)  # [b*(T-1)]
    keep = mask[:, 1:].reshape(-1).bool()
    h, targets = h[keep], targets[keep]  # [N, H], [N]
    total = 0.0
    for c in range(0, targets.shape[0], chunk_tokens):
        logits = head(h[c : c + chunk_tokens]).float()  # [n, V]: the only logits alive at once
        total += float(F.cross_entropy(logits, targets[c : c + chunk_tokens], reduction="sum"))
    return total, int(targets.shape[0])


@torch.inference_mode()
def loss_sum(model: nn.Module, batch: Batch, *, micro_batch: int, chunk_tokens: int) -> tuple[float, int]:
    """Summed next-token cross-entropy over the batch and the number of target tokens."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    head = model.get_output_embeddings()
    total = 0.0
    count = 0
    for start in range(0, len(batch), micro_batch):
        ids = batch.input_ids[start : start + micro_batch]  # [b, T]
        mask = batch.attention_mask[start : start + micro_batch]  # [b, T]
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [b, T, H]
        s, n = head_loss_sum(head, hidden, ids, mask, chunk_tokens)
        total += s
        count += n
    return total, count


def mean_loss(model: nn.Module, batch: Batch, *, micro_batch: int, chunk_tokens: int) -> float:
    total, count = loss_sum(model, batch, micro_batch=micro_batch, chunk_tokens=chunk_tokens)
    return total / count if count else float("nan")
