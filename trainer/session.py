"""One training session of any method: load, resume or open a candidate, train, gate at the end.

The loop is the same for every method (trainer.method.TrainingMethod, looked up in
trainer.registry by `trainer.method`): it stops after the current step when `stop`
is set (SIGTERM/SIGINT), on the step or time budget, when RSS passes the memory
budget, or after too many non-finite losses in a row (or one the method cannot
undo). What a step does and when its progress becomes durable is the method's
(mezo: a log row per step; side: the tensors every few seconds and at the end);
a candidate left by a stopped session is resumed by the next one, and a finished
one is promoted only if its validation loss beats its parent's.
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
from typing import Any

import torch

from pocketd.store import Checkpoint, CheckpointForgotten, DocumentsForgotten, Status, Store

from .budget import estimate_need_mb, rss_mb
from .config import TrainerConfig
from .data import BatchSampler, items_for, pad_id_of
from .errors import OverBudget, ReplayMismatch
from .evaluate import EvalResult, eval_items, evaluate
from .forget import unhashed
from .job import ExitCode, Phase, SessionStatus, TrainingJob
from .method import SessionContext, TrainingMethod
from .registry import method_for
from .stopping import PrepPhase, check_stop

log = logging.getLogger(__name__)


class EndReason(str, Enum):
    STEPS = "step budget reached"
    TIME = "time budget reached"
    STOPPED = "stop requested"
    OVER_BUDGET = "memory budget exceeded"
    DIVERGED = "non-finite losses"
    NO_DATA = "no training data"
    FORGOTTEN = "documents forgotten"  # forget dropped the candidate or a document of the step: nothing of it kept


EXIT_CODES = {
    EndReason.STEPS: ExitCode.OK, EndReason.TIME: ExitCode.OK, EndReason.STOPPED: ExitCode.OK,
    EndReason.NO_DATA: ExitCode.OK, EndReason.FORGOTTEN: ExitCode.OK, EndReason.OVER_BUDGET: ExitCode.OVER_BUDGET,
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
        return _run(job, store, stop, status, on_status, load_base)
    except DocumentsForgotten as e:  # forget dropped what this session started from, before its first step
        log.warning("%s: the session ends, nothing of it was kept", e)
        status.phase, status.end_reason = Phase.DONE, EndReason.FORGOTTEN.value
        on_status(status)
        return SessionOutcome(None, 0, EndReason.FORGOTTEN, peak_rss_mb=rss_mb())
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
    stop: threading.Event | None = None  # a stop request ends the evaluation between batches (Stopped)

    def eval_now(self) -> EvalResult | None:
        """Validation loss of the model as it is now (None when the job skips the gate or has no examples)."""
        cfg = self.job.trainer
        if not (self.job.evaluate and self.val_items):
            return None
        return evaluate(self.base.model, self.val_items, pad_id=self.pad, batch_size=cfg.batch_size,
                        micro_batch=cfg.micro_batch_size, chunk_tokens=cfg.loss_chunk_tokens, stop=self.stop)


def load_session(job: TrainingJob, store: Store, load_base: Callable[..., Any],
                 stop: threading.Event | None = None) -> Loaded | None:
    """Load the base and the examples (None: no training examples, nothing to do).

    Stopped if `stop` is set while loading, converting or tokenizing (within a unit of work: a
    file chunk, an example; the GGUF converter process is killed); finished conversion stages and
    tokenized examples are kept for the next session.
    """
    cfg = job.trainer
    deadline = time.monotonic() + job.max_minutes * 60 if job.max_minutes else math.inf
    base = load_base(cfg.model, job.cache_dir, cfg.dtype, stop=stop)
    train_items = items_for(store, base.tokenizer, "train", cfg.seq_len, stop=stop)
    if not train_items:
        log.warning("no training examples in the store: nothing to do")
        return None
    val_items = eval_items(items_for(store, base.tokenizer, "validation", cfg.seq_len, stop=stop),
                           cfg.eval_examples)
    return Loaded(job, base, train_items, val_items, pad_id_of(base.tokenizer), deadline, stop)


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


def _resumable(store: Store, method: TrainingMethod, parent: Checkpoint | None, fingerprint: str,
               spec: dict[str, Any]) -> Checkpoint | None:
    """An unevaluated candidate of this method and spec that continues `parent` (left by a stopped session)."""
    pid = parent.id if parent else None
    for ck in reversed(store.log.list()):
        if (ck.status is Status.CANDIDATE and ck.method == method.key.value and ck.parent_id == pid
                and ck.base_fingerprint == fingerprint and ck.spec == spec):
            return ck
    return None


def _run(job: TrainingJob, store: Store, stop: threading.Event, status: SessionStatus,
         on_status: Callable[[SessionStatus], None], load_base: Callable[..., Any]) -> SessionOutcome:
    cfg: TrainerConfig = job.trainer
    loaded = load_session(job, store, load_base, stop)
    if loaded is None:
        return SessionOutcome(None, 0, EndReason.NO_DATA, peak_rss_mb=rss_mb())
    base, deadline, eval_now = loaded.base, loaded.deadline, loaded.eval_now
    method = method_for(cfg.method)
    spec_obj = method.spec_from_config(cfg)
    spec = spec_obj.to_dict()
    parent = store.log.current()
    if parent is not None and (parent.method != method.key.value or parent.spec != spec):
        log.warning("checkpoint %d is of another method or trainable-part spec: starting a new chain from the base",
                    parent.id)
        parent = None
    part = method.attach(base.model, spec_obj)
    resumed = _resumable(store, method, parent, base.fingerprint, spec)
    status.phase = Phase.REPLAYING
    on_status(status)
    start_from = resumed or parent
    if start_from is not None:
        # Every stored hash is compared: a checkpoint that does not verify is never trained on.
        n = load_start(store, method, part, start_from, base.fingerprint, stop)
        log.info("restored checkpoint %d (%d steps)", start_from.id, n)
    ck_id, step, parent_eval = open_candidate(
        store, resumed, parent.id if parent else None, method.key.value, base.fingerprint, spec,
        method.estimator(cfg), eval_now, lambda ck: method.record_start(store, ck, part))
    chain_steps = sum(c.n_steps for c in store.log.chain(ck_id))
    rng = random.Random(cfg.seed if cfg.seed is not None else secrets.randbits(63))
    sampler = BatchSampler(loaded.train_items, store.docs.trained_counts(), cfg.batch_size, rng.getrandbits(63))
    trainer = method.trainer(SessionContext(job, store, base, part, ck_id, loaded.pad, rng))
    outcome = SessionOutcome(ck_id, 0, EndReason.STOPPED)
    status.phase, status.checkpoint_id, status.total_steps = Phase.TRAINING, ck_id, chain_steps
    on_status(status)
    nonfinite_run = 0
    t_loop = time.monotonic()
    try:
        while (reason := end_reason(stop, job, outcome.steps, deadline)) is None:
            items = sampler.next()
            res = trainer.step(items, step, chain_steps)
            if not res.finite:
                outcome.skipped_nonfinite += 1
                nonfinite_run += 1
                log.warning("step %d: non-finite loss (%s): skipped, not logged", step, res.detail)
                if res.fatal or nonfinite_run >= cfg.max_nonfinite:
                    reason = EndReason.DIVERGED
                    break
                continue
            nonfinite_run = 0
            trainer.commit(items, res, step)  # DocumentsForgotten: forget got there first, nothing committed
            step += 1
            chain_steps += 1
            outcome.step_backoffs += int(res.backed_off)
            if report_step(outcome, status, res.loss, chain_steps, t_loop, job, deadline, on_status):
                reason = EndReason.OVER_BUDGET
                break
        outcome.end_reason = reason
        trainer.finish(step, outcome.steps)
    except DocumentsForgotten as e:
        # The weights in memory hold an update computed on forgotten text (or continue a dropped
        # candidate): end now, without `finish` (it would commit them). What was committed before is
        # clean: forget dropped every checkpoint whose steps used the documents.
        log.warning("%s: the session ends", e)
        outcome.end_reason = EndReason.FORGOTTEN
    finally:
        trainer.close()
    if outcome.end_reason in (EndReason.STOPPED, EndReason.DIVERGED, EndReason.OVER_BUDGET,
                              EndReason.FORGOTTEN) or step == 0:
        # Left as a candidate: the next session resumes it, or the gate runs then.
        status.phase, status.end_reason = Phase.DONE, outcome.end_reason.value
        on_status(status)
        return outcome
    try:
        gate(store, ck_id, eval_now, parent_eval, outcome, status, on_status, job)
    except DocumentsForgotten as e:  # forget dropped the candidate while it was being evaluated
        log.warning("%s: not promoted", e)
        outcome.end_reason, outcome.promoted = EndReason.FORGOTTEN, None
        status.phase, status.end_reason, status.promoted = Phase.DONE, outcome.end_reason.value, None
        on_status(status)
    return outcome


def load_start(store: Store, method: TrainingMethod, part: Any, ck: Checkpoint, fingerprint: str,
               stop: threading.Event | None = None) -> int:
    """Bring `part` to checkpoint `ck` (verifying every stored hash); return the steps it holds.

    A checkpoint forget dropped meanwhile is CheckpointForgotten, not a corrupt log; a chain forget
    rebuilt without hashes (the socket's forget cannot replay it) gets its end hash recorded now, so
    `checkpoint verify` covers it from here on.
    """
    try:
        n = method.load(store, part, ck, fingerprint, verify=True,
                        progress=lambda _done, _total: check_stop(stop, PrepPhase.REPLAYING))
    except ReplayMismatch:
        if store.log.get(ck.id).status is Status.FORGOTTEN:
            raise CheckpointForgotten(f"checkpoint {ck.id} was dropped by forget while it was loaded") from None
        raise
    if unhashed(store, ck.id) and n == sum(c.n_steps for c in store.log.chain(ck.id)):
        store.log.add_hash(ck.id, ck.n_steps, part.params.sha256())
        log.info("checkpoint %d (rebuilt by forget) was not hashed yet: recorded its hash after %d steps", ck.id, n)
        method.save_snapshot(store, ck.id, part)  # and the snapshot beside it: the next load replays nothing
    return n


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
