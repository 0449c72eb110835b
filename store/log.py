"""The seed-replay checkpoint log.

A checkpoint is (base model fingerprint, trainable-parameter spec, estimator
config, ordered step rows). Its steps continue its parent's, so replaying the
chain root -> leaf onto the base rebuilds the trained tensors. A step row is a
few bytes: the perturbation seeds (int64), the projected gradients (float32) and
the learning rate.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sqlite_utils import Database

from .clock import utcnow
from .errors import CheckpointConflict, CheckpointForgotten, CheckpointNotFound, DocumentsForgotten


class Status(str, Enum):
    CANDIDATE = "candidate"  # being trained or awaiting the evaluation gate
    CURRENT = "current"  # the one generate/eval/export and the next session use
    REJECTED = "rejected"  # did not improve validation loss
    SUPERSEDED = "superseded"  # was current, then a better one was promoted
    FORGOTTEN = "forgotten"  # held steps of forgotten documents; its steps were deleted


@dataclass(frozen=True)
class Checkpoint:
    id: int
    parent_id: int | None
    created_at: str
    updated_at: str | None
    status: Status
    method: str
    base_fingerprint: str
    spec: dict[str, Any]
    estimator: dict[str, Any]
    torch_version: str | None
    n_steps: int
    val_loss: float | None
    parent_val_loss: float | None
    note: str | None


@dataclass(frozen=True)
class StepRecord:
    """One logged step: enough to replay it exactly."""

    step: int
    seeds: tuple[int, ...]
    grads: tuple[float, ...]  # as stored: float32-rounded
    lr: float
    loss: float | None = None
    document_ids: tuple[int, ...] = field(default=(), compare=False)


def pack_seeds(seeds: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(seeds)}q", *seeds)


def pack_grads(grads: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(grads)}f", *grads)


def unpack_seeds(blob: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(blob) // 8}q", blob)


def unpack_grads(blob: bytes) -> tuple[float, ...]:
    return struct.unpack(f"<{len(blob) // 4}f", blob)


def f32(x: float) -> float:
    """Round a float to float32 and back (to nearest, ties to even): what the log stores and replay sees.

    pocketd's one float32 rounding (the trainer's step uses it too). A finite value beyond
    float32's range rounds to an infinity of its sign; NaN stays NaN.
    """
    try:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])
    except OverflowError:  # struct refuses what rounds to inf; IEEE (and torch) give inf
        return math.copysign(math.inf, x)


_COLUMNS = (
    "id, parent_id, created_at, updated_at, status, method, base_fingerprint, spec, estimator, "
    "torch_version, n_steps, val_loss, parent_val_loss, note"
)


class CheckpointLog:
    """Checkpoints and their steps. Each append commits, so a killed trainer loses at most one step."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        *,
        parent_id: int | None,
        method: str,
        base_fingerprint: str,
        spec: dict[str, Any],
        estimator: dict[str, Any],
        torch_version: str | None = None,
        status: Status = Status.CANDIDATE,
        note: str | None = None,
    ) -> int:
        """A new checkpoint (a candidate unless told otherwise); return its id."""
        with self.db.atomic():
            if parent_id is not None:
                self._writable(parent_id, "continued")
            pk = self.db["checkpoints"].insert(
                {
                    "parent_id": parent_id,
                    "created_at": utcnow(),
                    "status": status.value,
                    "method": method,
                    "base_fingerprint": base_fingerprint,
                    "spec": json.dumps(spec, sort_keys=True),
                    "estimator": json.dumps(estimator, sort_keys=True),
                    "torch_version": torch_version,
                    "n_steps": 0,
                    "note": note,
                }
            ).last_pk
        return int(pk)

    def append_step(self, checkpoint_id: int, rec: StepRecord, sha256: str | None = None) -> None:
        """Append one step (and optionally the hash of the tensors after it) in one transaction.

        CheckpointForgotten if forget dropped the checkpoint, DocumentsForgotten if the step names a
        document that is no longer stored (checked in the same transaction: nothing is written).
        """
        if len(rec.seeds) != len(rec.grads) or not rec.seeds:
            raise CheckpointConflict(f"step {rec.step}: {len(rec.seeds)} seeds but {len(rec.grads)} gradients")
        with self.db.atomic():
            done = self._writable(checkpoint_id, f"step {rec.step} appended")
            self._require_documents(rec.document_ids, f"checkpoint {checkpoint_id}: step {rec.step}")
            if rec.step != done:
                raise CheckpointConflict(
                    f"checkpoint {checkpoint_id}: step {rec.step} appended after {done} steps"
                )
            self.db["steps"].insert(
                {
                    "checkpoint_id": checkpoint_id,
                    "step": rec.step,
                    "seeds": pack_seeds(rec.seeds),
                    "grads": pack_grads(rec.grads),
                    "lr": rec.lr,
                    "loss": rec.loss,
                    "created_at": utcnow(),
                }
            )
            if rec.document_ids:
                self.db["step_documents"].insert_all(
                    {"checkpoint_id": checkpoint_id, "step": rec.step, "document_id": d}
                    for d in sorted(set(rec.document_ids))
                )
            if sha256 is not None:
                self._put_hash(checkpoint_id, rec.step + 1, sha256)
            self.db.execute(
                "update checkpoints set n_steps = ?, updated_at = ? where id = ?",
                [rec.step + 1, utcnow(), checkpoint_id],
            )

    def add_hash(self, checkpoint_id: int, n_steps: int, sha256: str) -> None:
        """Record the hash of the trainable tensors after the first `n_steps` steps of this checkpoint
        (CheckpointForgotten if forget dropped it)."""
        with self.db.atomic():
            self._writable(checkpoint_id, "hash recorded")
            self._put_hash(checkpoint_id, n_steps, sha256)

    def _writable(self, checkpoint_id: int, what: str) -> int:
        """The checkpoint's n_steps; CheckpointNotFound, or CheckpointForgotten if forget dropped it."""
        row = self.db.execute("select n_steps, status from checkpoints where id = ?", [checkpoint_id]).fetchone()
        if row is None:
            raise CheckpointNotFound(f"checkpoint {checkpoint_id}: no such checkpoint")
        if row[1] == Status.FORGOTTEN.value:
            raise CheckpointForgotten(f"checkpoint {checkpoint_id} was dropped by forget (it held or continued "
                                      f"steps of forgotten documents): {what} refused")
        return int(row[0] or 0)

    def _require_documents(self, document_ids: Sequence[int], what: str) -> None:
        """DocumentsForgotten unless every one of these documents is stored."""
        ids = sorted(set(document_ids))
        missing: list[int] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found = {d for (d,) in self.db.execute(
                f"select id from documents where id in ({','.join('?' * len(chunk))})", chunk)}
            missing += [d for d in chunk if d not in found]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise DocumentsForgotten(f"{what} used {'document' if len(missing) == 1 else 'documents'} {shown}, "
                                     "forgotten since: not committed")

    def _put_hash(self, checkpoint_id: int, n_steps: int, sha256: str) -> None:
        self.db["checkpoint_hashes"].upsert(
            {"checkpoint_id": checkpoint_id, "step": n_steps, "sha256": sha256},
            pk=("checkpoint_id", "step"),
        )

    def hashes(self, checkpoint_id: int) -> dict[int, str]:
        """n_steps -> sha256 of the trainable tensors after that many steps of this checkpoint."""
        return dict(
            self.db.execute(
                "select step, sha256 from checkpoint_hashes where checkpoint_id = ? order by step",
                [checkpoint_id],
            ).fetchall()
        )

    def steps(self, checkpoint_id: int, with_documents: bool = False, start: int = 0) -> Iterator[StepRecord]:
        """The checkpoint's step rows in order, from step `start` (CheckpointConflict for a damaged row)."""
        docs: dict[int, list[int]] = {}
        if with_documents:
            for step, doc in self.db.execute(
                "select step, document_id from step_documents where checkpoint_id = ?", [checkpoint_id]
            ):
                docs.setdefault(step, []).append(doc)
        cur = self.db.execute(
            "select step, seeds, grads, lr, loss from steps where checkpoint_id = ? and step >= ? order by step",
            [checkpoint_id, start],
        )
        for step, seeds, grads, lr, loss in cur:
            if len(seeds) % 8 or len(grads) % 4:
                raise CheckpointConflict(f"checkpoint {checkpoint_id}: step {step} is damaged "
                                         f"({len(seeds)} bytes of seeds, {len(grads)} bytes of gradients)")
            yield StepRecord(
                step, unpack_seeds(seeds), unpack_grads(grads), lr, loss, tuple(docs.get(step, ()))
            )

    def get(self, checkpoint_id: int) -> Checkpoint:
        row = self.db.execute(f"select {_COLUMNS} from checkpoints where id = ?", [checkpoint_id]).fetchone()
        if row is None:
            raise CheckpointNotFound(f"checkpoint {checkpoint_id}: no such checkpoint")
        return _checkpoint(row)

    def list(self) -> list[Checkpoint]:
        return [_checkpoint(r) for r in self.db.execute(f"select {_COLUMNS} from checkpoints order by id")]

    def current(self) -> Checkpoint | None:
        row = self.db.execute(
            f"select {_COLUMNS} from checkpoints where status = 'current' order by id desc limit 1"
        ).fetchone()
        return _checkpoint(row) if row else None

    def chain(self, checkpoint_id: int) -> list[Checkpoint]:
        """The checkpoint and its ancestors, root first: the order to replay them in."""
        out: list[Checkpoint] = []
        seen: set[int] = set()
        cid: int | None = checkpoint_id
        while cid is not None:
            if cid in seen:
                raise CheckpointConflict(f"checkpoint {checkpoint_id}: parent chain has a cycle at {cid}")
            seen.add(cid)
            ck = self.get(cid)
            out.append(ck)
            cid = ck.parent_id
        return out[::-1]

    def set_status(
        self,
        checkpoint_id: int,
        status: Status,
        *,
        val_loss: float | None = None,
        parent_val_loss: float | None = None,
        note: str | None = None,
    ) -> None:
        """Set a checkpoint's status; promoting to CURRENT supersedes the previous current one atomically.

        A checkpoint forget dropped stays FORGOTTEN (CheckpointForgotten).
        """
        with self.db.atomic():
            if status is not Status.FORGOTTEN:
                self._writable(checkpoint_id, f"status {status.value}")
            else:
                self.get(checkpoint_id)
            if status is Status.CURRENT:
                self.db.execute(
                    "update checkpoints set status = 'superseded', updated_at = ? "
                    "where status = 'current' and id != ?",
                    [utcnow(), checkpoint_id],
                )
            sets = {"status": status.value, "updated_at": utcnow()}
            if val_loss is not None:
                sets["val_loss"] = val_loss
            if parent_val_loss is not None:
                sets["parent_val_loss"] = parent_val_loss
            if note is not None:
                sets["note"] = note
            self.db["checkpoints"].update(checkpoint_id, sets)
            # Snapshots are kept for current and candidate checkpoints only (store.snapshots): pruned here.
            self.db.execute("delete from checkpoint_snapshots where checkpoint_id not in "
                            "(select id from checkpoints where status in ('current', 'candidate'))")

    def documents_of(self, checkpoint_id: int, steps: Sequence[int] | None = None) -> set[int]:
        """Every document some step of this checkpoint (or some of `steps` of it) trained on."""
        rows = self.db.execute(
            "select step, document_id from step_documents where checkpoint_id = ?", [checkpoint_id])
        wanted = None if steps is None else set(steps)
        return {d for step, d in rows if wanted is None or step in wanted}

    def orphan_document_ids(self) -> set[int]:
        """Documents that step rows name but the store no longer holds (left by a pocketd without
        the forget guards); forget drops their steps too."""
        return {d for (d,) in self.db.execute(
            "select distinct document_id from step_documents where document_id not in (select id from documents)")}

    def checkpoints_with_documents(self, document_ids: Sequence[int]) -> dict[int, set[int]]:
        """checkpoint id -> the steps of it whose batches held any of these documents."""
        out: dict[int, set[int]] = {}
        ids = list(document_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for cid, step in self.db.execute(
                f"select distinct checkpoint_id, step from step_documents where document_id in ({marks})", chunk
            ):
                out.setdefault(cid, set()).add(step)
        return out

    def save_state(self, checkpoint_id: int, n_steps: int, data: bytes, sha256: str,
                   step_documents: Sequence[tuple[int, Sequence[int]]] = ()) -> None:
        """Store a tensor checkpoint's tensors after `n_steps` steps (replacing the previous save), the
        documents of the steps since then and the hash, in one transaction.

        CheckpointForgotten / DocumentsForgotten (nothing written) as for `append_step`.
        """
        with self.db.atomic():
            done = self._writable(checkpoint_id, f"state of {n_steps} steps saved")
            self._require_documents([d for _step, docs in step_documents for d in docs],
                                    f"checkpoint {checkpoint_id}: the steps saved up to step {n_steps}")
            if n_steps < done:
                raise CheckpointConflict(f"checkpoint {checkpoint_id}: state of {n_steps} steps saved after {done}")
            self.db["checkpoint_states"].upsert(
                {"checkpoint_id": checkpoint_id, "n_steps": n_steps, "format": "safetensors", "data": data,
                 "sha256": sha256, "saved_at": utcnow()},
                pk="checkpoint_id",
            )
            rows = [{"checkpoint_id": checkpoint_id, "step": step, "document_id": d}
                    for step, docs in step_documents for d in sorted(set(docs))]
            if rows:
                self.db["step_documents"].upsert_all(rows, pk=("checkpoint_id", "step", "document_id"))
            self._put_hash(checkpoint_id, n_steps, sha256)
            self.db.execute("update checkpoints set n_steps = ?, updated_at = ? where id = ?",
                            [n_steps, utcnow(), checkpoint_id])

    def state(self, checkpoint_id: int) -> tuple[int, bytes, str] | None:
        """(n_steps, safetensors bytes, sha256) of a tensor checkpoint, or None if it has no stored tensors."""
        row = self.db.execute("select n_steps, data, sha256 from checkpoint_states where checkpoint_id = ?",
                              [checkpoint_id]).fetchone()
        return (int(row[0]), bytes(row[1]), str(row[2])) if row else None

    def delete_steps(self, checkpoint_id: int) -> None:
        """Drop all steps, hashes and stored tensors of a checkpoint (used when forgetting); the row stays,
        marked FORGOTTEN."""
        with self.db.atomic():
            for table in ("steps", "step_documents", "checkpoint_hashes", "checkpoint_states", "checkpoint_snapshots"):
                self.db.execute(f"delete from {table} where checkpoint_id = ?", [checkpoint_id])
            self.db["checkpoints"].update(
                checkpoint_id, {"status": Status.FORGOTTEN.value, "n_steps": 0, "updated_at": utcnow()}
            )


def _checkpoint(r: tuple[Any, ...]) -> Checkpoint:
    return Checkpoint(
        id=r[0], parent_id=r[1], created_at=r[2], updated_at=r[3], status=Status(r[4]), method=r[5],
        base_fingerprint=r[6], spec=json.loads(r[7]), estimator=json.loads(r[8]), torch_version=r[9],
        n_steps=r[10] or 0, val_loss=r[11], parent_val_loss=r[12], note=r[13],
    )
