"""Recording the hashes of a chain that forget rebuilt (replays it on a fresh base: needs torch).

The daemon's socket `forget` leaves a rebuilt chain unhashed (it never loads torch); the next
training session records its end hash after replaying it, before training on it. The CLI's
`pocketd forget` records them at once, here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pocketd.store import Store

from .config import TrainerConfig
from .registry import method_of

log = logging.getLogger(__name__)


def record_rebuilt_hashes(store: Store, cfg: TrainerConfig, cache_dir: Path, checkpoint_id: int) -> None:
    """Replay the chain ending at `checkpoint_id` on a freshly loaded base and store the hashes its
    method's verification needs (ModelNotFound / BaseMismatch as loading a checkpoint does)."""
    from .model import load_base

    base = load_base(cfg.model, cache_dir, cfg.dtype)
    method_of(store.log.get(checkpoint_id)).record_hashes(store, base.model, base.fingerprint, checkpoint_id)
    log.info("recorded the hashes of rebuilt checkpoint %d", checkpoint_id)
