"""The `mezo` method: zeroth-order SGD (two forward passes per perturbation), a seed-replay log as checkpoint.

Its spec and estimator record and the replay itself live in trainer.replay, the pure
step in trainer.zo, the file format in trainer.ckptfile; this module puts them behind
the TrainingMethod interface: a step row (seeds, projected gradients, learning rate)
is committed with the examples it trained on after every step, a hash of the
trainable tensors every `hash_every` steps and at the end; forget drops single steps
and rebuilds the chain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pocketd.store import Checkpoint, Status, StepRecord, Store

from .. import ckptfile
from ..actcache import ActivationCache
from ..ckptfile import CheckpointFile, Segment
from ..config import LrSchedule, Method, Trainable, TrainerConfig, activation_cache_dir
from ..data import Item, collate
from ..forget import rebuild_chain
from ..job import TrainingJob
from ..lora import LoraSpec
from ..loss import mean_loss
from ..method import FileView, ForgetPlan, ForgetResult, ModelShape, Progress, SessionContext, StepOutcome
from ..multi import estimate_batched
from ..params import TrainableSet
from ..prefix import Parts, PrefixUnsupported, batch_prefixes, first_trainable_layer, suffix_mean_loss
from ..errors import CheckpointFileError, SpecError
from ..replay import (LogSegment, ReplayRule, Spec, estimator_dict, prepare_model, record_hashes, replay,
                      replay_segments)
from ..snapshot import take as take_snapshot
from ..stepsize import StepSizer
from ..zo import Restore, StepResult, apply_update, estimate, f32

log = logging.getLogger(__name__)

StepFn = Callable[[Any, list[int], Restore], StepResult]


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """The learning rate of a chain step (float32-rounded, as the log stores it)."""
    lr = cfg.lr
    if cfg.lr_schedule is LrSchedule.INVERSE_SQRT:
        lr = cfg.lr / math.sqrt(1.0 + step / 100.0)
    return f32(lr)


@dataclass
class MezoPart:
    """The trainable tensors of a mezo spec on a model (LoRA adapters attached if the spec has them)."""

    spec: Spec
    params: TrainableSet


def step_plan(model: nn.Module, params: TrainableSet, fingerprint: str, job: TrainingJob) -> StepFn:
    """(batch, seeds, restore) -> StepResult: the ZO estimate with the shared frozen prefix (and its
    activation cache) when the trainable tensors allow it, batched over perturbations if configured."""
    cfg: TrainerConfig = job.trainer
    kw = dict(micro_batch=cfg.micro_batch_size, chunk_tokens=cfg.loss_chunk_tokens)
    first = first_trainable_layer(model, params.tensors) if cfg.prefix_sharing else 0
    parts = None
    if first > 0 or cfg.batched_perturbations:
        try:
            parts = Parts.of(model)
        except PrefixUnsupported as e:
            log.warning("prefix sharing and batched perturbations off: %s", e)
    if parts is None:
        return lambda batch, seeds, restore: estimate(
            params, lambda: mean_loss(model, batch, **kw), seeds, cfg.eps, restore, cfg.perturbation)
    cache = None
    if cfg.activation_cache_mb > 0 and first > 0:
        hidden = int(parts.head.weight.shape[1])  # [V, H]
        cache = ActivationCache(activation_cache_dir(job.cache_dir), fingerprint, first, parts.head.weight.dtype,
                                hidden, cfg.activation_cache_mb * 2**20)
    log.info("frozen prefix: layers 0..%d run once per step%s%s", first - 1,
             f"; activation cache {cfg.activation_cache_mb} MiB ({len(cache)} windows)" if cache else "",
             "; perturbations batched" if cfg.batched_perturbations else "")
    split = parts

    def step(batch: Any, seeds: list[int], restore: Restore) -> StepResult:
        prefixes = batch_prefixes(split, batch, first, cfg.micro_batch_size, cache)
        if cfg.batched_perturbations:
            return estimate_batched(model, params, split, prefixes, seeds, cfg.eps, cfg.perturbation,
                                    cfg.loss_chunk_tokens)
        return estimate(params, lambda: suffix_mean_loss(split, prefixes, cfg.loss_chunk_tokens), seeds, cfg.eps,
                        restore, cfg.perturbation)

    return step


class MezoTrainer:
    """One session of ZO steps on a candidate: it owns the step function, the step-size rule and the
    restore mode; it draws each step's seeds from the session's RNG."""

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.cfg: TrainerConfig = ctx.job.trainer
        self.params = ctx.part.params
        self.restore = Restore(estimator_dict(self.cfg)["restore"])
        self.zo_step = step_plan(ctx.base.model, self.params, ctx.base.fingerprint, ctx.job)
        self.sizer = StepSizer(self.cfg.step_rule, self.cfg.divergence_guard)

    def step(self, items: Sequence[Item], step: int, chain_step: int) -> StepOutcome:
        cfg = self.cfg
        seeds = [self.ctx.rng.getrandbits(63) for _ in range(cfg.n_perturbations)]
        res = self.zo_step(collate(list(items), self.ctx.pad), seeds, self.restore)
        if not res.finite:
            # The dance cannot be undone exactly: the weights in memory are off; the log is the truth.
            return StepOutcome(res.loss, finite=False, fatal=self.restore is Restore.DANCE,
                               detail=f"{res.loss_plus} / {res.loss_minus}")
        lr = f32(self.sizer.lr(lr_at(cfg, chain_step), res.grads))
        apply_update(self.params, seeds, res.grads, lr, cfg.perturbation)
        backed_off = self.sizer.observe(res.loss)
        if backed_off:
            log.warning("step %d: training loss rose above the session's start: step size halved (x%g)",
                        step + 1, self.sizer.scale)
        rec = StepRecord(step, tuple(seeds), res.grads, lr, res.loss, tuple(sorted({it.document_id for it in items})))
        return StepOutcome(res.loss, backed_off=backed_off, record=rec)

    def commit(self, items: Sequence[Item], outcome: StepOutcome, step: int) -> None:
        store = self.ctx.store
        sha = self.params.sha256() if (step + 1) % self.cfg.hash_every == 0 else None
        with store.db.atomic():
            store.log.append_step(self.ctx.checkpoint_id, outcome.record, sha)
            store.docs.mark_trained([it.example_id for it in items])

    def finish(self, steps: int, session_steps: int) -> None:
        if not session_steps:
            return
        sha = self.params.sha256()
        if steps % self.cfg.hash_every != 0:
            self.ctx.store.log.add_hash(self.ctx.checkpoint_id, steps, sha)
        # The end hash is committed: a verified snapshot beside it spares the next load the replay.
        take_snapshot(self.ctx.store, self.ctx.checkpoint_id, steps, self.params, sha)

    def close(self) -> None:
        pass


def to_file(store: Store, checkpoint_id: int) -> CheckpointFile:
    """The chain root -> checkpoint as a standalone file object."""
    chain = store.log.chain(checkpoint_id)
    last = chain[-1]
    segments = [Segment(ck.estimator, list(store.log.steps(ck.id)), store.log.hashes(ck.id)) for ck in chain]
    return CheckpointFile(last.base_fingerprint, last.spec, last.method, last.torch_version, segments)


def from_file(store: Store, ck: CheckpointFile, status: Status = Status.CANDIDATE, note: str | None = None, *,
              val_loss: float | None = None, parent_val_loss: float | None = None) -> int:
    """Recreate the file's chain in the store in one transaction (one checkpoint per segment, the last
    with `status`); return the last id."""
    if not ck.segments:
        raise ValueError("checkpoint file has no segments")
    parent: int | None = None
    with store.db.atomic():
        for seg in ck.segments:
            cid = store.log.create(
                parent_id=parent, method=ck.method, base_fingerprint=ck.base_fingerprint, spec=ck.spec,
                estimator=seg.estimator, torch_version=ck.torch_version, status=Status.SUPERSEDED, note=note,
            )
            for rec in seg.steps:
                store.log.append_step(cid, rec)
            for n, sha in seg.hashes.items():
                store.log.add_hash(cid, n, sha)
            parent = cid
        store.log.set_status(cid, status, val_loss=val_loss, parent_val_loss=parent_val_loss)
    return cid


@dataclass
class MezoFile(FileView):
    """A parsed mezo checkpoint file (ImportedFile): its chain, replayed from the file's bytes."""

    file: CheckpointFile

    def apply(self, part: MezoPart, progress: Progress | None = None) -> bool:
        segs = self.file.segments
        log_segments = [LogSegment(f"{self.name} segment {i}", ReplayRule.of(seg.estimator, f"{self.name} segment {i}"),
                                   len(seg.steps), seg.steps, seg.hashes) for i, seg in enumerate(segs)]
        replay_segments(part.params, log_segments, lambda i: set(log_segments[i].hashes), progress)
        return len(segs[-1].steps) in segs[-1].hashes

    def save(self, store: Store, status: Status, note: str | None, val_loss: float | None,
             parent_val_loss: float | None) -> int:
        return from_file(store, self.file, status, note, val_loss=val_loss, parent_val_loss=parent_val_loss)


def read_file(data: bytes, name: str) -> MezoFile:
    """A mezo checkpoint file, parsed and checked (spec and estimators included); CheckpointFileError."""
    f = ckptfile.unpack(data, name)
    if f.method != Method.MEZO.value:
        raise CheckpointFileError(f"{name}: a seed-log file of method {f.method[:40]!r}, not mezo")
    try:
        Spec.from_dict(f.spec)
        for i, seg in enumerate(f.segments):
            ReplayRule.of(seg.estimator, f"segment {i}")
    except SpecError as e:
        raise CheckpointFileError(f"{name}: {e}") from None
    return MezoFile(f, name)


class MezoMethod:
    """MeZO behind the TrainingMethod interface."""

    key = Method.MEZO
    file_magic = ckptfile.MAGIC
    drops_whole = False  # single steps can be dropped and the chain rebuilt

    def spec_from_config(self, cfg: TrainerConfig) -> Spec:
        return Spec.from_config(cfg)

    def spec_from_dict(self, d: dict[str, Any]) -> Spec:
        return Spec.from_dict(d)

    def estimator(self, cfg: TrainerConfig) -> dict[str, Any]:
        return estimator_dict(cfg)

    def lora_spec(self, spec: Spec) -> LoraSpec | None:
        return spec.lora

    def describe(self, spec: Spec) -> str:
        return spec.trainable.value

    def export_refusal(self, spec: Spec, checkpoint_id: int) -> str | None:
        return None

    def attach(self, model: nn.Module, spec: Spec) -> MezoPart:
        return MezoPart(spec, prepare_model(model, spec))

    def load(self, store: Store, part: MezoPart, ck: Checkpoint, fingerprint: str, *, verify: bool = False,
             progress: Progress | None = None, snapshots: bool = True) -> int:
        return replay(store, part.params, ck.id, fingerprint, verify=verify, progress=progress, snapshots=snapshots)

    def save_snapshot(self, store: Store, checkpoint_id: int, part: MezoPart) -> int:
        return take_snapshot(store, checkpoint_id, store.log.get(checkpoint_id).n_steps, part.params)

    def record_start(self, store: Store, checkpoint_id: int, part: MezoPart) -> None:
        store.log.add_hash(checkpoint_id, 0, part.params.sha256())

    def record_hashes(self, store: Store, model: nn.Module, fingerprint: str, checkpoint_id: int) -> None:
        record_hashes(store, model, fingerprint, checkpoint_id)

    def trainer(self, ctx: SessionContext) -> MezoTrainer:
        return MezoTrainer(ctx)

    def working_bytes(self, cfg: TrainerConfig, shape: ModelShape) -> float:
        activations = shape.layer_activation_bytes(cfg)
        if cfg.batched_perturbations:  # the top layers see the micro-batch 2n times at once
            activations *= 2 * cfg.n_perturbations
        if cfg.trainable is Trainable.LORA and cfg.lora_layers and cfg.prefix_sharing:
            activations += cfg.batch_size * cfg.seq_len * shape.hidden * 4  # the step's shared prefix
        snapshot = 0 if cfg.trainable is Trainable.FULL else shape.n_params * 0.02 * 4  # LoRA copy: a few %
        return float(activations + snapshot)

    def verified(self, ck: Checkpoint, chain_steps: int) -> str:
        return f"{chain_steps} steps replayed, every stored hash matches"

    def export_bytes(self, store: Store, checkpoint_id: int) -> bytes:
        return ckptfile.pack(to_file(store, checkpoint_id))

    def read_file(self, data: bytes, name: str) -> MezoFile:
        return read_file(data, name)

    def forget(self, store: Store, plan: ForgetPlan) -> ForgetResult:
        if not plan.current_affected or plan.current_id is None:
            return ForgetResult(None, rebuilt=False)
        return ForgetResult(rebuild_chain(store, plan), rebuilt=True)  # torch-free: the daemon runs it too


METHOD = MezoMethod()
