"""Checkpoint files: export a checkpoint (its whole chain) as one standalone file, import one back.

The file's kind (its magic) names the method whose format it is (trainer.registry);
each method packs and parses its own format (mezo: trainer.ckptfile, side:
trainer.sidefile). A file comes from outside: it is read only if it is a regular file
of bounded size, every count and spec in it is checked before anything is allocated
from it, and it is rebuilt and verified in memory; it goes through the same promotion
gate as a session (validation loss must improve), and only then is it stored, in one
transaction (an interrupted import leaves nothing).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pocketd.store import Status, Store

from .checkpoints import apply_checkpoint
from .config import Method, TrainerConfig
from .errors import CheckpointFileError, ReplayMismatch, SpecError
from .job import write_private_bytes
from .method import Progress
from .registry import method_of, method_of_file
from .specbounds import check_lora_fit

log = logging.getLogger(__name__)


MAX_FILE_BYTES = 256 << 20
"""The largest checkpoint file read: a mezo log of ~16 M single-perturbation steps (16 bytes each) plus its
header, or a side part at the config's bounds (an MLP of width 8192 on a 2048-wide base in float32 is
128 MiB). Anything larger is refused from its size before a byte is read."""


class Verification(str, Enum):
    VERIFIED = "verified"  # the final weights matched a hash the file carries
    UNVERIFIED = "unverified (no hashes)"  # the file carries no hash of the final weights


@dataclass(frozen=True)
class ImportReport:
    checkpoint_id: int  # the imported checkpoint
    n_steps: int
    method: Method
    verification: Verification
    promoted: bool  # now current; otherwise kept as rejected
    reason: str  # why it was (not) promoted


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


def read_checkpoint_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A checkpoint file's bytes; CheckpointFileError naming the file if it cannot be read.

    Only a regular file (a symlink to one is fine) of at most `limit` bytes is read: the
    file is opened non-blocking (a FIFO never blocks), checked with fstat (devices, FIFOs,
    sockets and directories are refused, and so is a file over the limit, sparse or not)
    and read to its size, never more.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointFileError(f"{path}: not a regular file ({_kind(st.st_mode)}); a checkpoint file is "
                                      "a regular file")
        if st.st_size > limit:
            raise CheckpointFileError(f"{path}: {st.st_size} bytes is larger than any checkpoint file "
                                      f"(at most {limit} bytes)")
        os.set_blocking(fd, True)
        chunks, left = [], st.st_size + 1  # one byte more: a file that grew is refused, not read on
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise CheckpointFileError(f"{path}: the file grew while it was read")
        return b"".join(chunks)
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def import_checkpoint(store: Store, data: bytes, cfg: TrainerConfig, cache_dir: Path, *,
                      name: str = "checkpoint file", note: str | None = None,
                      stop: threading.Event | None = None,
                      progress: Progress | None = None) -> ImportReport:
    """Check a checkpoint file's bytes, rebuild it on the configured base in memory, gate it, then store it.

    In order, nothing written before the last step: the file is parsed and its spec checked
    against the config's bounds (CheckpointFileError naming `name`); the base is loaded and
    the spec's fit to it checked; the reference (the current checkpoint, or the base) is
    evaluated on the validation split; the file's part is rebuilt on a fresh base (every
    hash it carries compared, the result finite) and evaluated; then one transaction stores
    it, as CURRENT if its validation loss beats the reference's, else as REJECTED (with no
    validation examples: CURRENT only if the file's hashes verified its final weights). A
    file that does not verify is refused and nothing is stored, as after any interruption.
    """
    from .model import load_base

    method = method_of_file(data, name)
    f = method.read_file(data, name)
    if f.base_fingerprint != (fp := _configured_fingerprint(cfg, cache_dir, stop)):
        raise CheckpointFileError(f"{name}: trained on base {f.base_fingerprint[:12]}, but the configured base is "
                                  f"{fp[:12]}; set trainer.model to that base to import it")
    spec = method.spec_from_dict(f.spec)
    base = load_base(cfg.model, cache_dir, cfg.dtype, stop=stop)
    lora = method.lora_spec(spec)
    try:
        if lora is not None:
            check_lora_fit(base.model, lora)
    except SpecError as e:
        raise CheckpointFileError(f"{name}: its spec does not fit the configured base: {e}") from None
    items = _validation_items(store, base, cfg, stop)
    reference = None
    if items:
        current = store.log.current()
        if current is not None:
            apply_checkpoint(store, base.model, current, base.fingerprint)
        reference = _evaluate(base, items, cfg, stop)
        del base
        base = load_base(cfg.model, cache_dir, cfg.dtype, stop=stop)
    try:
        part = method.attach(base.model, spec)
        verified = f.apply(part, progress)
    except SpecError as e:
        raise CheckpointFileError(f"{name}: its spec does not fit the configured base: {e}") from None
    except ReplayMismatch as e:
        raise CheckpointFileError(f"{name}: does not verify ({e}); nothing was imported") from None
    verification = Verification.VERIFIED if verified else Verification.UNVERIFIED
    val_loss = ref_loss = None
    if reference is not None:
        cand = _evaluate(base, items, cfg, stop)
        val_loss, ref_loss = cand.loss, reference.loss
        promoted = math.isfinite(cand.loss) and cand.loss < reference.loss
        reason = f"validation loss {reference.loss:.4f} -> {cand.loss:.4f}"
        if not promoted:
            reason += " did not improve"
    else:
        promoted = verified
        reason = "no validation examples to gate it" + ("" if verified else ", and it is unverified")
    status = Status.CURRENT if promoted else Status.REJECTED
    cid = f.save(store, status, note, val_loss if val_loss is not None and math.isfinite(val_loss) else None,
                 ref_loss if ref_loss is not None and math.isfinite(ref_loss) else None)
    if verified:  # the replayed weights matched the file's final hash: a snapshot spares later loads the replay
        method.save_snapshot(store, cid, part)
    log.info("imported %s as checkpoint %d (%d steps, %s, %s)", name, cid, f.n_steps, verification.value,
             status.value)
    return ImportReport(cid, f.n_steps, method.key, verification, promoted, reason)


def _configured_fingerprint(cfg: TrainerConfig, cache_dir: Path, stop: threading.Event | None) -> str:
    """The configured base's fingerprint, from its file hashes only (no model load)."""
    from .model import base_fingerprint

    return base_fingerprint(cfg.model, cache_dir, stop=stop)


def _validation_items(store: Store, base: Any, cfg: TrainerConfig, stop: threading.Event | None) -> list[Any]:
    from .data import items_for
    from .evaluate import eval_items

    return eval_items(items_for(store, base.tokenizer, "validation", cfg.seq_len, stop=stop), cfg.eval_examples)


def _evaluate(base: Any, items: list[Any], cfg: TrainerConfig, stop: threading.Event | None) -> Any:
    from .data import pad_id_of
    from .evaluate import evaluate

    return evaluate(base.model, items, pad_id=pad_id_of(base.tokenizer), batch_size=cfg.batch_size,
                    micro_batch=cfg.micro_batch_size, chunk_tokens=cfg.loss_chunk_tokens, stop=stop)
