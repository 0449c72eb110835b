"""The `side` method: AdamW on a small trainable part above cached frozen activations; tensor checkpoints.

The part itself (its kinds, attaching, packing and loading its tensors) lives in
trainer.side, the backward pass in trainer.backprop, the file format in
trainer.sidefile. A checkpoint of this method is the trained tensors themselves
(safetensors bytes in the store), committed together with the steps' documents and
trained-example counts every `side_save_every_s` seconds and at the end: a killed
session loses at most that much training; the previous save, and the parent
checkpoint, stay loadable. The optimizer's moments are not stored: a resumed
candidate starts them afresh (after a short warm-up). Forget cannot drop single
steps from tensors: a checkpoint that saw a forgotten document is dropped whole.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pocketd.store import Checkpoint, Status, Store

from .. import sidefile
from ..actcache import ActivationCache
from ..backprop import loss_backward
from ..config import Method, SidePart, TrainerConfig, activation_cache_dir
from ..data import Item, collate
from ..errors import CheckpointFileError, SpecError
from ..forget import fall_back
from ..lora import LoraSpec
from ..method import FileView, ForgetPlan, ForgetResult, ModelShape, Progress, SessionContext, StepOutcome
from ..prefix import Parts, batch_prefixes
from ..side import PARTS, Attached, SideSpec, attach_side, load_side_state, load_verified_state, pack_state
from ..sidefile import SideFile

log = logging.getLogger(__name__)

WARMUP_STEPS = 10  # linear learning-rate warm-up of a fresh optimizer
CLIP_NORM = 1.0  # gradient-norm clipping


def side_estimator(cfg: TrainerConfig) -> dict[str, Any]:
    """The optimizer config recorded in a side checkpoint."""
    return {"optimizer": "adamw", "lr": cfg.side_lr, "betas": [0.9, 0.999], "weight_decay": 0.0,
            "clip_norm": CLIP_NORM, "warmup_steps": WARMUP_STEPS, "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "dtype": cfg.dtype.value}


class SideTrainer:
    """One session of AdamW steps on the side part: it owns the optimizer (fresh each session), the
    activation cache and the steps not yet saved (their documents and examples)."""

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.cfg: TrainerConfig = ctx.job.trainer
        self.att: Attached = ctx.part  # type: ignore[assignment]  # this method's attach() made it
        cfg, base = self.cfg, ctx.base
        self.parts = Parts.of(base.model)
        self.at = self.att.spec.start_layer(len(self.parts.layers))
        self.cache: ActivationCache | None = None
        if cfg.activation_cache_mb > 0 and self.at > 0:
            self.cache = ActivationCache(activation_cache_dir(ctx.job.cache_dir), base.fingerprint, self.at,
                                         self.parts.head.weight.dtype, int(self.parts.head.weight.shape[1]),
                                         cfg.activation_cache_mb * 2**20)
        log.info("side method (%s): layers 0..%d frozen and run once per example%s", self.att.spec.part.value,
                 self.at - 1,
                 f"; activation cache {cfg.activation_cache_mb} MiB ({len(self.cache)} windows)" if self.cache else "")
        self.leaves = self.att.train_mode(True)
        self.opt = torch.optim.AdamW(self.leaves, lr=cfg.side_lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.fresh_steps = 0  # steps of this optimizer (its warm-up)
        self.pending_docs: list[tuple[int, tuple[int, ...]]] = []
        self.pending_examples: list[int] = []
        self.last_save = time.monotonic()

    def step(self, items: Sequence[Item], step: int, chain_step: int) -> StepOutcome:
        cfg = self.cfg
        prefixes = batch_prefixes(self.parts, collate(list(items), self.ctx.pad), self.at, cfg.micro_batch_size,
                                  self.cache)
        self.opt.zero_grad(set_to_none=True)
        loss, _n = loss_backward(self.parts, prefixes, cfg.loss_chunk_tokens)
        if not math.isfinite(loss):
            return StepOutcome(loss, finite=False, detail=str(loss))
        torch.nn.utils.clip_grad_norm_(self.leaves, CLIP_NORM)
        for g in self.opt.param_groups:
            g["lr"] = cfg.side_lr * min(1.0, (self.fresh_steps + 1) / WARMUP_STEPS)
        self.opt.step()
        self.fresh_steps += 1
        return StepOutcome(loss)

    def commit(self, items: Sequence[Item], outcome: StepOutcome, step: int) -> None:
        self.pending_docs.append((step, tuple(sorted({it.document_id for it in items}))))
        self.pending_examples.extend(it.example_id for it in items)
        if time.monotonic() - self.last_save >= self.cfg.side_save_every_s:
            self._save(step + 1)
            self.last_save = time.monotonic()

    def finish(self, steps: int, session_steps: int) -> None:
        self.att.train_mode(False)
        if self.pending_docs:
            self._save(steps)
        if self.cache is not None:
            log.info("activation cache: %d hits, %d misses", self.cache.hits, self.cache.misses)

    def close(self) -> None:
        self.att.train_mode(False)

    def _save(self, steps: int) -> None:
        store, params = self.ctx.store, self.att.params
        with store.db.atomic():  # tensors, their hash, the steps' documents and trained counts: all or nothing
            store.log.save_state(self.ctx.checkpoint_id, steps, pack_state(params), params.sha256(),
                                 self.pending_docs)
            store.docs.mark_trained(self.pending_examples)
        self.pending_docs.clear()
        self.pending_examples.clear()


def to_file(store: Store, checkpoint_id: int) -> SideFile:
    """A side checkpoint's stored tensors and metadata as a standalone file object."""
    ck = store.log.get(checkpoint_id)
    state = store.log.state(checkpoint_id)
    if state is None:
        raise CheckpointFileError(f"checkpoint {checkpoint_id}: no stored tensors to export")
    n_steps, data, sha = state
    return SideFile(ck.base_fingerprint, ck.spec, ck.estimator, ck.torch_version, n_steps, sha, data)


def from_file(store: Store, f: SideFile, note: str | None = None, status: Status = Status.CANDIDATE, *,
              val_loss: float | None = None, parent_val_loss: float | None = None) -> int:
    """Store a side checkpoint file (no parent: its tensors are complete) in one transaction; return its id."""
    with store.db.atomic():
        cid = store.log.create(parent_id=None, method=Method.SIDE.value, base_fingerprint=f.base_fingerprint,
                               spec=f.spec, estimator=f.estimator, torch_version=f.torch_version, note=note)
        store.log.save_state(cid, f.n_steps, f.tensors, f.sha256)
        store.log.set_status(cid, status, val_loss=val_loss, parent_val_loss=parent_val_loss)
    return cid


@dataclass
class SideImport(FileView):
    """A parsed side checkpoint file (ImportedFile): its tensors, loaded after their header is checked."""

    file: SideFile

    def apply(self, part: Attached, progress: Progress | None = None) -> bool:
        load_verified_state(part.params, self.file.tensors, self.file.sha256, self.name)
        if progress is not None:
            progress(1, 1)
        return True  # a side file always carries the hash of its tensors

    def save(self, store: Store, status: Status, note: str | None, val_loss: float | None,
             parent_val_loss: float | None) -> int:
        return from_file(store, self.file, note, status, val_loss=val_loss, parent_val_loss=parent_val_loss)


class SideMethod:
    """Side-tuning behind the TrainingMethod interface."""

    key = Method.SIDE
    file_magic = sidefile.MAGIC
    drops_whole = True  # trained tensors cannot drop single steps

    def spec_from_config(self, cfg: TrainerConfig) -> SideSpec:
        return SideSpec.from_config(cfg)

    def spec_from_dict(self, d: dict[str, Any]) -> SideSpec:
        return SideSpec.from_dict(d)

    def estimator(self, cfg: TrainerConfig) -> dict[str, Any]:
        return side_estimator(cfg)

    def lora_spec(self, spec: SideSpec) -> LoraSpec | None:
        return spec.lora

    def describe(self, spec: SideSpec) -> str:
        return f"a side {spec.part.value}"

    def export_refusal(self, spec: SideSpec, checkpoint_id: int) -> str | None:
        return PARTS[spec.part].export_refusal(spec, checkpoint_id)

    def attach(self, model: nn.Module, spec: SideSpec) -> Attached:
        return attach_side(model, spec)

    def load(self, store: Store, part: Attached, ck: Checkpoint, fingerprint: str, *, verify: bool = False,
             progress: Progress | None = None, snapshots: bool = True) -> int:
        n = load_side_state(store, part, ck, fingerprint, verify=verify)
        if progress is not None:
            progress(1, 1)
        return n

    def record_start(self, store: Store, checkpoint_id: int, part: Attached) -> None:
        store.log.save_state(checkpoint_id, 0, pack_state(part.params), part.params.sha256())

    def record_hashes(self, store: Store, model: nn.Module, fingerprint: str, checkpoint_id: int) -> None:
        pass  # forget never rebuilds side checkpoints: the stored tensors carry their hash

    def save_snapshot(self, store: Store, checkpoint_id: int, part: Attached) -> int:
        return 0  # a side checkpoint is its stored tensors already (checkpoint_states): nothing to replay

    def trainer(self, ctx: SessionContext) -> SideTrainer:
        return SideTrainer(ctx)

    def working_bytes(self, cfg: TrainerConfig, shape: ModelShape) -> float:
        # Backprop through the trained top layers: each keeps its activations for the backward pass and
        # gets their gradients; plus the step's prefixes, the final hidden states and their gradient leaf.
        # (Parts mlp and adapters count the top lora_layers layers, as before: conservative for mlp.)
        # Part block: its k appended layers are new weights, each with gradients and AdamW's two moments.
        k = cfg.side_blocks if cfg.side_part is SidePart.BLOCK else (cfg.lora_layers or 0)
        tokens = min(cfg.batch_size, cfg.micro_batch_size) * cfg.seq_len
        activations = (shape.layer_activation_bytes(cfg) * (1 + 2 * k) + cfg.batch_size * cfg.seq_len * shape.hidden * 4
                       + tokens * shape.hidden * 4 * 3)
        snapshot = shape.n_params * 0.02 * 4 * 4  # the trained tensors, their gradients and AdamW's two moments
        if cfg.side_part is SidePart.BLOCK:
            layer_params = 4 * shape.hidden * shape.hidden + 3 * shape.hidden * shape.inter  # an upper bound (GQA)
            snapshot = k * layer_params * 4 * 4
        return float(activations + snapshot)

    def verified(self, ck: Checkpoint, chain_steps: int) -> str:
        return f"side tensors of {ck.n_steps} steps load and match their hash"

    def export_bytes(self, store: Store, checkpoint_id: int) -> bytes:
        return sidefile.pack(to_file(store, checkpoint_id))

    def read_file(self, data: bytes, name: str) -> SideImport:
        f = sidefile.unpack(data, name)
        try:
            SideSpec.from_dict(f.spec)
        except SpecError as e:
            raise CheckpointFileError(f"{name}: {e}") from None
        return SideImport(f, name)

    def forget(self, store: Store, plan: ForgetPlan) -> ForgetResult:
        if plan.current_id is None or plan.current_id not in plan.tainted:
            return ForgetResult(None, rebuilt=False)
        return ForgetResult(fall_back(store, plan), rebuilt=False, fell_back=True)


METHOD = SideMethod()
