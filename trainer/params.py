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


def trainable_set(model: nn.Module, trainable: Trainable) -> TrainableSet:
    """LoRA: every adapter's A then B, by module path. Full: every distinct parameter (tied ones once)."""
    if trainable is Trainable.LORA:
        mods = lora_modules(model)
        names, tensors = [], []
        for path in sorted(mods):
            names += [f"{path}.lora_A", f"{path}.lora_B"]
            tensors += [mods[path].lora_A.data, mods[path].lora_B.data]
        return TrainableSet(tuple(names), tuple(tensors))
    named = list(model.named_parameters())  # deduplicates tied parameters
    return TrainableSet(tuple(n for n, _ in named), tuple(p.data for _, p in named))
