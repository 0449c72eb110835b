"""Block expansion (LLaMA Pro, Wu et al. 2024): append k decoder layers that start as the identity.

Each new layer is a copy of the base's last decoder layer whose two residual-branch
output projections (the attention output and the MLP output: Llama's `o_proj` and
`down_proj`) are zeroed, so the layer adds nothing to its input and the expanded model
computes exactly what the base computes. Training the new layers (and only them) then
changes the model from there. The result is an ordinary model of the same architecture
with L + k layers: the config's layer count is raised with it, so transformers'
`save_pretrained` / `from_pretrained` and a GGUF writer see a standard model.

Whether the zeroed projections really make a layer the identity is checked numerically
on the layer itself (not assumed from the names): an architecture where it does not
hold is refused (SpecError) before the model is changed.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .errors import SpecError
from .lora import decoder_layers

log = logging.getLogger(__name__)

# The residual-branch output projections of a Llama-style decoder layer, relative to the layer.
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


def identity_block(last: nn.Module, layer_idx: int) -> nn.Module:
    """A copy of decoder layer `last` with its residual-branch outputs zeroed (the identity), frozen, numbered
    `layer_idx` (the KV-cache slot its attention uses)."""
    block = copy.deepcopy(last)
    for path in OUTPUT_PROJECTIONS:
        try:
            proj = block.get_submodule(path)
        except AttributeError:
            proj = None
        if not isinstance(proj, nn.Linear):
            raise SpecError(f"side part block: the base's decoder layers have no linear {path}; "
                            "block expansion supports Llama-style layers only")
        with torch.no_grad():
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    attn = block.get_submodule("self_attn")
    if hasattr(attn, "layer_idx"):
        attn.layer_idx = layer_idx
    if hasattr(block, "layer_idx"):
        block.layer_idx = layer_idx
    block.requires_grad_(False)
    return block


def expand(model: nn.Module, k: int) -> list[nn.Module]:
    """Append k identity blocks after the model's last decoder layer, in place; return them (bottom first).

    The config's `num_hidden_layers` (and `layer_types`, if the config lists one per layer) grows by k.
    """
    if not 1 <= k <= 64:
        raise SpecError(f"side part block: {k} blocks is outside 1..64")
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise SpecError(str(e)) from None
    n = len(layers)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != n:
        raise SpecError(f"side part block: the model's config does not count its {n} decoder layers")
    blocks = [identity_block(layers[n - 1], n + i) for i in range(k)]
    for b in blocks:
        layers.append(b)
    config.num_hidden_layers = n + k
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == n:
        config.layer_types = types + [types[-1]] * k
    log.info("block expansion: %d decoder layers appended (identity at the start) to the base's %d", k, n)
    return blocks


def check_identity(block: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> None:
    """SpecError unless `block` returns its input `hidden` [b, T, H] unchanged (a fresh expansion block)."""
    with torch.inference_mode():
        out = block(hidden, **layer_kwargs)
        out = out[0] if isinstance(out, tuple) else out
    if not torch.equal(out, hidden):
        raise SpecError("side part block: a copied layer with zeroed output projections is not the identity "
                        "for this architecture; block expansion supports Llama-style layers only")
