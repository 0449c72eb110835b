"""One training session of the side method: AdamW on a small part above cached frozen activations.

The same contract as the MeZO session (trainer.session): a candidate checkpoint per
session (resumed if a stopped session left one), the same stop / time / step /
memory-budget ends, the same evaluation gate. What differs is the checkpoint: the
trained tensors themselves (safetensors bytes in the store), committed together with
the steps' documents and trained-example counts every `side_save_every_s` seconds
and at the end. A killed session loses at most that much training; the previous
save, and the parent checkpoint, stay loadable. The optimizer's moments are not
stored: a resumed candidate starts them afresh (after a short warm-up).
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pocketd.store import Checkpoint, Status, Store

from .actcache import ActivationCache
from .backprop import loss_backward
from .budget import rss_mb
from .config import Method, TrainerConfig, activation_cache_dir
from .data import BatchSampler, collate
from .job import Phase, SessionStatus, TrainingJob
from .prefix import Parts, batch_prefixes
from .session import EndReason, SessionOutcome, end_reason, gate, load_session, open_candidate, report_step
from .side import SideSpec, attach_side, load_side_state, pack_state

log = logging.getLogger(__name__)

WARMUP_STEPS = 10  # linear learning-rate warm-up of a fresh optimizer
CLIP_NORM = 1.0  # gradient-norm clipping


def side_estimator(cfg: TrainerConfig) -> dict[str, Any]:
    """The optimizer config recorded in a side checkpoint."""
    return {"optimizer": "adamw", "lr": cfg.side_lr, "betas": [0.9, 0.999], "weight_decay": 0.0,
            "clip_norm": CLIP_NORM, "warmup_steps": WARMUP_STEPS, "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "dtype": cfg.dtype.value}


def _resumable(store: Store, parent: Checkpoint | None, fingerprint: str, spec: SideSpec) -> Checkpoint | None:
    pid = parent.id if parent else None
    for ck in reversed(store.log.list()):
        if (ck.status is Status.CANDIDATE and ck.method == Method.SIDE.value and ck.parent_id == pid
                and ck.base_fingerprint == fingerprint and ck.spec == spec.to_dict()):
            return ck
    return None


def run_side(job: TrainingJob, store: Store, stop: threading.Event, status: SessionStatus,
             on_status: Callable[[SessionStatus], None], load_base: Callable[..., Any]) -> SessionOutcome:
    cfg: TrainerConfig = job.trainer
    loaded = load_session(job, store, load_base)
    if loaded is None:
        return SessionOutcome(None, 0, EndReason.NO_DATA, peak_rss_mb=rss_mb())
    base, deadline, eval_now = loaded.base, loaded.deadline, loaded.eval_now
    model = base.model
    spec = SideSpec.from_config(cfg)
    current = store.log.current()
    parent = current
    if current is not None and (current.method != Method.SIDE.value or current.spec != spec.to_dict()):
        log.warning("checkpoint %d is of another method or side spec: the side part starts from the base",
                    current.id)
        parent = None
    att = attach_side(model, spec)
    resumed = _resumable(store, parent, base.fingerprint, spec)
    status.phase = Phase.REPLAYING
    on_status(status)
    start_from = resumed or parent
    if start_from is not None:
        load_side_state(store, att, start_from, base.fingerprint)
        log.info("loaded the side tensors of checkpoint %d", start_from.id)
    ck_id, step, parent_eval = open_candidate(
        store, resumed, parent.id if parent else None, Method.SIDE.value, base.fingerprint, spec.to_dict(),
        side_estimator(cfg), eval_now, lambda ck: store.log.save_state(ck, 0, pack_state(att.params),
                                                                    att.params.sha256()))
    parts = Parts.of(model)
    at = spec.start_layer(len(parts.layers))
    cache = None
    if cfg.activation_cache_mb > 0 and at > 0:
        cache = ActivationCache(activation_cache_dir(job.cache_dir), base.fingerprint, at, parts.head.weight.dtype,
                                int(parts.head.weight.shape[1]), cfg.activation_cache_mb * 2**20)
    log.info("side method (%s): layers 0..%d frozen and run once per example%s", spec.part.value, at - 1,
             f"; activation cache {cfg.activation_cache_mb} MiB ({len(cache)} windows)" if cache else "")
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    rng = random.Random(seed)
    sampler = BatchSampler(loaded.train_items, store.docs.trained_counts(), cfg.batch_size, rng.getrandbits(63))
    leaves = att.train_mode(True)
    opt = torch.optim.AdamW(leaves, lr=cfg.side_lr, betas=(0.9, 0.999), weight_decay=0.0)
    chain_steps = sum(c.n_steps for c in store.log.chain(ck_id))
    outcome = SessionOutcome(ck_id, 0, EndReason.STOPPED)
    status.phase, status.checkpoint_id, status.total_steps = Phase.TRAINING, ck_id, chain_steps
    on_status(status)
    pending_docs: list[tuple[int, tuple[int, ...]]] = []
    pending_examples: list[int] = []

    def save() -> None:
        with store.db.atomic():  # tensors, their hash, the steps' documents and trained counts: all or nothing
            store.log.save_state(ck_id, step, pack_state(att.params), att.params.sha256(), pending_docs)
            store.docs.mark_trained(pending_examples)
        pending_docs.clear()
        pending_examples.clear()

    nonfinite_run = 0
    fresh_steps = 0  # steps of this optimizer (its warm-up)
    t_loop = last_save = time.monotonic()
    try:
        while True:
            reason = end_reason(stop, job, outcome.steps, deadline)
            if reason is not None:
                outcome.end_reason = reason
                break
            items = sampler.next()
            prefixes = batch_prefixes(parts, collate(items, loaded.pad), at, cfg.micro_batch_size, cache)
            opt.zero_grad(set_to_none=True)
            loss, _n = loss_backward(parts, prefixes, cfg.loss_chunk_tokens)
            if not math.isfinite(loss):
                outcome.skipped_nonfinite += 1
                nonfinite_run += 1
                log.warning("step %d: non-finite loss %s: skipped", step, loss)
                if nonfinite_run >= cfg.max_nonfinite:
                    outcome.end_reason = EndReason.DIVERGED
                    break
                continue
            nonfinite_run = 0
            torch.nn.utils.clip_grad_norm_(leaves, CLIP_NORM)
            for g in opt.param_groups:
                g["lr"] = cfg.side_lr * min(1.0, (fresh_steps + 1) / WARMUP_STEPS)
            opt.step()
            fresh_steps += 1
            pending_docs.append((step, tuple(sorted({it.document_id for it in items}))))
            pending_examples.extend(it.example_id for it in items)
            step += 1
            chain_steps += 1
            if time.monotonic() - last_save >= cfg.side_save_every_s:
                save()
                last_save = time.monotonic()
            if report_step(outcome, status, loss, chain_steps, t_loop, job, deadline, on_status):
                outcome.end_reason = EndReason.OVER_BUDGET
                break
    finally:
        att.train_mode(False)
    if pending_docs:
        save()
    if cache is not None:
        log.info("activation cache: %d hits, %d misses", cache.hits, cache.misses)
    if outcome.end_reason in (EndReason.STOPPED, EndReason.DIVERGED, EndReason.OVER_BUDGET) or step == 0:
        status.phase, status.end_reason = Phase.DONE, outcome.end_reason.value
        on_status(status)
        return outcome
    gate(store, ck_id, eval_now, parent_eval, outcome, status, on_status, job)
    return outcome
