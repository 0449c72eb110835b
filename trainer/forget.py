"""Forgetting documents in the checkpoint log: plan which checkpoints saw them, let the current
checkpoint's method rewrite its chain, drop every affected checkpoint's steps.

Method-neutral: what a method can drop is its `drops_whole` flag (single steps, or whole
checkpoints and their descendants) and its `forget` (mezo rebuilds the chain without the
steps; side falls back to the newest clean ancestor).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pocketd.store import Store

from .config import TrainerConfig
from .method import ForgetPlan, ForgetResult
from .registry import method_of

log = logging.getLogger(__name__)


def plan_forget(store: Store, document_ids: list[int]) -> ForgetPlan:
    """Which checkpoints (and steps) saw the documents, and which must go whole."""
    affected = store.log.checkpoints_with_documents(document_ids)
    current = store.log.current()
    chain = {c.id for c in store.log.chain(current.id)} if current else set()
    whole = {c.id: c for c in store.log.list() if method_of(c).drops_whole}
    tainted = {cid for cid in affected if cid in whole}
    grew = True
    while grew:  # descendants of a tainted checkpoint started from its tensors
        more = {cid for cid, c in whole.items() if c.parent_id in tainted} - tainted
        tainted |= more
        grew = bool(more)
    return ForgetPlan(affected, current.id if current else None, bool(chain & (set(affected) | tainted)),
                      frozenset(tainted))


def rebuild_without(store: Store, plan: ForgetPlan) -> ForgetResult:
    """Rewrite the current chain without the plan's steps (by its method), then drop the steps of every
    affected or tainted checkpoint (status FORGOTTEN), so nothing derived from the forgotten text
    remains in the log.

    A rebuilt chain (`rebuilt`) carries no hashes until `record_hashes` replays it; a current
    checkpoint dropped whole (`fell_back`) leaves its newest clean ancestor current (None: the base).
    """
    result = ForgetResult(None, rebuilt=False)
    if plan.current_id is not None and plan.current_affected:
        result = method_of(store.log.get(plan.current_id)).forget(store, plan)
    with store.db.atomic():
        for cid in set(plan.affected) | plan.tainted:
            store.log.delete_steps(cid)
    return result


def record_hashes(store: Store, cfg: TrainerConfig, cache_dir: Path, checkpoint_id: int) -> None:
    """Store what verifying a chain rebuilt by forget needs (its method replays it on a fresh base)."""
    from .model import load_base

    base = load_base(cfg.model, cache_dir, cfg.dtype)
    method_of(store.log.get(checkpoint_id)).record_hashes(store, base.model, base.fingerprint, checkpoint_id)
