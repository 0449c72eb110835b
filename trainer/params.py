"""The trainable tensors of a model, in a fixed order, and their hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .config import Trainable
from .lora import lora_modules


@dataclass(frozen=True)
class TrainableSet:
    """Named trainable tensors in replay order. The ZO step reads and writes them in place."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def sha256(self) -> str:
        """Hash of the exact bytes of every tensor (names, shapes, dtypes and values)."""
        h = hashlib.sha256()
        for name, t in zip(self.names, self.tensors):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self.tensors, saved):
                t.copy_(s)


def trainable_set(model: nn.Module, trainable: Trainable, *, lora_fa: bool = False) -> TrainableSet:
    """LoRA: every adapter's A then B (only B with `lora_fa`), by module path. Full: every distinct parameter."""
    if trainable is Trainable.LORA:
        mods = lora_modules(model)
        names, tensors = [], []
        for path in sorted(mods):
            if not lora_fa:
                names.append(f"{path}.lora_A")
                tensors.append(mods[path].lora_A.data)
            names.append(f"{path}.lora_B")
            tensors.append(mods[path].lora_B.data)
        return TrainableSet(tuple(names), tuple(tensors))
    named = list(model.named_parameters())  # deduplicates tied parameters
    return TrainableSet(tuple(n for n, _ in named), tuple(p.data for _, p in named))
