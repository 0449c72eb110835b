"""Putting a stored checkpoint of any method on a freshly loaded base (generate, eval, export, verify)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pocketd.store import Checkpoint, Store

from .config import TrainerConfig
from .method import Progress, check_base
from .params import TrainableSet
from .registry import method_of


def apply_checkpoint(store: Store, model: nn.Module, ck: Checkpoint, fingerprint: str, *, verify: bool = False,
                     progress: Progress | None = None, snapshots: bool = True) -> TrainableSet:
    """Put a checkpoint's trained tensors on a freshly loaded base model, as its method does (a seed log
    is replayed; stored tensors are loaded and checked against their hash); return them.

    BaseMismatch if the checkpoint belongs to another base; ReplayMismatch if it does not verify
    (with `verify`: every stored hash; without: the last one). With `snapshots` (the default) a seed log
    starts from its newest verified snapshot; without, it is replayed whole (`checkpoint verify`).
    """
    check_base(ck, fingerprint)
    method = method_of(ck)
    part = method.attach(model, method.spec_from_dict(ck.spec))
    method.load(store, part, ck, fingerprint, verify=verify, progress=progress, snapshots=snapshots)
    return part.params


def load_checkpoint(store: Store, cfg: TrainerConfig, cache_dir: Path, checkpoint_id: int | None = None,
                    *, verify: bool = False, progress: Progress | None = None,
                    snapshots: bool = True) -> tuple[Any, TrainableSet | None, Checkpoint | None]:
    """Load the base and rebuild a checkpoint on it (default: the current one).

    Returns (base, trainable set or None, checkpoint or None); with no checkpoint
    the base is returned unchanged.
    """
    from .model import load_base

    base = load_base(cfg.model, cache_dir, cfg.dtype)
    ck = store.log.get(checkpoint_id) if checkpoint_id is not None else store.log.current()
    if ck is None:
        return base, None, None
    return base, apply_checkpoint(store, base.model, ck, base.fingerprint, verify=verify, progress=progress,
                                  snapshots=snapshots), ck


def load_current(store: Store, cfg: TrainerConfig, cache_dir: Path) -> tuple[Any, Any, Checkpoint | None]:
    """(base, model with the current checkpoint applied or None, checkpoint or None): for generate/export."""
    base, _params, ck = load_checkpoint(store, cfg, cache_dir)
    return base, (base.model if ck is not None else None), ck
