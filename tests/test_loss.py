"""The chunked loss equals the plain transformers loss and never needs full logits."""

from __future__ import annotations

import pytest
import torch

from pocketd.trainer.loss import Batch, loss_sum, mean_loss
from tests.test_zo import batch, tiny_llama


@pytest.mark.parametrize("micro,chunk", [(1, 3), (2, 5), (4, 1000)])
def test_chunked_loss_matches_transformers(micro, chunk):
    model = tiny_llama()
    b = batch()
    labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
    with torch.inference_mode():
        ref = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss.item()
    got = mean_loss(model, b, micro_batch=micro, chunk_tokens=chunk)
    assert got == pytest.approx(ref, rel=1e-5)
    total, n = loss_sum(model, b, micro_batch=micro, chunk_tokens=chunk)
    assert n == b.n_targets()


def test_logits_never_exceed_the_chunk(monkeypatch):
    model = tiny_llama()
    head = model.get_output_embeddings()
    rows = []
    orig = head.forward
    monkeypatch.setattr(head, "forward", lambda x: rows.append(x.shape[0]) or orig(x))
    b = Batch(torch.randint(0, 64, (8, 16)), torch.ones(8, 16, dtype=torch.long))
    mean_loss(model, b, micro_batch=2, chunk_tokens=10)
    assert rows and max(rows) <= 10
