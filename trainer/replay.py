"""The MeZO method's seed log: its spec and estimator record, replaying a chain onto a base, verification."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from pocketd.store import CheckpointConflict, StepRecord, Store

from .config import Perturbation, Trainable, TrainerConfig
from .errors import NonFiniteWeights, ReplayMismatch, SpecError
from .lora import LoraSpec, attach_lora
from .method import check_base
from .params import TrainableSet, trainable_set
from .snapshot import newest_on_chain, put
from .snapshot import take as take_snapshot
from .specbounds import check_lora_fit, lora_from_dict
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
        """The spec of a stored dict, within the config's bounds; SpecError if it is not a mezo spec."""
        if not isinstance(d, dict) or set(d) - {"trainable", "lora"}:
            raise SpecError(f"not a mezo trainable-part spec: {str(d)[:200]}")
        try:
            trainable = Trainable(d.get("trainable"))
        except ValueError as e:
            raise SpecError(f"not a mezo trainable-part spec: {e}") from None
        lora = lora_from_dict(d["lora"], "mezo spec") if d.get("lora") is not None else None
        if (lora is None) != (trainable is Trainable.FULL):
            raise SpecError(f"mezo spec: trainable {trainable.value} with{'out' if lora is None else ''} a lora spec")
        return cls(trainable, lora)

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


@dataclass(frozen=True)
class ReplayRule:
    """What replaying a checkpoint's steps needs from its estimator record."""

    eps: float
    restore: Restore
    dist: Perturbation

    @classmethod
    def of(cls, estimator: Any, what: str) -> "ReplayRule":
        """The rule of an estimator record; SpecError naming `what` if it is not one replay can follow."""
        try:
            eps = estimator["eps"]
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
                raise ValueError(f"eps {eps!r} is not a positive finite number")
            return cls(float(eps), Restore(estimator.get("restore", Restore.SNAPSHOT.value)),
                       perturbation_of(estimator))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpecError(f"{what}: estimator record cannot be replayed ({e})") from None


def prepare_model(model: nn.Module, spec: Spec) -> TrainableSet:
    """Attach the spec's adapters (if any; SpecError if they do not fit the base) and return the trainable
    tensors in replay order."""
    if spec.lora is not None:
        check_lora_fit(model, spec.lora)
        attach_lora(model, spec.lora)
    return trainable_set(model, spec.trainable, lora_fa=bool(spec.lora and spec.lora.fa))


@dataclass(frozen=True)
class LogSegment:
    """One checkpoint's part of a chain to replay: from the store or from a checkpoint file."""

    label: str  # "checkpoint 3", "FILE segment 1": named in errors
    rule: ReplayRule
    n_steps: int
    steps: Iterable[StepRecord]
    hashes: dict[int, str]  # n_steps -> sha256 (only those <= n_steps)
    start: int = 0  # steps already on the tensors (a verified snapshot): `steps` begins at this step


def replay_segments(params: TrainableSet, segments: Sequence[LogSegment], check: Callable[[int], set[int]],
                    progress: Callable[[int, int], None] | None = None) -> int:
    """Replay `segments` in order onto params; compare the hashes `check(i)` names for segment i.

    ReplayMismatch names the segment and step that differs or is missing; NonFiniteWeights if the
    replayed tensors are not all finite. `progress(done, total)` is called after every step (it may
    raise, e.g. Stopped, to end the replay).
    """
    total = sum(s.n_steps - s.start for s in segments)
    done = 0
    for i, seg in enumerate(segments):
        check_at = check(i)
        if seg.start in check_at:
            _compare(params, seg.hashes[seg.start], seg.label, seg.start)
        n = seg.start
        for rec in seg.steps:
            if n == seg.n_steps:
                break
            if rec.step != n:
                raise ReplayMismatch(f"{seg.label}: step {n} is missing from the log (next is step {rec.step}); "
                                     "the log is corrupt")
            if not rec.seeds or len(rec.seeds) != len(rec.grads):
                raise ReplayMismatch(f"{seg.label}: step {n} has {len(rec.seeds)} seeds but "
                                     f"{len(rec.grads)} gradients; the log is corrupt")
            replay_step(params, rec.seeds, rec.grads, rec.lr, seg.rule.eps, seg.rule.restore, seg.rule.dist)
            done += 1
            n += 1
            if n in check_at:
                _compare(params, seg.hashes[n], seg.label, n)
            if progress is not None:
                progress(done, total)
        if n != seg.n_steps:
            raise ReplayMismatch(f"{seg.label}: the log holds {n} steps but the checkpoint records "
                                 f"{seg.n_steps}; the log is corrupt")
    check_finite(params, segments[-1].label if segments else "replay")
    return done


def check_finite(params: TrainableSet, what: str) -> None:
    """NonFiniteWeights naming `what` unless every trainable tensor is finite."""
    import torch

    for name, t in zip(params.names, params.tensors):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteWeights(f"{what}: the trained tensor {name} holds NaN or infinite values; "
                                   "this checkpoint cannot be used")


def replay(
    store: Store,
    params: TrainableSet,
    checkpoint_id: int,
    fingerprint: str,
    *,
    verify: bool = False,
    progress: Callable[[int, int], None] | None = None,
    snapshots: bool = True,
) -> int:
    """Replay the chain root -> checkpoint onto params (fresh from the base); return the chain steps the
    tensors now hold.

    With `snapshots`, the newest verified snapshot on the chain (trainer.snapshot: its hash equal to the
    log's at its step, its tensors finite) is put on params first and only the steps after it are
    replayed (the hashes compared are those after it); a snapshot that does not check out is a warning
    and the whole chain is replayed. Without, the whole chain is always replayed (verify, forget, import).

    With `verify`, every stored hash is compared and ReplayMismatch names the first
    checkpoint and step that differs; without, only the last hash of the chain is.
    Either way a chain whose step rows are not dense 0..n_steps-1 raises ReplayMismatch, and
    non-finite replayed tensors NonFiniteWeights. Rows appended after the chain was read (a
    session training this checkpoint now) are not replayed.
    """
    chain = store.log.chain(checkpoint_id)
    segments = []
    for ck in chain:
        check_base(ck, fingerprint)
        try:
            rule = ReplayRule.of(ck.estimator, f"checkpoint {ck.id}")
        except SpecError as e:
            raise ReplayMismatch(str(e)) from None
        # Only the first n_steps rows (as read above) and their hashes: a session may be appending right now.
        hashes = {k: v for k, v in store.log.hashes(ck.id).items() if k <= ck.n_steps}
        segments.append(LogSegment(f"checkpoint {ck.id}", rule, ck.n_steps, _steps(store, ck.id), hashes))

    skipped = 0
    found = newest_on_chain(store, params, chain, [s.hashes for s in segments]) if snapshots else None
    if found is not None:
        put(params, found)
        skipped = sum(s.n_steps for s in segments[: found.chain_index]) + found.n_steps
        first = segments[found.chain_index]
        segments = [replace(first, steps=_steps(store, chain[found.chain_index].id, found.n_steps),
                            start=found.n_steps)] + segments[found.chain_index + 1:]
        log.info("checkpoint %d: from the snapshot of checkpoint %d at step %d, replaying %d steps", checkpoint_id,
                 chain[found.chain_index].id, found.n_steps, sum(s.n_steps - s.start for s in segments))

    def check(i: int) -> set[int]:
        seg = segments[i]
        from_snapshot = found is not None and i == 0  # the snapshot's own hash was checked when it was read
        hashes = {k for k in seg.hashes if k > seg.start or (k == seg.start and not from_snapshot)}
        if verify:
            return hashes
        return {max(hashes)} if hashes and i == len(segments) - 1 else set()

    return skipped + replay_segments(params, segments, check, progress)


def _steps(store: Store, checkpoint_id: int, start: int = 0) -> Iterator[StepRecord]:
    """The checkpoint's step rows from `start`; a damaged row is a ReplayMismatch (the log does not verify)."""
    rows = store.log.steps(checkpoint_id, start=start)
    while True:
        try:
            rec = next(rows)
        except StopIteration:
            return
        except CheckpointConflict as e:
            raise ReplayMismatch(f"{e}; the log is corrupt") from e
        yield rec


def _compare(params: TrainableSet, expected: str, label: str, n_steps: int) -> None:
    got = params.sha256()
    if got != expected:
        raise ReplayMismatch(
            f"{label}: replay differs from the log after {n_steps} steps "
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
    take_snapshot(store, checkpoint_id, chain[-1].n_steps, params, sha)
    return sha
