"""Trainable-part specs from outside (a checkpoint file, a stored row): the config's bounds, and the fit to a base.

A spec dict is checked with the same field bounds as `[trainer]` (trainer.config) before
anything is allocated from it (LoRA rank, layers, the side MLP's width), and its fit to the
loaded base (layer count, target modules) before adapters are attached.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ValidationError
from torch import nn

from .config import LoraTargets, TrainerConfig
from .errors import SpecError
from .lora import LoraSpec, decoder_layers, target_paths

_LORA_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha", "targets": "lora_targets", "layers": "lora_layers",
                "seed": "lora_seed", "fa": "lora_fa"}
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; ours are 63-bit


def config_bounds(fields: dict[str, Any], what: str) -> None:
    """SpecError naming the field unless every `[trainer]` field in `fields` is within the config's bounds."""
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{what}: {key} = {value} is not a finite number")
        if isinstance(value, bool) and TrainerConfig.model_fields[key].annotation is not bool:
            raise SpecError(f"{what}: {key} = {value!r} is not a number")
    try:  # strict: "8" is not a rank; JSON mode: enum values are their strings
        TrainerConfig.model_validate_json(json.dumps(fields, allow_nan=False), strict=True)
    except (ValueError, TypeError) as e:
        if not isinstance(e, ValidationError):
            raise SpecError(f"{what}: {e}") from None
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "spec"
        raise SpecError(f"{what}: {loc}: {err['msg']}") from None


def lora_from_dict(d: Any, what: str) -> LoraSpec:
    """A LoraSpec from a stored dict, within the config's bounds; SpecError otherwise."""
    if not isinstance(d, dict) or set(d) - set(_LORA_FIELDS) or not {"rank", "alpha", "targets", "seed"} <= set(d):
        raise SpecError(f"{what}: not a LoRA spec: {str(d)[:200]}")
    config_bounds({_LORA_FIELDS[k]: v for k, v in d.items() if v is not None or k != "layers"}, what)
    if not isinstance(d["seed"], int) or not 0 <= d["seed"] <= MAX_SEED:
        raise SpecError(f"{what}: lora seed {d['seed']!r} out of range")
    targets = LoraTargets(d["targets"]).value
    return LoraSpec(int(d["rank"]), float(d["alpha"]), targets, d.get("layers"), int(d["seed"]), bool(d.get("fa", False)))


def check_lora_fit(model: nn.Module, spec: LoraSpec) -> None:
    """SpecError unless the spec's adapters fit the loaded base: it has a layer list and linear layers of the
    spec's targets in it. (`layers` beyond the base's count means all of them, as in the config; the rank is
    within the config's bounds, so what attaching allocates is bounded by the base's own size.)"""
    try:
        decoder_layers(model)
    except ValueError as e:
        raise SpecError(str(e)) from None
    if not target_paths(model, spec):
        raise SpecError(f"the base has no linear layers matching lora targets {spec.targets!r}")
