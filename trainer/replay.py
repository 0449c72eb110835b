"""The MeZO method's seed log: its spec and estimator record, replaying a chain onto a base, verification."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from pocketd.store import CheckpointConflict, StepRecord, Store

from .config import Perturbation, Trainable, TrainerConfig
from .errors import ReplayMismatch, SpecError
from .lora import LoraSpec, attach_lora
from .method import check_base
from .params import TrainableSet, trainable_set
from .zo import Restore, replay_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    """The trainable-parameter spec recorded in every checkpoint."""

    trainable: Trainable
    lora: LoraSpec | None

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> "Spec":
        lora = LoraSpec.from_config(cfg) if cfg.trainable is Trainable.LORA else None
        return cls(cfg.trainable, lora)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Spec":
        """The spec of a stored dict; SpecError if it is not a mezo spec."""
        try:
            lora = LoraSpec(**d["lora"]) if d.get("lora") else None
            return cls(Trainable(d["trainable"]), lora)
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"not a mezo trainable-part spec: {d!r} ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        return {"trainable": self.trainable.value, "lora": self.lora.to_dict() if self.lora else None}


def estimator_dict(cfg: TrainerConfig) -> dict[str, Any]:
    """The estimator config recorded in a checkpoint (what replay and the reader need to know)."""
    restore = Restore.SNAPSHOT if cfg.trainable is Trainable.LORA else Restore.DANCE
    return {
        "eps": cfg.eps,
        "n": cfg.n_perturbations,
        "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule.value,
        "restore": restore.value,
        "dtype": cfg.dtype.value,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "z": cfg.perturbation.value,
        "step_rule": cfg.step_rule.value,
    }


def perturbation_of(estimator: dict[str, Any]) -> Perturbation:
    """The z distribution a checkpoint was trained with (gaussian for logs that predate the choice)."""
    return Perturbation(estimator.get("z", Perturbation.GAUSSIAN.value))


def prepare_model(model: nn.Module, spec: Spec) -> TrainableSet:
    """Attach the spec's adapters (if any) and return the trainable tensors in replay order."""
    if spec.lora is not None:
        attach_lora(model, spec.lora)
    return trainable_set(model, spec.trainable, lora_fa=bool(spec.lora and spec.lora.fa))


def replay(
    store: Store,
    params: TrainableSet,
    checkpoint_id: int,
    fingerprint: str,
    *,
    verify: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Replay the chain root -> checkpoint onto params (fresh from the base); return steps replayed.

    With `verify`, every stored hash is compared and ReplayMismatch names the first
    checkpoint and step that differs; without, only the last hash of the chain is.
    Either way a chain whose step rows are not dense 0..n_steps-1 raises ReplayMismatch. Rows
    appended after the chain was read (a session training this checkpoint now) are not replayed.
    """
    chain = store.log.chain(checkpoint_id)
    total = sum(ck.n_steps for ck in chain)
    done = 0
    for ck in chain:
        check_base(ck, fingerprint)
        restore = Restore(ck.estimator.get("restore", Restore.SNAPSHOT.value))
        eps = float(ck.estimator["eps"])
        dist = perturbation_of(ck.estimator)
        # Only the first n_steps rows (as read above) and their hashes: a session may be appending right now.
        hashes = {k: v for k, v in store.log.hashes(ck.id).items() if k <= ck.n_steps}
        check_at = set(hashes) if verify else ({max(hashes)} if hashes and ck.id == checkpoint_id else set())
        if 0 in check_at:
            _compare(params, hashes[0], ck.id, 0)
        n = 0
        for rec in _steps(store, ck.id):
            if n == ck.n_steps:
                break
            if rec.step != n:
                raise ReplayMismatch(f"checkpoint {ck.id}: step {n} is missing from the log (next is step {rec.step}); "
                                     "the log is corrupt")
            if not rec.seeds or len(rec.seeds) != len(rec.grads):
                raise ReplayMismatch(f"checkpoint {ck.id}: step {n} has {len(rec.seeds)} seeds but "
                                     f"{len(rec.grads)} gradients; the log is corrupt")
            replay_step(params, rec.seeds, rec.grads, rec.lr, eps, restore, dist)
            done += 1
            n += 1
            if n in check_at:
                _compare(params, hashes[n], ck.id, n)
            if progress is not None:
                progress(done, total)
        if n != ck.n_steps:
            raise ReplayMismatch(f"checkpoint {ck.id}: the log holds {n} steps but the checkpoint records "
                                 f"{ck.n_steps}; the log is corrupt")
    return done


def _steps(store: Store, checkpoint_id: int) -> Iterator[StepRecord]:
    """The checkpoint's step rows; a damaged row is a ReplayMismatch (the log does not verify)."""
    rows = store.log.steps(checkpoint_id)
    while True:
        try:
            rec = next(rows)
        except StopIteration:
            return
        except CheckpointConflict as e:
            raise ReplayMismatch(f"{e}; the log is corrupt") from e
        yield rec


def _compare(params: TrainableSet, expected: str, checkpoint_id: int, n_steps: int) -> None:
    got = params.sha256()
    if got != expected:
        raise ReplayMismatch(
            f"checkpoint {checkpoint_id}: replay differs from the log after {n_steps} steps "
            f"(hash {got[:12]} != {expected[:12]}); the log is corrupt or was made by another build"
        )


def record_hashes(store: Store, model: nn.Module, fingerprint: str, checkpoint_id: int) -> str:
    """Replay a chain (e.g. rebuilt by forget) onto a fresh base model and store the hash after each of
    its checkpoints; return the last."""
    chain = store.log.chain(checkpoint_id)
    params = prepare_model(model, Spec.from_dict(chain[-1].spec))
    sha = params.sha256()
    for ck in chain:
        check_base(ck, fingerprint)
        restore = Restore(ck.estimator.get("restore", Restore.SNAPSHOT.value))
        if 0 not in store.log.hashes(ck.id):
            store.log.add_hash(ck.id, 0, sha)
        dist = perturbation_of(ck.estimator)
        for rec in store.log.steps(ck.id):
            replay_step(params, rec.seeds, rec.grads, rec.lr, float(ck.estimator["eps"]), restore, dist)
        sha = params.sha256()
        store.log.add_hash(ck.id, ck.n_steps, sha)
    return sha
