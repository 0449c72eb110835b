"""Low-rank adapters, small and explicit (no PEFT at train time; export writes PEFT format).

Targets are chosen by tensor properties: every nn.Linear inside a decoder layer
(a module that is an element of the model's layer list), filtered by whether its
parent module is an attention or a feed-forward block, and optionally only in
the top N layers. The LM head and embeddings are never adapted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .config import LoraTargets, TrainerConfig


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: str  # LoraTargets value
    layers: int | None  # top N decoder layers, None = all
    seed: int  # A-matrix init seed
    fa: bool = False  # LoRA-FA: A frozen, only B trained

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> "LoraSpec":
        return cls(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.value, cfg.lora_layers, cfg.lora_seed, cfg.lora_fa)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.fa:
            del d["fa"]  # specs written before LoRA-FA existed stay equal
        return d


class LoraLinear(nn.Module):
    """y = base(x) + scale * (x @ A^T) @ B^T, with A [r, in] and B [out, r] (B starts at zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        # Kaiming-uniform like PEFT's default, from a private generator.
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a, requires_grad=False)  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank), requires_grad=False)  # [out, r]
        # Batched perturbations (trainer.multi): P adapter copies, the batch split into P equal parts.
        self.copies: tuple[torch.Tensor, torch.Tensor] | None = None  # A [P, r, in], B [P, out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.copies is not None:
            return self.base(x) + (self.scale * self._copies_delta(x)).to(x.dtype)
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (self.scale * delta).to(x.dtype)

    def _copies_delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.copies  # type: ignore[misc]  # [P, r, in], [P, out, r]
        p = a.shape[0]
        xs = x.to(a.dtype).reshape(p, -1, x.shape[-1])  # [P, (B/P)*T, in]: copy i sees rows i*B/P..
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # [P, (B/P)*T, out]
        return delta.reshape(*x.shape[:-1], b.shape[1])

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.scale * (self.lora_B @ self.lora_A)).to(self.base.weight.dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the longest nn.ModuleList in it."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("model has no layer list (nn.ModuleList) to put adapters in")
    return max(lists, key=len)


def _block_kind(parent: nn.Module) -> str | None:
    name = type(parent).__name__.lower()
    if "attention" in name or "attn" in name:
        return "attention"
    if "mlp" in name or "feedforward" in name or "ffn" in name:
        return "mlp"
    return None


def target_paths(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Module paths of the linear layers that get adapters, in model order."""
    layers = decoder_layers(model)
    first = 0 if spec.layers is None else max(0, len(layers) - spec.layers)
    chosen = {id(layers[i]) for i in range(first, len(layers))}
    paths: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        if id(layer) not in chosen:
            continue
        for parent in layer.modules():
            kind = _block_kind(parent)
            if kind is None or (spec.targets != LoraTargets.ALL.value and kind != spec.targets):
                continue
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    paths.append(f"{names[id(parent)]}.{child_name}")
    return paths


def attach_lora(model: nn.Module, spec: LoraSpec) -> dict[str, LoraLinear]:
    """Replace the target linears by LoraLinear in place; A initialized from spec.seed."""
    gen = torch.Generator().manual_seed(spec.seed)
    out: dict[str, LoraLinear] = {}
    for path in target_paths(model, spec):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        lora = LoraLinear(base, spec.rank, spec.alpha, gen)
        setattr(parent, child, lora)
        out[path] = lora
    if not out:
        raise ValueError(f"no linear layers match lora_targets={spec.targets!r}")
    return out


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear and put the plain nn.Linear back (in place)."""
    for path, lora in lora_modules(model).items():
        parent_path, _, child = path.rpartition(".")
        base = lora.base
        with torch.no_grad():
            base.weight.copy_(lora.merged_weight())
        setattr(model.get_submodule(parent_path), child, base)
    return model
