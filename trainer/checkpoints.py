"""Checkpoint operations over the store: export/import files, forgetting documents' steps."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pocketd.store import Status, StepRecord, Store

from .ckptfile import CheckpointFile, Segment
from .errors import CheckpointFileError
from .sidefile import SideFile

log = logging.getLogger(__name__)


def to_file(store: Store, checkpoint_id: int) -> CheckpointFile:
    """The chain root -> checkpoint as a standalone file object."""
    chain = store.log.chain(checkpoint_id)
    last = chain[-1]
    segments = [Segment(ck.estimator, list(store.log.steps(ck.id)), store.log.hashes(ck.id)) for ck in chain]
    return CheckpointFile(last.base_fingerprint, last.spec, last.method, last.torch_version, segments)


def side_to_file(store: Store, checkpoint_id: int) -> SideFile:
    """A side checkpoint's stored tensors and metadata as a standalone file object."""
    ck = store.log.get(checkpoint_id)
    state = store.log.state(checkpoint_id)
    if state is None:
        raise CheckpointFileError(f"checkpoint {checkpoint_id}: no stored tensors to export")
    n_steps, data, sha = state
    return SideFile(ck.base_fingerprint, ck.spec, ck.estimator, ck.torch_version, n_steps, sha, data)


def side_from_file(store: Store, f: SideFile, note: str | None = None) -> int:
    """Store a side checkpoint file as a new candidate (no parent: its tensors are complete); return its id."""
    with store.db.atomic():
        cid = store.log.create(parent_id=None, method="side", base_fingerprint=f.base_fingerprint, spec=f.spec,
                               estimator=f.estimator, torch_version=f.torch_version, note=note)
        store.log.save_state(cid, f.n_steps, f.tensors, f.sha256)
    return cid


def from_file(store: Store, ck: CheckpointFile, status: Status = Status.CANDIDATE, note: str | None = None) -> int:
    """Recreate the file's chain in the store (one checkpoint per segment); return the last id."""
    parent: int | None = None
    with store.db.atomic():
        for i, seg in enumerate(ck.segments):
            last = i == len(ck.segments) - 1
            cid = store.log.create(
                parent_id=parent, method=ck.method, base_fingerprint=ck.base_fingerprint, spec=ck.spec,
                estimator=seg.estimator, torch_version=ck.torch_version,
                status=status if last else Status.SUPERSEDED, note=note,
            )
            for rec in seg.steps:
                store.log.append_step(cid, rec)
            for n, sha in seg.hashes.items():
                store.log.add_hash(cid, n, sha)
            parent = cid
    if parent is None:
        raise ValueError("checkpoint file has no segments")
    return parent


@dataclass(frozen=True)
class ForgetPlan:
    """What forgetting some documents does to the checkpoint log."""

    affected: dict[int, set[int]]  # checkpoint id -> steps that saw the documents
    current_id: int | None
    current_affected: bool
    # Side checkpoints (trained tensors, not logs) that saw the documents or started from one that did:
    # their tensors cannot be separated from the text, so they are dropped whole.
    side_tainted: frozenset[int] = frozenset()

    @property
    def dropped_steps(self) -> int:
        return sum(len(s) for s in self.affected.values())


def plan_forget(store: Store, document_ids: list[int]) -> ForgetPlan:
    affected = store.log.checkpoints_with_documents(document_ids)
    current = store.log.current()
    chain = {c.id for c in store.log.chain(current.id)} if current else set()
    side = {c.id: c for c in store.log.list() if c.method == "side"}
    tainted = {cid for cid in affected if cid in side}
    grew = True
    while grew:  # descendants of a tainted side checkpoint started from its tensors
        more = {cid for cid, c in side.items() if c.parent_id in tainted} - tainted
        tainted |= more
        grew = bool(more)
    return ForgetPlan(affected, current.id if current else None, bool(chain & (set(affected) | tainted)),
                      frozenset(tainted))


def _fall_back_side(store: Store, plan: ForgetPlan) -> int | None:
    """Drop the tainted side checkpoints; the newest clean ancestor of the current one becomes current."""
    chain = store.log.chain(plan.current_id) if plan.current_id is not None else []
    clean = [c for c in chain if c.id not in plan.side_tainted]
    with store.db.atomic():
        # What the dropped checkpoints learned from the other documents is gone too: count those
        # documents' examples as untrained again, so the policy's next session retrains on them.
        trained_on = {d for c in chain if c.id in plan.side_tainted for d in store.log.documents_of(c.id)}
        store.docs.mark_untrained(sorted(trained_on))
        for cid in plan.side_tainted:
            store.log.delete_steps(cid)
        if clean:
            store.log.set_status(clean[-1].id, Status.CURRENT)
    return clean[-1].id if clean else None


def rebuild_without(store: Store, plan: ForgetPlan) -> int | None:
    """Make a new current checkpoint from the current chain minus the affected steps.

    A side checkpoint cannot lose single steps: every side checkpoint that saw the
    documents (or descends from one that did) is dropped whole, and the current one
    falls back to its newest clean ancestor (None: the base); the next session
    retrains the side part without the forgotten documents.

    The remaining steps keep their order and logged scalars; the result is a
    different (but well-defined) model, so the rebuilt checkpoints carry no hashes
    until `record_hashes` replays them (the CLI does that right away). Every
    checkpoint that held an affected step loses all its steps (status FORGOTTEN),
    so nothing derived from the forgotten text remains in the log.
    """
    new_id: int | None = None
    if plan.current_id is not None and plan.current_id in plan.side_tainted:
        new_id = _fall_back_side(store, plan)
    elif plan.current_affected and plan.current_id is not None:
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
            new_id = parent
    with store.db.atomic():
        for cid in set(plan.affected) | plan.side_tainted:
            store.log.delete_steps(cid)
    return new_id
