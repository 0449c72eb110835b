"""Frozen-prefix sharing: run the frozen bottom of the model once per batch, only the top per evaluation.

When only the top decoder layers carry trainable tensors, the hidden states entering
the first trainable layer are the same for every perturbation of a step. `run_prefix`
computes them once (capturing exactly what the backbone passes to that layer: the
hidden states and the layer keyword arguments such as the attention mask and the
rotary position embeddings), and `suffix_loss_sum` runs the remaining layers, the
final norm and the chunked LM head from there. Nothing is model-specific beyond the
usual Hugging Face decoder layout: a backbone with a layer list, a final norm and an
output embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import TrainerError
from .lora import decoder_layers
from .loss import Batch, head_loss_sum

if TYPE_CHECKING:
    from .actcache import ActivationCache


class PrefixUnsupported(TrainerError):
    """The model's layout does not allow running its top layers on their own."""


_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


@dataclass(frozen=True)
class Parts:
    """A causal LM taken apart: backbone, its layer list, final norm and LM head."""

    backbone: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module

    @classmethod
    def of(cls, model: nn.Module) -> "Parts":
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        norm = next((getattr(backbone, n) for n in _NORM_NAMES if isinstance(getattr(backbone, n, None), nn.Module)),
                    None)
        if head is None or norm is None:
            raise PrefixUnsupported(f"{type(model).__name__}: no output embedding or final norm found")
        return cls(backbone, decoder_layers(backbone), norm, head)


@dataclass(frozen=True)
class Prefix:
    """One micro-batch stopped at the input of decoder layer `at`."""

    hidden: torch.Tensor  # [b, T, H] input of layer `at` (at == L: of the final norm)
    layer_kwargs: dict[str, Any]  # what the backbone passes to every layer (mask, position embeddings, ...)
    input_ids: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor  # [b, T]
    at: int


class _Captured(Exception):
    """Raised by the capture hook to stop the backbone at the chosen layer."""


@torch.inference_mode()
def run_prefix(parts: Parts, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: int) -> Prefix:
    """Run the backbone up to (not including) layer `at` and capture that layer's inputs."""
    if not 0 <= at <= len(parts.layers):
        raise ValueError(f"prefix layer {at} is outside 0..{len(parts.layers)} ({len(parts.layers)}: the final norm)")
    got: dict[str, Any] = {}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        got["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        got["kwargs"] = kwargs
        raise _Captured

    stop_at = parts.layers[at] if at < len(parts.layers) else parts.norm  # at == L: the final norm's input
    handle = stop_at.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        parts.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in got:
        raise PrefixUnsupported(f"the backbone never called decoder layer {at}")
    return Prefix(got["hidden"], got["kwargs"], input_ids, attention_mask, at)


@torch.inference_mode()
def run_suffix(parts: Parts, prefix: Prefix) -> torch.Tensor:
    """Final (normed) hidden states [b, T, H] from a prefix, through layers at..L-1."""
    h = prefix.hidden
    for layer in parts.layers[prefix.at :]:
        out = layer(h, **prefix.layer_kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return parts.norm(h)


def suffix_loss_sum(parts: Parts, prefixes: Sequence[Prefix], chunk_tokens: int) -> tuple[float, int]:
    """Summed next-token cross-entropy over prefixes (micro-batches) and the number of targets."""
    total, count = 0.0, 0
    for p in prefixes:
        s, n = head_loss_sum(parts.head, run_suffix(parts, p), p.input_ids, p.attention_mask, chunk_tokens)
        total += s
        count += n
    return total, count


def suffix_mean_loss(parts: Parts, prefixes: Sequence[Prefix], chunk_tokens: int) -> float:
    total, count = suffix_loss_sum(parts, prefixes, chunk_tokens)
    return total / count if count else float("nan")


def batch_prefixes(parts: Parts, batch: Batch, at: int, micro_batch: int,
                   cache: "ActivationCache | None" = None) -> list[Prefix]:
    """The batch's prefixes, one per micro-batch; windows found in `cache` skip the bottom layers."""
    out = []
    for s in range(0, len(batch), micro_batch):
        ids, mask = batch.input_ids[s : s + micro_batch], batch.attention_mask[s : s + micro_batch]
        out.append(run_prefix(parts, ids, mask, at) if cache is None or at == 0 else _cached_prefix(parts, ids, mask, at, cache))
    return out


@torch.inference_mode()
def _cached_prefix(parts: Parts, ids: torch.Tensor, mask: torch.Tensor, at: int, cache: "ActivationCache") -> Prefix:
    from .actcache import window_key

    lens = [int(n) for n in mask.sum(dim=1)]  # right-padded: real tokens are ids[i, :lens[i]]
    keys = [window_key(ids[i, : lens[i]].numpy()) for i in range(len(lens))]
    found = [cache.get(k, n) for k, n in zip(keys, lens)]
    missing = [i for i, h in enumerate(found) if h is None]
    if len(missing) == len(lens):
        full = run_prefix(parts, ids, mask, at)
        for i, (k, n) in enumerate(zip(keys, lens)):
            cache.put(k, full.hidden[i, :n])
        return full
    frame = run_prefix(parts, ids, mask, 0)  # embeddings only: the layer kwargs for this padding
    hidden = torch.zeros_like(frame.hidden)  # [b, T, H]; padded positions never reach the loss
    if missing:
        width = max(lens[i] for i in missing)
        sub = run_prefix(parts, ids[missing, :width], mask[missing, :width], at)
        for row, i in enumerate(missing):
            found[i] = sub.hidden[row, : lens[i]]
            cache.put(keys[i], found[i])
    for i, h in enumerate(found):
        if h is not None:  # every row was found or has just been computed
            hidden[i, : lens[i]] = h.to(hidden.dtype)
    return Prefix(hidden, frame.layer_kwargs, ids, mask, at)


def first_trainable_layer(model: nn.Module, tensors: Sequence[torch.Tensor]) -> int:
    """Index of the lowest decoder layer holding any trainable tensor (0 if one lies outside the layers)."""
    layers = decoder_layers(model)
    owners: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            owners[p.data_ptr()] = i
    lowest = len(layers)
    for t in tensors:
        idx = owners.get(t.data_ptr())
        if idx is None:
            return 0
        lowest = min(lowest, idx)
    return lowest if lowest < len(layers) else 0
