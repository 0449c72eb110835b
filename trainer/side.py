"""The side method's trainable part, attached to a frozen base, and its tensor checkpoints.

Three kinds (`trainer.side_part`), each trained by backprop through itself only:

- adapters: LoRA adapters (A and B) in the top `lora_layers` decoder layers; the layers
  below run once per example and their output is cached (trainer.actcache);
- mlp: an additive network on the final hidden state, h + W2 gelu(W1 h + b1), applied
  by a forward hook on the backbone's final norm, so every path that runs the model
  (evaluation, generation) sees it. W2 starts at zero: a fresh side part is the base;
- block: k decoder layers appended after the last one (LLaMA Pro block expansion,
  trainer.sideblock), each a copy of the last layer with its output projections zeroed,
  so a fresh expansion is the base too; the base's layers run once per example (their
  output is cached) and the result is a standard model of L + k layers.

A checkpoint of this method is the trainable tensors as safetensors bytes, plus the
hash of their exact bytes (the same `TrainableSet.sha256` the seed logs use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .config import SidePart, Trainable, TrainerConfig
from .errors import CheckpointFileError, ReplayMismatch, SpecError
from .lora import LoraSpec, attach_lora
from .params import TrainableSet, trainable_set
from .replay import check_finite
from .prefix import Parts
from .method import check_base
from .specbounds import MAX_SEED, check_lora_fit, config_bounds, lora_from_dict

if TYPE_CHECKING:
    from pocketd.store import Checkpoint, Store


@dataclass(frozen=True)
class SideSpec:
    """The trainable-part spec recorded in every side checkpoint."""

    part: SidePart
    lora: LoraSpec | None = None  # part adapters
    hidden: int | None = None  # part mlp: width
    blocks: int | None = None  # part block: decoder layers appended
    seed: int = 0  # initialization seed (LoRA A / W1)

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> "SideSpec":
        return PARTS[cfg.side_part].spec_from_config(cfg)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SideSpec":
        """The spec of a stored dict, within the config's bounds; SpecError if it is not a side spec (of a
        part this build has)."""
        if not isinstance(d, dict) or set(d) - {"side", "lora", "hidden", "blocks", "seed"}:
            raise SpecError(f"not a side trainable-part spec: {str(d)[:200]}")
        try:
            part = SidePart(d.get("side"))
        except ValueError as e:
            raise SpecError(f"not a side trainable-part spec: {e}") from None
        seed = d.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise SpecError(f"side spec: seed {seed!r} out of range")
        lora = lora_from_dict(d["lora"], "side spec") if d.get("lora") is not None else None
        hidden = d.get("hidden")
        if hidden is not None:
            config_bounds({"side_hidden": hidden}, "side spec")
        blocks = d.get("blocks")
        if blocks is not None:
            config_bounds({"side_blocks": blocks}, "side spec")
        if blocks is not None and part is not SidePart.BLOCK:
            raise SpecError(f"side spec: blocks is for part block, not {part.value}")
        if part is SidePart.ADAPTERS and (lora is None or lora.layers is None or hidden is not None):
            raise SpecError("side spec: part adapters needs a lora spec with layers (and no hidden width)")
        if part is SidePart.MLP and (hidden is None or lora is not None):
            raise SpecError("side spec: part mlp needs a hidden width (and no lora spec)")
        if part is SidePart.BLOCK and (blocks is None or lora is not None or hidden is not None):
            raise SpecError("side spec: part block needs a number of blocks (and no lora spec or hidden width)")
        return cls(part, lora=lora, hidden=hidden, blocks=blocks, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"side": self.part.value, "seed": self.seed}
        if self.lora is not None:
            d["lora"] = self.lora.to_dict()
        if self.hidden is not None:
            d["hidden"] = self.hidden
        if self.blocks is not None:
            d["blocks"] = self.blocks
        return d

    def start_layer(self, n_layers: int) -> int:
        """The layer whose input is cached (n_layers: the final norm's input)."""
        return PARTS[self.part].start_layer(self, n_layers)


class SideMLP(nn.Module):
    """delta(h) = W2 gelu(W1 h + b1): W1 [r, H], b1 [r], W2 [H, r] (zero at the start)."""

    def __init__(self, hidden_size: int, width: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.empty(width, hidden_size)
        bound = 1.0 / math.sqrt(hidden_size)
        w1.uniform_(-bound, bound, generator=gen)
        self.w1 = nn.Parameter(w1.to(dtype))
        self.b1 = nn.Parameter(torch.zeros(width, dtype=dtype))
        self.w2 = nn.Parameter(torch.zeros(hidden_size, width, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        a = torch.nn.functional.gelu(h @ self.w1.T + self.b1)  # [..., r]
        return h + a @ self.w2.T


@dataclass
class Attached:
    """The side part on a model: its tensors (hash order) and their autograd leaves."""

    spec: SideSpec
    params: TrainableSet
    leaves: list[nn.Parameter]  # same tensors as params, in the same order

    def train_mode(self, on: bool) -> list[nn.Parameter]:
        """Turn gradients of the side part on (for training) or off; return its leaves."""
        for p in self.leaves:
            p.requires_grad_(on)
        return self.leaves


def attach_side(model: nn.Module, spec: SideSpec) -> Attached:
    """Put a fresh (identity) side part on the model in place and return it."""
    return PARTS[spec.part].attach(model, spec)


class PartKind(Protocol):
    """One kind of side part (`trainer.side_part`): a new kind is one class here plus one PARTS line."""

    def spec_from_config(self, cfg: TrainerConfig) -> SideSpec:
        ...

    def attach(self, model: nn.Module, spec: SideSpec) -> Attached:
        ...

    def start_layer(self, spec: SideSpec, n_layers: int) -> int:
        """The layer whose input is cached: everything below it is frozen and runs once per example
        (n_layers: the decoder layers of the model with this part attached)."""
        ...

    def export_refusal(self, spec: SideSpec, checkpoint_id: int) -> str | None:
        """Why such a part cannot become a transformers model or PEFT adapter (None: it can)."""
        ...


class AdaptersPart:
    """LoRA adapters (A and B) in the top `lora_layers` decoder layers."""

    def spec_from_config(self, cfg: TrainerConfig) -> SideSpec:
        lora = LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.value, cfg.lora_layers, cfg.lora_seed)
        return SideSpec(SidePart.ADAPTERS, lora=lora, seed=cfg.lora_seed)

    def attach(self, model: nn.Module, spec: SideSpec) -> Attached:
        if spec.lora is None:
            raise SpecError("side spec: part adapters without a lora spec")
        check_lora_fit(model, spec.lora)
        loras = attach_lora(model, spec.lora)
        leaves = [p for path in sorted(loras) for p in (loras[path].lora_A, loras[path].lora_B)]
        params = trainable_set(model, Trainable.LORA, lora_fa=False)
        return Attached(spec, params, leaves)

    def start_layer(self, spec: SideSpec, n_layers: int) -> int:
        layers = spec.lora.layers if spec.lora and spec.lora.layers else n_layers
        return max(0, n_layers - layers)

    def export_refusal(self, spec: SideSpec, checkpoint_id: int) -> str | None:
        return None


class MlpPart:
    """An additive MLP on the final hidden state, hooked on the backbone's final norm."""

    def spec_from_config(self, cfg: TrainerConfig) -> SideSpec:
        return SideSpec(SidePart.MLP, hidden=cfg.side_hidden, seed=cfg.lora_seed)

    def attach(self, model: nn.Module, spec: SideSpec) -> Attached:
        parts = Parts.of(model)
        hidden_size = int(parts.head.weight.shape[1])  # [V, H]
        mlp = SideMLP(hidden_size, int(spec.hidden or 1), spec.seed, parts.head.weight.dtype)
        mlp.requires_grad_(False)
        parts.norm.register_forward_hook(lambda _m, _args, out: mlp(out))  # lives as long as the model
        leaves = [mlp.w1, mlp.b1, mlp.w2]
        params = TrainableSet(("side.w1", "side.b1", "side.w2"), tuple(p.data for p in leaves))
        return Attached(spec, params, leaves)

    def start_layer(self, spec: SideSpec, n_layers: int) -> int:
        return n_layers

    def export_refusal(self, spec: SideSpec, checkpoint_id: int) -> str | None:
        # Not an appended decoder block: the MLP acts after the final norm (a block's output is normed
        # afterwards) and is a biased GELU network, not Llama's SwiGLU. No exact equivalent exists.
        return (f"checkpoint {checkpoint_id} trains a side MLP on the final hidden state, which a plain "
                "transformers model, a GGUF file or a PEFT adapter cannot hold (no decoder layer computes "
                "it exactly); train with `side_part = \"block\"` (appended decoder layers, a standard model) "
                f"to export a model, or `pocketd checkpoint export {checkpoint_id} FILE` for its tensors")


class BlockPart:
    """k decoder layers appended after the last one, identity at the start (trainer.sideblock)."""

    def spec_from_config(self, cfg: TrainerConfig) -> SideSpec:
        return SideSpec(SidePart.BLOCK, blocks=cfg.side_blocks, seed=cfg.lora_seed)

    def attach(self, model: nn.Module, spec: SideSpec) -> Attached:
        from .prefix import run_prefix
        from .sideblock import check_identity, expand

        n = len(Parts.of(model).layers)
        blocks = expand(model, int(spec.blocks or 0))
        parts = Parts.of(model)  # with the new layers
        probe = torch.arange(4).remainder(int(parts.head.weight.shape[0])).unsqueeze(0)  # [1, 4]
        p = run_prefix(parts, probe, torch.ones_like(probe), n)
        check_identity(blocks[0], p.hidden, p.layer_kwargs)
        names, leaves = [], []
        for i, block in enumerate(blocks):
            for name, param in block.named_parameters():
                names.append(f"side.block{i}.{name}")
                leaves.append(param)
        return Attached(spec, TrainableSet(tuple(names), tuple(p.data for p in leaves)), leaves)

    def start_layer(self, spec: SideSpec, n_layers: int) -> int:
        return max(0, n_layers - int(spec.blocks or 0))  # n_layers counts the appended blocks

    def export_refusal(self, spec: SideSpec, checkpoint_id: int) -> str | None:
        return None


PARTS: dict[SidePart, PartKind] = {
    SidePart.ADAPTERS: AdaptersPart(),
    SidePart.MLP: MlpPart(),
    SidePart.BLOCK: BlockPart(),
}


def pack_state(params: TrainableSet, metadata: dict[str, str] | None = None) -> bytes:
    """The tensors as safetensors bytes, keyed by their names."""
    from safetensors.torch import save

    return save({n: t.detach().contiguous() for n, t in zip(params.names, params.tensors)}, metadata=metadata)


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def load_state(params: TrainableSet, data: bytes, what: str) -> None:
    """Copy stored tensors into params in place; ReplayMismatch (naming `what`) if they do not fit.

    The safetensors header (names, dtypes, shapes, byte ranges) is checked against params
    before any tensor is loaded, so a forged header allocates nothing.
    """
    from safetensors.torch import load

    from .sidefile import tensor_header

    try:
        header = tensor_header(data, what)
    except CheckpointFileError as e:
        raise ReplayMismatch(f"{what}: stored tensors are unreadable ({str(e).removeprefix(what + ': ')}); "
                             "the checkpoint is corrupt") from None
    if set(header) != set(params.names):
        missing = sorted(set(params.names) - set(header))[:3]
        raise ReplayMismatch(f"{what}: stored tensors do not match the spec (missing {missing or 'none'}, "
                             f"{len(header)} stored vs {len(params.names)} expected)")
    for name, t in zip(params.names, params.tensors):
        dtype, shape = header[name]
        if shape != tuple(t.shape) or dtype != _ST_DTYPES.get(t.dtype):
            raise ReplayMismatch(f"{what}: tensor {name} is {shape} {dtype}, "
                                 f"the spec needs {tuple(t.shape)} {_ST_DTYPES.get(t.dtype, t.dtype)}")
    try:
        stored = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError or ValueError on bad bytes
        raise ReplayMismatch(f"{what}: stored tensors are unreadable ({e}); the checkpoint is corrupt") from e
    with torch.no_grad():
        for name, t in zip(params.names, params.tensors):
            t.copy_(stored[name])


def load_verified_state(params: TrainableSet, data: bytes, sha: str, what: str) -> None:
    """load_state, then the tensors' hash against `sha` (ReplayMismatch) and finiteness (NonFiniteWeights)."""
    load_state(params, data, what)
    actual = params.sha256()
    if actual != sha:
        raise ReplayMismatch(f"{what}: stored tensors hash to {actual[:12]}, the checkpoint says {sha[:12]}; "
                             "the checkpoint is corrupt")
    check_finite(params, what)


def load_side_state(store: Store, att: Attached, ck: Checkpoint, fingerprint: str, *, verify: bool = True) -> int:
    """Load a side checkpoint's stored tensors into att (fresh on the base); return its steps.

    The tensors' hash is compared with the stored one (and, with `verify`, with the
    log's hash at that step count): a checkpoint that does not verify is a ReplayMismatch.
    """
    check_base(ck, fingerprint)
    if ck.spec != att.spec.to_dict():
        raise ReplayMismatch(f"checkpoint {ck.id}: its spec {ck.spec} is not the loaded side part's")
    got = store.log.state(ck.id)
    if got is None:
        raise ReplayMismatch(f"checkpoint {ck.id}: no stored tensors (method side); the checkpoint is incomplete")
    n_steps, data, sha = got
    load_state(att.params, data, f"checkpoint {ck.id}")
    actual = att.params.sha256()
    logged = store.log.hashes(ck.id).get(n_steps, sha) if verify else sha
    if actual != sha or logged != sha:
        raise ReplayMismatch(f"checkpoint {ck.id}: stored tensors hash to {actual[:12]}, the log says "
                             f"{(logged if actual == sha else sha)[:12]}; the checkpoint is corrupt")
    if n_steps != ck.n_steps:
        raise ReplayMismatch(f"checkpoint {ck.id}: stored tensors are of step {n_steps}, the checkpoint "
                             f"records {ck.n_steps}; the checkpoint is corrupt")
    check_finite(att.params, f"checkpoint {ck.id}")
    return n_steps
