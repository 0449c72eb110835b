"""Verified snapshots of a seed-log checkpoint's trainable tensors (store.snapshots), trainer side.

`take` stores the tensors at a step whose hash the log records (nothing if it does not, or if the
tensors are larger than MAX_SNAPSHOT_BYTES: full-model training would copy the whole model);
`newest_on_chain` finds the snapshot a load can start from and checks it before it touches the
model: its safetensors header against the trainable set (before anything is allocated from it),
its tensors' hash against both the snapshot's and the log's recorded hash at that step, and that
every value is finite. A snapshot failing any check is a `SnapshotUnusable` the caller turns into a
warning and a full replay: never a wrong model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pocketd.store import Checkpoint, Store

from .errors import CheckpointFileError
from .params import TrainableSet

log = logging.getLogger(__name__)

MAX_SNAPSHOT_BYTES = 256 * 2**20  # the default LoRA spec is well under 1 MiB; a full 135M model is 540 MB
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


class SnapshotUnusable(Exception):
    """A stored snapshot that cannot be trusted (corrupt, not matching the log or the spec)."""


@dataclass(frozen=True)
class Loaded:
    """A verified snapshot: the chain position it stands for and its tensors (not yet on the model)."""

    chain_index: int  # index in the chain (root first) of the checkpoint it belongs to
    n_steps: int  # steps of that checkpoint it includes
    tensors: tuple[torch.Tensor, ...]  # in the trainable set's order


def pack(params: TrainableSet) -> bytes:
    """The tensors as safetensors bytes, keyed by their names."""
    from safetensors.torch import save

    return save({n: t.detach().contiguous() for n, t in zip(params.names, params.tensors)})


def take(store: Store, checkpoint_id: int, n_steps: int, params: TrainableSet, sha256: str | None = None) -> int:
    """Store `params` as the checkpoint's snapshot after `n_steps` of its steps; return the bytes stored (0:
    none, as when the log records no matching hash there, or the tensors are too large). Never raises for
    a snapshot that could not be stored: the log alone stays enough."""
    if params.nbytes() > MAX_SNAPSHOT_BYTES or any(t.dtype not in _ST_DTYPES for t in params.tensors):
        return 0
    sha = sha256 if sha256 is not None else params.sha256()
    data = pack(params)
    store.snapshots.save(checkpoint_id, n_steps, data, sha)
    got = store.snapshots.get(checkpoint_id)
    return len(data) if got is not None and got.sha256 == sha and got.n_steps == n_steps else 0


def newest_on_chain(store: Store, params: TrainableSet, chain: Sequence[Checkpoint],
                    hashes: Sequence[dict[int, str]]) -> Loaded | None:
    """The newest usable snapshot on the chain (leaf first), verified (module docstring); None if there is none.

    `hashes[i]`: the log's recorded hashes of chain[i] (only those within the steps read). A snapshot that
    fails a check is logged as a warning and skipped (an older one on the chain may still serve).
    """
    for i in range(len(chain) - 1, -1, -1):
        ck = chain[i]
        snap = store.snapshots.get(ck.id)
        if snap is None:
            continue
        what = f"snapshot of checkpoint {ck.id} at step {snap.n_steps}"
        try:
            if snap.n_steps > ck.n_steps:
                raise SnapshotUnusable(f"{what}: the checkpoint holds only {ck.n_steps} steps")
            logged = hashes[i].get(snap.n_steps)
            if logged is None or logged != snap.sha256:
                raise SnapshotUnusable(f"{what}: the log records {'no hash' if logged is None else logged[:12]} "
                                       f"there, the snapshot says {snap.sha256[:12]}")
            tensors = _read(params, snap.data, what)
            got = TrainableSet(params.names, tensors).sha256()
            if got != logged:
                raise SnapshotUnusable(f"{what}: its tensors hash to {got[:12]}, the log says {logged[:12]}")
            for name, t in zip(params.names, tensors):
                if not bool(torch.isfinite(t).all()):
                    raise SnapshotUnusable(f"{what}: tensor {name} holds NaN or infinite values")
        except SnapshotUnusable as e:
            log.warning("%s; replaying the log instead", e)
            continue
        return Loaded(i, snap.n_steps, tensors)
    return None


def put(params: TrainableSet, loaded: Loaded) -> None:
    """Copy a verified snapshot's tensors into params in place."""
    with torch.no_grad():
        for t, s in zip(params.tensors, loaded.tensors):
            t.copy_(s)


def _read(params: TrainableSet, data: bytes, what: str) -> tuple[torch.Tensor, ...]:
    """The snapshot's tensors in params' order; its header is checked against params before loading."""
    from safetensors.torch import load

    from .sidefile import tensor_header

    try:
        header = tensor_header(data, what)
    except CheckpointFileError as e:
        raise SnapshotUnusable(str(e)) from None
    if set(header) != set(params.names):
        raise SnapshotUnusable(f"{what}: its tensors are not the trainable part's "
                               f"({len(header)} stored, {len(params.names)} expected)")
    for name, t in zip(params.names, params.tensors):
        if header[name] != (_ST_DTYPES.get(t.dtype), tuple(t.shape)):
            raise SnapshotUnusable(f"{what}: tensor {name} is {header[name]}, the spec needs "
                                   f"{tuple(t.shape)} {t.dtype}")
    try:
        stored = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError or ValueError on bad bytes
        raise SnapshotUnusable(f"{what}: unreadable ({e})") from None
    return tuple(stored[n] for n in params.names)
