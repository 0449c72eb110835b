"""A bounded on-disk cache of frozen-prefix activations, so later epochs skip the bottom layers.

One directory per (base fingerprint, prefix layer, dtype); one file per training
window, named by a hash of its token ids, holding the hidden states entering the
first trainable layer for the window's real tokens ([t, H], no padding). A window's
activations depend only on its tokens (causal attention, positions from 0), so the
content hash is a complete key: a forgotten or edited document can never be served
stale activations of other text. Files are written atomically and privately; an
unreadable or wrong-sized file is a miss (and is removed). When the directory grows
past its byte bound, the least recently used files go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pocketd.store.private import atomic_write, make_private_dir, tighten_dir

log = logging.getLogger(__name__)

_SUFFIX = ".act"


def window_key(ids: np.ndarray) -> str:
    """Content key of a window's token ids."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes()).hexdigest()[:32]


class ActivationCache:
    """Hidden states [t, H] per window key, at most `max_bytes` on disk (LRU by file mtime)."""

    def __init__(self, root: Path, base_fingerprint: str, layer: int, dtype: torch.dtype, hidden_size: int,
                 max_bytes: int) -> None:
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.max_bytes = max_bytes
        self.dir = root / f"{base_fingerprint[:16]}-L{layer}-{str(dtype).removeprefix('torch.')}-H{hidden_size}"
        self.hits = 0
        self.misses = 0
        for d in (root, self.dir):
            tighten_dir(make_private_dir(d))
        self._sizes = {p.name: p.stat().st_size for p in self.dir.glob(f"*{_SUFFIX}")}
        for stale in self.dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    @property
    def bytes_used(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._sizes)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}{_SUFFIX}"

    def get(self, key: str, n_tokens: int) -> torch.Tensor | None:
        """The cached [n_tokens, H] activations of a window, or None."""
        path = self._path(key)
        if path.name not in self._sizes:
            self.misses += 1
            return None
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        want = n_tokens * self.hidden_size * itemsize
        try:
            raw = path.read_bytes()
            if len(raw) != want:
                raise ValueError(f"{len(raw)} bytes, expected {want}")
            os.utime(path)  # most recently used
        except (OSError, ValueError) as e:
            log.warning("activation cache file %s is unusable (%s): removed", path, e)
            self._drop(path)
            self.misses += 1
            return None
        self.hits += 1
        flat = torch.frombuffer(bytearray(raw), dtype=self.dtype)
        return flat.view(n_tokens, self.hidden_size)

    def put(self, key: str, hidden: torch.Tensor) -> None:
        """Store a window's [t, H] activations (no-op if they would not fit the bound at all)."""
        data = hidden.detach().to(self.dtype).contiguous().view(torch.uint8).numpy().tobytes()
        if len(data) > self.max_bytes:
            return
        self._evict(self.max_bytes - len(data))
        path = self._path(key)
        try:  # not fsynced: a cache, and get() drops a file of the wrong size
            atomic_write(path, data, durable=False)
        except OSError as e:
            log.warning("could not write activation cache file %s: %s", path, e)
            return
        self._sizes[path.name] = len(data)

    def _evict(self, room: int) -> None:
        if self.bytes_used <= room:
            return
        by_age = sorted(self._sizes, key=lambda n: _mtime(self.dir / n))
        for name in by_age:
            if self.bytes_used <= room:
                break
            self._drop(self.dir / name)

    def _drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._sizes.pop(path.name, None)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def clear(root: Path) -> int:
    """Remove every cached activation under root (e.g. after `forget`); returns files removed."""
    if not root.exists():
        return 0
    n = sum(1 for _ in root.rglob(f"*{_SUFFIX}"))
    shutil.rmtree(root, ignore_errors=True)
    return n
