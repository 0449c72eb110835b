"""Checkpoint files: export a checkpoint (its whole chain) as one standalone file, import one back.

The file's kind (its magic) names the method whose format it is (trainer.registry);
each method packs and parses its own format (mezo: trainer.ckptfile, side:
trainer.sidefile). Importing verifies the checkpoint on the configured base before
it becomes current; one that does not verify is kept as REJECTED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pocketd.store import Status, Store

from .checkpoints import load_checkpoint
from .config import Method, TrainerConfig
from .errors import CheckpointFileError, ReplayMismatch
from .job import write_private_bytes
from .registry import method_of, method_of_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportReport:
    checkpoint_id: int  # the imported checkpoint, now current
    n_steps: int
    method: Method


def export_checkpoint(store: Store, checkpoint_id: int) -> bytes:
    """The checkpoint as a standalone file's bytes (CheckpointNotFound, CheckpointFileError)."""
    return method_of(store.log.get(checkpoint_id)).export_bytes(store, checkpoint_id)


def write_checkpoint(store: Store, checkpoint_id: int, path: Path, *, force: bool = False) -> int:
    """Export a checkpoint to `path` (written atomically, mode 0600); return the bytes written.
    FileExistsError if `path` exists and `force` is not set."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; use --force to overwrite it")
    data = export_checkpoint(store, checkpoint_id)
    write_private_bytes(path, data)
    return len(data)


def read_checkpoint_file(path: Path) -> bytes:
    """A checkpoint file's bytes; CheckpointFileError naming the file if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read: {e.strerror or e}") from e


def import_checkpoint(store: Store, data: bytes, cfg: TrainerConfig, cache_dir: Path, *,
                      name: str = "checkpoint file", note: str | None = None) -> ImportReport:
    """Store a checkpoint file's bytes, verify it on the configured base, and make it current.

    CheckpointFileError (naming `name`) if the bytes are not a valid file, or if the checkpoint
    does not verify: then it is kept as a REJECTED checkpoint and the current one is unchanged.
    Any other failure of the verification also leaves it REJECTED and is raised as is.
    """
    method = method_of_file(data, name)
    cid, n_steps = method.import_bytes(store, data, name, note)
    try:
        load_checkpoint(store, cfg, cache_dir, cid, verify=True)
    except Exception as e:
        store.log.set_status(cid, Status.REJECTED, note=f"{note or name}: failed verification")
        if isinstance(e, ReplayMismatch):
            raise CheckpointFileError(f"{name}: does not verify ({e}); kept as rejected checkpoint "
                                      f"{cid}, the current checkpoint is unchanged") from e
        raise
    store.log.set_status(cid, Status.CURRENT)
    log.info("imported %s as checkpoint %d (%d steps)", name, cid, n_steps)
    return ImportReport(cid, n_steps, method.key)
