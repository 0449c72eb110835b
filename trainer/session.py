"""One training session: load base + current checkpoint, run ZO steps, log each, gate at the end.

The loop commits every step (a killed process loses at most the step in flight),
stops after the current step when `stop` is set (SIGTERM/SIGINT), and stops
cleanly when RSS passes the memory budget.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from pocketd.store import Checkpoint, Status, StepRecord, Store

from .actcache import ActivationCache
from .budget import estimate_need_mb, rss_mb
from .config import LrSchedule, Method, TrainerConfig, activation_cache_dir
from .data import BatchSampler, collate, items_for, pad_id_of
from .errors import NoTrainingData, OverBudget
from .evaluate import EvalResult, eval_items, evaluate
from .job import ExitCode, Phase, SessionStatus, TrainingJob
from .loss import mean_loss
from .multi import estimate_batched
from .prefix import Parts, PrefixUnsupported, batch_prefixes, first_trainable_layer, suffix_mean_loss
from .replay import Spec, estimator_dict, prepare_model, replay
from .stepsize import StepSizer
from .zo import Restore, apply_update, estimate, f32

log = logging.getLogger(__name__)


class EndReason(str, Enum):
    STEPS = "step budget reached"
    TIME = "time budget reached"
    STOPPED = "stop requested"
    OVER_BUDGET = "memory budget exceeded"
    DIVERGED = "non-finite losses"
    NO_DATA = "no training data"


EXIT_CODES = {
    EndReason.STEPS: ExitCode.OK, EndReason.TIME: ExitCode.OK, EndReason.STOPPED: ExitCode.OK,
    EndReason.NO_DATA: ExitCode.OK, EndReason.OVER_BUDGET: ExitCode.OVER_BUDGET,
    EndReason.DIVERGED: ExitCode.DIVERGED,
}


@dataclass
class SessionOutcome:
    checkpoint_id: int | None
    steps: int
    end_reason: EndReason
    skipped_nonfinite: int = 0
    loss_first: float | None = None
    loss_last: float | None = None
    promoted: bool | None = None
    val_loss: float | None = None
    parent_val_loss: float | None = None
    peak_rss_mb: float = 0.0
    step_backoffs: int = 0  # times the divergence guard halved the step size

    @property
    def exit_code(self) -> ExitCode:
        return EXIT_CODES[self.end_reason]


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """The learning rate of a step (float32-rounded, as the log stores it)."""
    lr = cfg.lr
    if cfg.lr_schedule is LrSchedule.INVERSE_SQRT:
        lr = cfg.lr / math.sqrt(1.0 + step / 100.0)
    return f32(lr)


def _resumable(store: Store, current: Checkpoint | None, fingerprint: str, spec: Spec) -> Checkpoint | None:
    """An unevaluated candidate that continues the current checkpoint (left by a stopped session)."""
    parent = current.id if current else None
    for ck in reversed(store.log.list()):
        if (ck.status is Status.CANDIDATE and ck.parent_id == parent and ck.base_fingerprint == fingerprint
                and ck.spec == spec.to_dict()):
            return ck
    return None


def run_session(
    job: TrainingJob,
    stop: threading.Event,
    on_status: Callable[[SessionStatus], None] = lambda s: None,
) -> SessionOutcome:
    """Run one session as the job says. Raises OverBudget before loading if the estimate exceeds the budget."""
    from .model import cached_copy, load_base, resolve_model

    cfg = job.trainer
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    need = estimate_need_mb(cfg, cached_copy(cfg.model, job.cache_dir, cfg.dtype) or resolve_model(cfg.model))
    if need > job.memory_budget_mb:
        raise OverBudget(
            f"this session needs about {need:.0f} MiB but policy.memory_budget_mb is {job.memory_budget_mb}; "
            "lower trainer.batch_size / trainer.micro_batch_size / trainer.seq_len or raise the budget"
        )
    status = SessionStatus(phase=Phase.LOADING)
    on_status(status)
    store = Store.open(job.database)
    try:
        if cfg.method is Method.SIDE:
            from .side_session import run_side

            return run_side(job, store, stop, status, on_status, load_base)
        return _run(job, store, stop, status, on_status, load_base)
    finally:
        store.close()


@dataclass
class Loaded:
    """What every session method starts from: the base, its examples and the session's deadline."""

    job: TrainingJob
    base: Any
    train_items: list[Any]
    val_items: list[Any]
    pad: int
    deadline: float

    def eval_now(self) -> EvalResult | None:
        """Validation loss of the model as it is now (None when the job skips the gate or has no examples)."""
        cfg = self.job.trainer
        if not (self.job.evaluate and self.val_items):
            return None
        return evaluate(self.base.model, self.val_items, pad_id=self.pad, batch_size=cfg.batch_size,
                        micro_batch=cfg.micro_batch_size, chunk_tokens=cfg.loss_chunk_tokens)


def load_session(job: TrainingJob, store: Store, load_base: Callable[..., Any]) -> Loaded | None:
    """Load the base and the examples (None: no training examples, nothing to do)."""
    cfg = job.trainer
    deadline = time.monotonic() + job.max_minutes * 60 if job.max_minutes else math.inf
    base = load_base(cfg.model, job.cache_dir, cfg.dtype)
    train_items = items_for(store, base.tokenizer, "train", cfg.seq_len)
    if not train_items:
        log.warning("no training examples in the store: nothing to do")
        return None
    val_items = eval_items(items_for(store, base.tokenizer, "validation", cfg.seq_len), cfg.eval_examples)
    return Loaded(job, base, train_items, val_items, pad_id_of(base.tokenizer), deadline)


def end_reason(stop: threading.Event, job: TrainingJob, steps: int, deadline: float) -> EndReason | None:
    """Why the session should end before its next step, if it should."""
    if stop.is_set():
        return EndReason.STOPPED
    if job.max_steps is not None and steps >= job.max_steps:
        return EndReason.STEPS
    if time.monotonic() >= deadline:
        return EndReason.TIME
    return None


def report_step(outcome: SessionOutcome, status: SessionStatus, loss: float, chain_steps: int, t_loop: float,
                job: TrainingJob, deadline: float, on_status: Callable[[SessionStatus], None]) -> bool:
    """Count a finished step in the outcome and the status; True if RSS passed the memory budget."""
    outcome.steps += 1
    outcome.loss_first = loss if outcome.loss_first is None else outcome.loss_first
    outcome.loss_last = loss
    rss = rss_mb()
    outcome.peak_rss_mb = max(outcome.peak_rss_mb, rss)
    s_per_step = (time.monotonic() - t_loop) / outcome.steps
    status.step, status.total_steps, status.loss, status.loss_first = outcome.steps, chain_steps, loss, outcome.loss_first
    status.s_per_step, status.rss_mb, status.peak_rss_mb = s_per_step, rss, outcome.peak_rss_mb
    status.skipped_nonfinite = outcome.skipped_nonfinite
    status.eta_s = _eta(job, outcome.steps, s_per_step, deadline)
    on_status(status)
    if rss > job.memory_budget_mb:
        log.warning("RSS %.0f MiB passed the budget %d MiB: stopping", rss, job.memory_budget_mb)
        return True
    return False


def open_candidate(store: Store, resumed: Checkpoint | None, parent_id: int | None, method: str, fingerprint: str,
                   spec: dict[str, Any], estimator: dict[str, Any], eval_now: Callable[[], EvalResult | None],
                   record_start: Callable[[int], None]) -> tuple[int, int, EvalResult | None]:
    """(checkpoint id, its steps so far, the parent's validation result) of the candidate to train: the
    resumed one, or a new one created in one transaction with its step-0 record (`record_start`) and its
    parent's validation loss, so a kill never leaves a candidate without them."""
    if resumed is not None:
        parent_eval = None if resumed.parent_val_loss is None else EvalResult(resumed.parent_val_loss, 0, 0)
        if parent_eval is None:
            log.info("resuming candidate %d: its parent's validation loss is unknown", resumed.id)
        return resumed.id, resumed.n_steps, parent_eval
    parent_eval = eval_now()
    with store.db.atomic():
        ck_id = store.log.create(parent_id=parent_id, method=method, base_fingerprint=fingerprint, spec=spec,
                                 estimator=estimator, torch_version=torch.__version__)
        record_start(ck_id)
        if parent_eval is not None:
            store.log.set_status(ck_id, Status.CANDIDATE, parent_val_loss=parent_eval.loss)
    return ck_id, 0, parent_eval


def _run(job, store, stop, status, on_status, load_base) -> SessionOutcome:  # type: ignore[no-untyped-def]
    cfg: TrainerConfig = job.trainer
    loaded = load_session(job, store, load_base)
    if loaded is None:
        return SessionOutcome(None, 0, EndReason.NO_DATA, peak_rss_mb=rss_mb())
    base, deadline, eval_now = loaded.base, loaded.deadline, loaded.eval_now
    model = base.model
    spec = Spec.from_config(cfg)
    current = store.log.current()
    if current is not None and current.spec != spec.to_dict():
        log.warning("trainer spec changed since checkpoint %d: starting a new chain from the base", current.id)
        current = None
    params = prepare_model(model, spec)
    resumed = _resumable(store, current, base.fingerprint, spec)
    status.phase = Phase.REPLAYING
    on_status(status)
    start_from = resumed.id if resumed else (current.id if current else None)
    if start_from is not None:
        # Every stored hash of the chain is compared: a log that does not verify is never trained on.
        n = replay(store, params, start_from, base.fingerprint, verify=True)
        log.info("replayed %d steps of checkpoint %d", n, start_from)
    ck_id, step, parent_eval = open_candidate(
        store, resumed, current.id if current else None, cfg.method.value, base.fingerprint, spec.to_dict(),
        estimator_dict(cfg), eval_now, lambda ck: store.log.add_hash(ck, 0, params.sha256()))
    chain_steps = sum(c.n_steps for c in store.log.chain(ck_id))
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    rng = random.Random(seed)
    sampler = BatchSampler(loaded.train_items, store.docs.trained_counts(), cfg.batch_size, rng.getrandbits(63))
    restore = Restore(estimator_dict(cfg)["restore"])
    zo_step = _step_plan(model, params, base.fingerprint, job)
    sizer = StepSizer(cfg.step_rule, cfg.divergence_guard)
    outcome = SessionOutcome(ck_id, 0, EndReason.STOPPED)
    status.phase, status.checkpoint_id, status.total_steps = Phase.TRAINING, ck_id, chain_steps
    on_status(status)
    nonfinite_run = 0
    t_loop = time.monotonic()
    while True:
        reason = end_reason(stop, job, outcome.steps, deadline)
        if reason is not None:
            outcome.end_reason = reason
            break
        items = sampler.next()
        batch = collate(items, loaded.pad)
        seeds = [rng.getrandbits(63) for _ in range(cfg.n_perturbations)]
        res = zo_step(batch, seeds, restore)
        if not res.finite:
            outcome.skipped_nonfinite += 1
            nonfinite_run += 1
            log.warning("step %d: non-finite loss (%s / %s): skipped, not logged", step, res.loss_plus, res.loss_minus)
            if restore is Restore.DANCE or nonfinite_run >= cfg.max_nonfinite:
                # The dance cannot be undone exactly: stop here; the log (not these weights) is the truth.
                outcome.end_reason = EndReason.DIVERGED
                break
            continue
        nonfinite_run = 0
        lr = f32(sizer.lr(lr_at(cfg, chain_steps), res.grads))
        apply_update(params, seeds, res.grads, lr, cfg.perturbation)
        sha = params.sha256() if (step + 1) % cfg.hash_every == 0 else None
        rec = StepRecord(step, tuple(seeds), res.grads, lr, res.loss, tuple(sorted({it.document_id for it in items})))
        with store.db.atomic():
            store.log.append_step(ck_id, rec, sha)
            store.docs.mark_trained([it.example_id for it in items])
        step += 1
        chain_steps += 1
        if sizer.observe(res.loss):
            outcome.step_backoffs = sizer.backoffs
            log.warning("step %d: training loss rose above the session's start: step size halved (x%g)",
                        step, sizer.scale)
        if report_step(outcome, status, res.loss, chain_steps, t_loop, job, deadline, on_status):
            outcome.end_reason = EndReason.OVER_BUDGET
            break
    if outcome.steps and (step % cfg.hash_every) != 0:
        store.log.add_hash(ck_id, step, params.sha256())
    if outcome.end_reason in (EndReason.STOPPED, EndReason.DIVERGED, EndReason.OVER_BUDGET) or step == 0:
        # Left as a candidate: the next session resumes it, or the gate runs then.
        status.phase, status.end_reason = Phase.DONE, outcome.end_reason.value
        on_status(status)
        return outcome
    gate(store, ck_id, eval_now, parent_eval, outcome, status, on_status, job)
    return outcome


def _step_plan(model, params, fingerprint: str, job: TrainingJob) -> Callable[[Any, list[int], Restore], Any]:  # type: ignore[no-untyped-def]
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

    def step(batch: Any, seeds: list[int], restore: Restore) -> Any:
        prefixes = batch_prefixes(parts, batch, first, cfg.micro_batch_size, cache)
        if cfg.batched_perturbations:
            return estimate_batched(model, params, parts, prefixes, seeds, cfg.eps, cfg.perturbation,
                                    cfg.loss_chunk_tokens)
        return estimate(params, lambda: suffix_mean_loss(parts, prefixes, cfg.loss_chunk_tokens), seeds, cfg.eps,
                        restore, cfg.perturbation)

    return step


def gate(store: Store, ck_id: int, eval_now: Callable[[], EvalResult | None], parent_eval: EvalResult | None,
         outcome: SessionOutcome, status: SessionStatus, on_status: Callable[[SessionStatus], None],
         job: TrainingJob) -> None:
    """Promote the candidate only if validation loss improved on its parent's."""
    if not job.evaluate:
        return
    status.phase = Phase.EVALUATING
    on_status(status)
    cand = eval_now()
    if cand is None:
        store.log.set_status(ck_id, Status.CURRENT, note="no validation examples: promoted without a gate")
        outcome.promoted = True
    else:
        if parent_eval is None:
            parent_eval = EvalResult(float("inf"), 0, 0)
        outcome.val_loss, outcome.parent_val_loss = cand.loss, parent_eval.loss
        better = math.isfinite(cand.loss) and cand.loss < parent_eval.loss
        store.log.set_status(
            ck_id, Status.CURRENT if better else Status.REJECTED, val_loss=cand.loss,
            parent_val_loss=parent_eval.loss if math.isfinite(parent_eval.loss) else None,
        )
        outcome.promoted = better
    log.info("checkpoint %d %s (val loss %s vs %s)", ck_id, "promoted" if outcome.promoted else "rejected",
             outcome.val_loss, outcome.parent_val_loss)
    status.phase, status.promoted, status.end_reason = Phase.DONE, outcome.promoted, outcome.end_reason.value
    status.val_loss, status.parent_val_loss = outcome.val_loss, outcome.parent_val_loss
    on_status(status)


def _eta(job: TrainingJob, steps: int, s_per_step: float, deadline: float) -> float | None:
    left = []
    if job.max_steps is not None:
        left.append((job.max_steps - steps) * s_per_step)
    if math.isfinite(deadline):
        left.append(max(0.0, deadline - time.monotonic()))
    return min(left) if left else None
