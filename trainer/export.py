"""Exporting a trained model: a merged Hugging Face directory or a PEFT LoRA adapter.

Both are written into a private temporary directory next to the target and
renamed into place, so a failed export leaves nothing behind. Directories are
0700, files 0600. A non-empty target is refused (OutputNotEmpty) unless
`force` is given, and even then only a previous pocketd export (it holds
`pocketd-export.json`) is replaced: pocketd never deletes a folder it did not write.

PEFT is not needed to write an adapter (it is only a test dependency); the
format written is the one `peft.PeftModel.from_pretrained(base, dir)` reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from pocketd.store.private import make_private_dir

from .errors import ExportError, OutputNotEmpty
from .lora import LoraLinear, LoraSpec, lora_modules, merge_lora

log = logging.getLogger(__name__)

MARKER = "pocketd-export.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_merged(model: nn.Module, tokenizer: Any, out_dir: Path, *, force: bool = False,
                  info: dict[str, Any] | None = None) -> Path:
    """Write `model` with its LoRA adapters folded in as a Hugging Face model directory.

    The adapters are merged into `model` in place (it is a plain transformers
    model afterwards); a model without adapters (trainable = full) is saved as is.
    """
    from .model import save_plain_model

    out_dir = Path(out_dir).expanduser()
    _check_target(out_dir, force)
    n = len(lora_modules(model))
    merge_lora(model)
    if lora_modules(model) or not hasattr(model, "config"):
        raise ExportError("the model is not a plain transformers model after merging its adapters")
    with _staged(out_dir) as tmp:
        save_plain_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, {"kind": "merged", "merged_adapters": n, **(info or {})})
    log.info("merged model (%d adapters folded in) exported to %s", n, out_dir)
    return out_dir


def export_adapter(model: nn.Module, spec: LoraSpec, base_source: str, out_dir: Path, *,
                   force: bool = False, info: dict[str, Any] | None = None) -> Path:
    """Write the model's LoRA adapters in PEFT format (adapter_config.json + adapter_model.safetensors).

    `base_source` goes into base_model_name_or_path: the Hugging Face directory
    the adapters apply to (for a GGUF base, its converted copy).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser()
    loras = lora_modules(model)
    if not loras:
        raise ExportError("the model has no LoRA adapters (trainable = full?): export it with --merged")
    _check_spec(loras, spec)
    _check_target(out_dir, force)
    tensors = {}  # name -> [r, in] (A) or [out, r] (B)
    for path, lora in loras.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora.lora_A.detach().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora.lora_B.detach().contiguous()
    config = _peft_config(model, list(loras), spec, base_source)
    with _staged(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _write_marker(tmp, {"kind": "adapter", "adapters": len(loras), **(info or {})})
    log.info("%d LoRA adapters exported to %s", len(loras), out_dir)
    return out_dir


def _check_spec(loras: dict[str, LoraLinear], spec: LoraSpec) -> None:
    for path, lora in loras.items():
        if lora.lora_A.shape[0] != spec.rank or abs(lora.scale - spec.alpha / spec.rank) > 1e-12:
            raise ExportError(
                f"{path}: adapter of rank {lora.lora_A.shape[0]} and scale {lora.scale} does not match "
                f"the spec (rank {spec.rank}, alpha {spec.alpha})"
            )


def _peft_config(model: nn.Module, paths: list[str], spec: LoraSpec, base_source: str) -> dict[str, Any]:
    """A PEFT LoraConfig as JSON. target_modules: the short names if they select exactly the
    adapted layers, else the full module paths (e.g. when only the top N layers have adapters)."""
    short = sorted({p.rpartition(".")[2] for p in paths})
    selected = {n for n, m in model.named_modules() if n.rpartition(".")[2] in short
                and isinstance(m, (nn.Linear, LoraLinear))}
    targets = short if selected == set(paths) else sorted(paths)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_source,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }


# ---------------------------------------------------------------------------
# Writing the output directory


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not force:
        raise OutputNotEmpty(f"{out_dir}: directory is not empty (use --force to replace a previous export)")
    if not (out_dir / MARKER).is_file():
        raise OutputNotEmpty(
            f"{out_dir}: directory is not empty and is not a pocketd export; refusing to replace it "
            "even with --force (choose a new or empty directory)"
        )


class _staged:
    """Context manager: a 0700 temp dir next to `out_dir`, moved into place on success."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        make_private_dir(self.out_dir.parent)  # missing folders 0700; the user's existing ones untouched
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(mode=0o700)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _make_private(self.tmp)
            old = None
            if self.out_dir.exists():  # empty, or a previous export (checked by _check_target)
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
                os.rename(self.out_dir, old)
            os.rename(self.tmp, self.out_dir)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ExportError(f"{self.out_dir}: cannot write the export: {e.strerror or e}") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _make_private(root: Path) -> None:
    root.chmod(0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o700)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o600)


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
