"""Forgetting documents in the checkpoint log: plan which checkpoints saw them, rewrite the current
chain without them, drop every checkpoint that held or continued their steps, and count the other
documents of the dropped steps as untrained again. All of it in one transaction (the caller's).

Torch-free: the daemon runs it in its own process (the socket's `forget`), so it never imports a
method module (they import torch). What a method can drop is its forget style, looked up in
`STYLES` by the checkpoint's method name (tests check it against each method's `drops_whole`):
a seed log (`mezo`) drops single steps and its chain is rebuilt from the rest; trained tensors
(`side`) cannot, so such a checkpoint goes whole and the newest clean ancestor becomes current.
Either way every checkpoint that continued a dropped one is dropped too: its steps (and a running
session's weights) were computed on top of the forgotten text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from pocketd.store import Checkpoint, Status, StepRecord, Store

from .config import Method
from .method import ForgetPlan, ForgetResult

log = logging.getLogger(__name__)


class ForgetStyle(str, Enum):
    STEPS = "steps"  # a seed log: drop single steps, rebuild the chain from the others
    WHOLE = "whole"  # trained tensors: drop the checkpoint (and what continued it), fall back to a clean ancestor


STYLES: dict[Method, ForgetStyle] = {Method.MEZO: ForgetStyle.STEPS, Method.SIDE: ForgetStyle.WHOLE}


def style_of(ck: Checkpoint) -> ForgetStyle:
    """How forget treats this checkpoint (a method this build does not know: whole, the safe way)."""
    try:
        return STYLES[Method(ck.method)]
    except (ValueError, KeyError):
        return ForgetStyle.WHOLE


@dataclass(frozen=True)
class LogForgetting:
    """What forgetting did to the checkpoint log."""

    plan: ForgetPlan
    result: ForgetResult  # what happened to the current chain (rebuilt, fell back, or untouched)
    dropped_steps: dict[int, int] = field(default_factory=dict)  # checkpoint id -> its steps that saw the documents
    dropped_whole: tuple[int, ...] = ()  # checkpoints dropped as a whole (tensors, or continuing a dropped one)
    untrained_examples: int = 0  # examples of other documents in dropped steps, counted as untrained again
    orphan_documents: tuple[int, ...] = ()  # documents deleted earlier that steps still named (dropped now)

    @property
    def dropped(self) -> set[int]:
        """Every checkpoint whose steps were deleted (status FORGOTTEN now)."""
        return set(self.dropped_steps) | set(self.dropped_whole)


def plan_forget(store: Store, document_ids: Iterable[int]) -> ForgetPlan:
    """Which checkpoints (and steps) saw the documents, and which must go whole: checkpoints of the
    WHOLE style that saw them, and every checkpoint continuing one that saw them or goes whole."""
    affected = store.log.checkpoints_with_documents(sorted(set(document_ids)))
    cks = store.log.list()
    children: dict[int, list[int]] = {}
    for c in cks:
        if c.parent_id is not None and c.status is not Status.FORGOTTEN:  # dropped before, with what continued it
            children.setdefault(c.parent_id, []).append(c.id)
    by_id = {c.id: c for c in cks}
    tainted = {cid for cid in affected if cid in by_id and style_of(by_id[cid]) is ForgetStyle.WHOLE}
    todo = list(set(affected) | tainted)
    while todo:  # descendants started from the dropped steps' tensors
        for child in children.get(todo.pop(), []):
            if child not in tainted:
                tainted.add(child)
                todo.append(child)
    current = store.log.current()
    chain = {c.id for c in store.log.chain(current.id)} if current else set()
    return ForgetPlan(affected, current.id if current else None, bool(chain & (set(affected) | tainted)),
                      frozenset(tainted))


def forget_in_log(store: Store, document_ids: Sequence[int]) -> LogForgetting:
    """Drop the documents (and any document already deleted that steps still name) from the log, in
    one transaction (nested in the caller's, if any): the current chain is rebuilt without their steps
    (STEPS style, no hashes until `trainer.rehash` or the next session records them) or falls back to
    its newest clean ancestor (WHOLE style); every affected or tainted checkpoint loses its steps,
    hashes and tensors (status FORGOTTEN, so no session can commit to it any more); the other
    documents of the dropped steps count as untrained again. The documents themselves are the
    caller's to delete, in the same transaction."""
    with store.db.atomic():
        orphans = store.log.orphan_document_ids() - set(document_ids)
        if orphans:
            log.warning("steps still name %d documents deleted earlier: dropping those steps too", len(orphans))
        forgotten = set(document_ids) | orphans
        plan = plan_forget(store, forgotten)
        dropped = set(plan.affected) | plan.tainted
        if not dropped:
            return LogForgetting(plan, ForgetResult(None, rebuilt=False), orphan_documents=tuple(sorted(orphans)))
        result = ForgetResult(None, rebuilt=False)
        rebuilt_from: set[int] = set()
        if plan.current_id is not None and plan.current_affected:
            current = store.log.get(plan.current_id)
            if style_of(current) is ForgetStyle.STEPS:
                rebuilt_from = {c.id for c in store.log.chain(current.id)}
                result = ForgetResult(rebuild_chain(store, plan), rebuilt=True)
            else:
                result = ForgetResult(fall_back(store, plan), rebuilt=False, fell_back=True)
        # What the dropped steps learned from the other documents is gone too (a rebuilt chain keeps
        # the steps it copied): those documents' examples count as untrained, so they are trained again.
        others: set[int] = set()
        for cid in dropped:
            others |= store.log.documents_of(cid, plan.affected.get(cid, set()) if cid in rebuilt_from else None)
        untrained = store.docs.mark_untrained(sorted(others - forgotten))
        for cid in sorted(dropped):
            store.log.delete_steps(cid)
    whole = tuple(sorted(plan.tainted | {cid for cid in plan.affected if cid not in rebuilt_from}))
    steps = {cid: len(s) for cid, s in plan.affected.items() if cid in rebuilt_from}
    log.info("forget: %d steps dropped from the current chain, %d checkpoints dropped whole, %d examples untrained",
             sum(steps.values()), len(whole), untrained)
    return LogForgetting(plan, result, steps, whole, untrained, tuple(sorted(orphans)))


def rebuild_chain(store: Store, plan: ForgetPlan) -> int:
    """A new current chain from the current one minus the plan's steps; return its last checkpoint.

    The remaining steps keep their order, logged scalars and documents; the result is a different (but
    well-defined) model, so the rebuilt checkpoints carry no hashes until they are recorded
    (`trainer.rehash`, or the next session records the end hash after replaying it).
    """
    if plan.current_id is None:
        raise ValueError("forget: no current checkpoint to rebuild")
    chain = store.log.chain(plan.current_id)
    with store.db.atomic():
        parent: int | None = None
        for ck in chain:
            drop = plan.affected.get(ck.id, set())
            kept = [r for r in store.log.steps(ck.id, with_documents=True) if r.step not in drop]
            if not kept and ck is not chain[-1]:
                continue
            cid = store.log.create(
                parent_id=parent, method=ck.method, base_fingerprint=ck.base_fingerprint, spec=ck.spec,
                estimator=ck.estimator, torch_version=ck.torch_version, status=Status.SUPERSEDED,
                note=f"rebuilt from checkpoint {ck.id} without forgotten documents",
            )
            for i, r in enumerate(kept):
                store.log.append_step(cid, StepRecord(i, r.seeds, r.grads, r.lr, r.loss, r.document_ids))
            parent = cid
        if parent is None:  # cannot happen: the last chain member is always recreated
            raise RuntimeError("forget: rebuilt chain is empty")
        store.log.set_status(parent, Status.CURRENT)
    return parent


def fall_back(store: Store, plan: ForgetPlan) -> int | None:
    """The newest ancestor of the current checkpoint that is not tainted becomes current (None: the base).
    The tainted ones are dropped by `forget_in_log`."""
    chain = store.log.chain(plan.current_id) if plan.current_id is not None else []
    clean = [c for c in chain if c.id not in plan.tainted]
    if clean:
        store.log.set_status(clean[-1].id, Status.CURRENT)
    return clean[-1].id if clean else None


def unhashed(store: Store, checkpoint_id: int) -> bool:
    """Whether the checkpoint has no stored hash at all (a chain rebuilt by forget, before its hashes
    were recorded): replaying it cannot be verified against anything."""
    return not store.log.hashes(checkpoint_id)
