"""The side method's loss and gradient: backprop through the top of the model only, chunked LM head.

Given prefixes (the frozen bottom's output, computed once or read from the cache),
the trainable suffix runs with autograd: the adapted top layers (if any), the final
norm (with the side MLP's hook, if any), then the frozen LM head and cross-entropy
over chunks of target positions. The final hidden states are detached into a leaf;
each chunk's logits [n, V] are built, back-propagated into that leaf and freed, so
[batch, seq, vocab] logits never exist, in the forward or the backward pass. One
backward from the hidden states then carries the summed gradient into the suffix.
No optimizer, no I/O: the session owns those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .prefix import Parts, Prefix


def _plain(x: Any) -> Any:
    """A copy of x whose tensors may be saved for backward (prefixes are made in inference mode)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def suffix_hidden(parts: Parts, prefix: Prefix) -> torch.Tensor:
    """Final (normed, side-adjusted) hidden states [b, T, H] from a prefix, with autograd."""
    h = _plain(prefix.hidden)  # [b, T, H]
    kwargs = _plain(prefix.layer_kwargs)
    for layer in parts.layers[prefix.at :]:
        out = layer(h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return parts.norm(h)


def head_ce_backward(head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     chunk_tokens: int, scale: float) -> tuple[float, int]:
    """Summed cross-entropy of the frozen head on hidden [b, T, H]; back-propagates scale * sum into hidden's
    graph. Returns (summed loss, number of targets)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b*(T-1), H]
    targets = ids[:, 1:].reshape(-1)  # [b*(T-1)]
    keep = mask[:, 1:].reshape(-1).bool()
    h, targets = h[keep], targets[keep]  # [N, H], [N]
    leaf = h.detach().requires_grad_(True)  # [N, H]: chunk gradients accumulate here
    total = 0.0
    for c in range(0, targets.shape[0], chunk_tokens):
        logits = head(leaf[c : c + chunk_tokens]).float()  # [n, V]: the only logits alive at once
        loss = F.cross_entropy(logits, targets[c : c + chunk_tokens], reduction="sum")
        (loss * scale).backward()  # frees this chunk's logits and their graph
        total += float(loss.detach())
    if leaf.grad is not None and h.requires_grad:
        h.backward(leaf.grad)  # [N, H] -> through the suffix into the side part
    return total, int(targets.shape[0])


def loss_backward(parts: Parts, prefixes: Sequence[Prefix], chunk_tokens: int) -> tuple[float, int]:
    """Mean next-token loss over all prefixes' targets; its gradient is accumulated into the side part.

    Returns (mean loss, number of targets); the caller zeroes gradients before and steps after.
    """
    count = sum(int(p.attention_mask[:, 1:].sum()) for p in prefixes)
    if count == 0:
        return float("nan"), 0
    total = 0.0
    for p in prefixes:
        s, _ = head_ce_backward(parts.head, suffix_hidden(parts, p), p.input_ids, p.attention_mask, chunk_tokens,
                                1.0 / count)
        total += s
    return total / count, count
