"""Verified snapshots beside the seed log: a seed-log checkpoint's trainable tensors at one of its steps.

The seed log stays the source of truth; a snapshot only saves replaying the steps before it.
A snapshot is keyed by checkpoint and holds the tensors (safetensors bytes) after `n_steps` steps
of that checkpoint and their sha256 (`TrainableSet.sha256`), which must equal the log's recorded
hash at that step for the snapshot to be used. The store keeps at most one per checkpoint (the
newest), and only for checkpoints that can still be loaded as the current one or trained on
(status current or candidate): the others' snapshots are pruned in the same transaction as the
save or the status change that made them useless. Torch-free: the bytes are the trainer's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlite_utils import Database

from .clock import utcnow

log = logging.getLogger(__name__)

TABLE = "checkpoint_snapshots"
# Snapshots are kept only for checkpoints of these statuses (see the module docstring).
KEPT_STATUSES = ("current", "candidate")


@dataclass(frozen=True)
class Snapshot:
    checkpoint_id: int
    n_steps: int  # steps of this checkpoint the tensors include
    data: bytes  # safetensors
    sha256: str


class Snapshots:
    """The snapshot table (store.snapshots)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def save(self, checkpoint_id: int, n_steps: int, data: bytes, sha256: str) -> None:
        """Store the tensors after `n_steps` steps of the checkpoint, replacing its previous snapshot, and
        prune the snapshots of checkpoints no longer current or candidate; one transaction.

        Nothing is stored unless the log records the same hash at that step and the checkpoint is
        current or candidate (a snapshot nothing can verify, or of a dropped checkpoint, is useless).
        Returns nothing; the caller checks `get` if it cares.
        """
        with self.db.atomic():
            row = self.db.execute("select status, n_steps from checkpoints where id = ?", [checkpoint_id]).fetchone()
            logged = self.db.execute("select sha256 from checkpoint_hashes where checkpoint_id = ? and step = ?",
                                     [checkpoint_id, n_steps]).fetchone()
            if row is None or row[0] not in KEPT_STATUSES or n_steps > int(row[1] or 0):
                log.info("checkpoint %d: no snapshot stored (status %s)", checkpoint_id, row[0] if row else "missing")
                return
            if logged is None or logged[0] != sha256:
                log.warning("checkpoint %d: no snapshot stored: the log records no matching hash at step %d",
                            checkpoint_id, n_steps)
                return
            self.db[TABLE].upsert(
                {"checkpoint_id": checkpoint_id, "n_steps": n_steps, "format": "safetensors", "data": data,
                 "sha256": sha256, "saved_at": utcnow()},
                pk="checkpoint_id",
            )
            self.prune()

    def prune(self) -> int:
        """Drop the snapshots of checkpoints that are not current or candidate (or gone); return how many."""
        marks = ",".join("?" * len(KEPT_STATUSES))
        cur = self.db.execute(
            f"delete from {TABLE} where checkpoint_id not in "
            f"(select id from checkpoints where status in ({marks}))", list(KEPT_STATUSES))
        return int(cur.rowcount or 0)

    def get(self, checkpoint_id: int) -> Snapshot | None:
        row = self.db.execute(f"select n_steps, data, sha256 from {TABLE} where checkpoint_id = ?",
                              [checkpoint_id]).fetchone()
        return Snapshot(checkpoint_id, int(row[0]), bytes(row[1]), str(row[2])) if row else None

    def drop(self, checkpoint_id: int) -> None:
        """Forget the checkpoint's snapshot (it did not verify, or its steps changed)."""
        self.db.execute(f"delete from {TABLE} where checkpoint_id = ?", [checkpoint_id])

    def sizes(self) -> dict[int, int]:
        """checkpoint id -> bytes of its snapshot."""
        return {int(c): int(n) for c, n in self.db.execute(f"select checkpoint_id, length(data) from {TABLE}")}

    def total_bytes(self) -> int:
        return int(self.db.execute(f"select coalesce(sum(length(data)), 0) from {TABLE}").fetchone()[0])
