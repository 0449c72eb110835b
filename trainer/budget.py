"""Memory: the process's RSS and an estimate of what a session needs, checked before loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import psutil

from .config import DType, Method, SidePart, Trainable, TrainerConfig

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


def estimate_need_mb(cfg: TrainerConfig, model_path: Path) -> float:
    """Peak RSS a session should reach: weights + trainable copy + one micro-batch's activations + runtime."""
    bytes_per = 2 if cfg.dtype is DType.BFLOAT16 else 4
    if model_path.suffix == ".gguf":
        n_params, mcfg = _count_gguf_params(model_path), {}
    else:
        n_params, mcfg = _dir_params(model_path)
    weights = n_params * bytes_per
    hidden = int(mcfg.get("hidden_size", 576))
    inter = int(mcfg.get("intermediate_size", 4 * hidden))
    vocab = int(mcfg.get("vocab_size", 49152))
    heads = int(mcfg.get("num_attention_heads", 9))
    micro = min(cfg.batch_size, cfg.micro_batch_size)
    tokens = micro * cfg.seq_len
    activations = tokens * (hidden * 6 + inter * 3) * 4 + micro * heads * cfg.seq_len**2 * 4
    if cfg.batched_perturbations:  # the top layers see the micro-batch 2n times at once
        activations *= 2 * cfg.n_perturbations
    if cfg.trainable is Trainable.LORA and cfg.lora_layers and cfg.prefix_sharing:
        activations += cfg.batch_size * cfg.seq_len * hidden * 4  # the step's shared prefix
    logits = cfg.loss_chunk_tokens * vocab * 4 * 3
    snapshot = 0 if cfg.trainable is Trainable.FULL else n_params * 0.02 * 4  # LoRA copy: a few % at most
    if cfg.method is Method.SIDE:
        # Backprop through the trained top layers: each keeps its activations for the backward pass and
        # gets their gradients; plus the step's prefixes, the final hidden states and their gradient leaf.
        k = cfg.lora_layers or 0 if cfg.side_part is SidePart.ADAPTERS else 0
        per_layer = tokens * (hidden * 6 + inter * 3) * 4 + micro * heads * cfg.seq_len**2 * 4
        activations = per_layer * (1 + 2 * k) + cfg.batch_size * cfg.seq_len * hidden * 4 + tokens * hidden * 4 * 3
        snapshot *= 4  # the trained tensors, their gradients and AdamW's two moments
    need = RUNTIME_OVERHEAD_MB + (weights + activations + logits + snapshot) / 2**20
    if model_path.suffix == ".gguf":
        # First use: transformers dequantizes the GGUF, holding a float32 copy beside the model
        # (measured: 1139 MiB peak for the 135M default), before the session proper starts.
        need = max(need, RUNTIME_OVERHEAD_MB + n_params * 4 * 1.35 / 2**20)
    return float(need)
