"""Memory: the process's RSS and an estimate of what a session needs, checked before loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import psutil

from .config import DType, TrainerConfig
from .method import ModelShape
from .registry import method_for

log = logging.getLogger(__name__)

RUNTIME_OVERHEAD_MB = 420.0  # python + torch + transformers + tokenizer, measured on x86_64 CPU


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _count_gguf_params(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return sum(int(t.n_elements) for t in reader.tensors)


def _dir_params(path: Path) -> tuple[int, dict]:
    cfg = json.loads((path / "config.json").read_text())
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total, cfg


def model_shape(cfg: TrainerConfig, model_path: Path) -> ModelShape:
    """The sizes of the base model at `model_path` (a .gguf file or a model directory)."""
    if model_path.suffix == ".gguf":
        n_params, mcfg = _count_gguf_params(model_path), {}
    else:
        n_params, mcfg = _dir_params(model_path)
    hidden = int(mcfg.get("hidden_size", 576))
    return ModelShape(n_params=n_params, hidden=hidden, inter=int(mcfg.get("intermediate_size", 4 * hidden)),
                      vocab=int(mcfg.get("vocab_size", 49152)), heads=int(mcfg.get("num_attention_heads", 9)),
                      bytes_per=2 if cfg.dtype is DType.BFLOAT16 else 4)


def estimate_need_mb(cfg: TrainerConfig, model_path: Path) -> float:
    """Peak RSS a session should reach: weights + the method's working memory (activations, trainable
    copies) + one chunk of LM-head logits + runtime."""
    shape = model_shape(cfg, model_path)
    weights = shape.n_params * shape.bytes_per
    logits = cfg.loss_chunk_tokens * shape.vocab * 4 * 3
    working = method_for(cfg.method).working_bytes(cfg, shape)
    need = RUNTIME_OVERHEAD_MB + (weights + working + logits) / 2**20
    if model_path.suffix == ".gguf":
        # First use: transformers dequantizes the GGUF, holding a float32 copy beside the model
        # (measured: 1139 MiB peak for the 135M default), before the session proper starts.
        need = max(need, RUNTIME_OVERHEAD_MB + shape.n_params * 4 * 1.35 / 2**20)
    return float(need)
