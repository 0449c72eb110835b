"""The GGUF weights stage resumes per chunk of tensors and gives exactly the old from_pretrained result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketd.trainer import gguf_convert
from pocketd.trainer.model import default_gguf_path, save_plain_model


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_then_resumed_weights_equal_from_pretrained(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    old = tmp_path / "old"
    old.mkdir()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  local_files_only=True, dtype=torch.float32)
    save_plain_model(loaded, old)
    del loaded

    new = tmp_path / "new"
    new.mkdir()

    def stop_after_3(i: int) -> None:
        if i == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        gguf_convert.convert_weights(gguf, new, chunk_bytes=64 << 20, after_chunk=stop_after_3)
    assert len(list(new.glob(f"{gguf_convert.CHUNK_PREFIX}*"))) == 3
    assert not (new / "model.safetensors").exists()

    seen: list[int] = []
    gguf_convert.convert_weights(gguf, new, chunk_bytes=64 << 20, after_chunk=seen.append)
    gguf_convert.remove_progress(new)
    assert seen and seen[0] == 3  # resumed after the 3 chunks kept, not from zero
    assert not list(new.glob(f"{gguf_convert.CHUNK_PREFIX}*"))
    assert not (new / gguf_convert.WEIGHTS_MARKER).exists()

    a, b = load_file(str(new / "model.safetensors")), load_file(str(old / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("config.json", "generation_config.json"):
        assert (new / f).read_text() == (old / f).read_text()
