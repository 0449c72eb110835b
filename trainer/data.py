"""Training and validation items from the store: token ids cached per tokenizer, cut into windows."""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pocketd.store import Store

from .loss import Batch
from .stopping import PrepPhase, check_stop

log = logging.getLogger(__name__)

MAX_CACHED_TOKENS = 8192  # per example; longer examples are rare (examples are <= example_max_chars)


def tokenizer_fingerprint(tokenizer: object) -> str:
    """A short hash identifying the tokenizer's vocabulary and rules (the token cache's key)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))  # type: ignore[attr-defined]
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Item:
    example_id: int
    document_id: int
    ids: np.ndarray  # int32 token ids of one window, len <= seq_len


TOKENIZE_BATCH = 256  # examples tokenized, then committed to the token cache, between stop checks


def token_ids(store: Store, tokenizer: object, example_ids: list[int], *,
              stop: threading.Event | None = None) -> dict[int, np.ndarray]:
    """Token ids (with EOS appended) of each example, tokenizing only those not cached yet.

    New ids are committed to the store's token cache every TOKENIZE_BATCH examples, so work
    done before a stop (Stopped, checked after every example) is kept for the next session.
    """
    fp = tokenizer_fingerprint(tokenizer)
    cached = store.docs.cached_tokens(fp, example_ids)
    out = {k: np.frombuffer(v, dtype=np.int32) for k, v in cached.items()}
    missing = [i for i in example_ids if i not in out]
    eos = getattr(tokenizer, "eos_token_id", None)
    done = 0
    for start in range(0, len(missing), TOKENIZE_BATCH):
        texts = store.docs.example_texts(missing[start : start + TOKENIZE_BATCH])
        new: dict[int, bytes] = {}
        try:
            for ex_id, text in texts.items():
                check_stop(stop, PrepPhase.TOKENIZING)
                ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_CACHED_TOKENS]  # type: ignore[operator]
                if eos is not None and len(ids) < MAX_CACHED_TOKENS:
                    ids = [*ids, eos]
                arr = np.asarray(ids, dtype=np.int32)
                out[ex_id] = arr
                new[ex_id] = arr.tobytes()
        finally:
            if new:  # also when stopped: the next session continues from here
                store.docs.cache_tokens(fp, new)
                done += len(new)
    if missing:
        log.info("tokenized %d examples (%d were cached)", done, len(cached))
    return out


def items_for(store: Store, tokenizer: object, split: str, seq_len: int, *,
              stop: threading.Event | None = None) -> list[Item]:
    """Every window of seq_len tokens (stride seq_len) of every example of a split, in example order."""
    ids = store.docs.example_ids(split)  # type: ignore[arg-type]
    docs = store.docs.document_ids_of_examples(ids)
    toks = token_ids(store, tokenizer, ids, stop=stop)
    items: list[Item] = []
    for ex_id in ids:
        arr = toks[ex_id]
        for start in range(0, max(len(arr) - 1, 1), seq_len):
            window = arr[start : start + seq_len]
            if len(window) >= 2:
                items.append(Item(ex_id, docs[ex_id], window))
    return items


def collate(items: list[Item], pad_id: int) -> Batch:
    """Right-padded [B, T] ids and mask."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it.ids)] = torch.from_numpy(it.ids.astype(np.int64))
        mask[row, : len(it.ids)] = 1
    return Batch(ids, mask, tuple(it.example_id for it in items))


class BatchSampler:
    """Endless batches: least-trained examples first, shuffled by a private RNG, reshuffled each pass."""

    def __init__(self, items: list[Item], trained_counts: dict[int, int], batch_size: int, seed: int) -> None:
        if not items:
            raise ValueError("no training items")
        self.items = items
        self.batch_size = min(batch_size, len(items))
        self.rng = random.Random(seed)
        self.counts = dict(trained_counts)
        self._queue: list[Item] = []

    def _refill(self) -> None:
        order = list(self.items)
        self.rng.shuffle(order)
        order.sort(key=lambda it: self.counts.get(it.example_id, 0))  # stable: shuffled within a count
        self._queue = order

    def next(self) -> list[Item]:
        if len(self._queue) < self.batch_size:
            self._refill()
        batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        for it in batch:
            self.counts[it.example_id] = self.counts.get(it.example_id, 0) + 1
        return batch


def pad_id_of(tokenizer: object) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
