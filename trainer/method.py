"""The training-method interface: what differs between `mezo`, `side` and any later method.

One `TrainingMethod` per `Method` value (registered in trainer.registry) owns its
spec (from config, from a stored dict, to a dict), attaching its trainable part to a
freshly loaded base, loading and verifying a checkpoint onto it, the per-session
trainer (one step, committing progress, finishing), the checkpoint file format, what
`forget` does to its checkpoints, its memory estimate and what verification reports.
The one session loop (trainer.session) and the generic checkpoint code
(trainer.checkpoints, trainer.transfer, trainer.forget) only talk to this interface.

This module holds the interface and the small data types the methods and the generic
code share; it imports no method (so methods import it without a cycle).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .config import Method, TrainerConfig
from .errors import BaseMismatch

if TYPE_CHECKING:
    from torch import nn

    from pocketd.store import Checkpoint, Store

    from .data import Item
    from .job import TrainingJob
    from .lora import LoraSpec
    from .model import Base
    from .params import TrainableSet

Progress = Callable[[int, int], None]  # (done, total)


@runtime_checkable
class MethodSpec(Protocol):
    """A method's trainable-part spec, recorded in every checkpoint of that method."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form stored in the checkpoint (equal dicts: the same trainable part)."""
        ...


@runtime_checkable
class AttachedPart(Protocol):
    """A method's trainable part on a loaded model: its spec and its tensors in hash/replay order."""

    spec: Any
    params: TrainableSet


@dataclass(frozen=True)
class StepOutcome:
    """What one training step did, as the session loop sees it.

    A non-finite step (`finite` False) applied nothing: the loop skips it (not committed).
    `fatal` says the weights in memory can no longer be trusted after it (the session must
    end at once). `record` is what the method's commit writes (its own type; None if nothing).
    """

    loss: float
    finite: bool = True
    fatal: bool = False
    detail: str = ""  # the non-finite values, for the log
    backed_off: bool = False  # the method's divergence guard cut its step size after this step
    record: Any = None


@dataclass(frozen=True)
class SessionContext:
    """Everything a method's per-session trainer may use; the session loop owns all of it."""

    job: TrainingJob
    store: Store
    base: Base
    part: AttachedPart
    checkpoint_id: int
    pad: int
    rng: random.Random  # the session's private RNG (already used to seed the batch sampler)


class MethodTrainer(Protocol):
    """One session's training state of a method (optimizer, step-size rule, caches, pending saves).

    The loop calls, per batch, `step` and (if the step is finite) `commit`; at the end of
    the loop `finish` (not after an exception); and `close` always, last.
    """

    def step(self, items: Sequence[Item], step: int, chain_step: int) -> StepOutcome:
        """Train on one batch in memory. `step`: index of this step in the candidate checkpoint;
        `chain_step`: in the whole chain. Nothing is written to the store."""
        ...

    def commit(self, items: Sequence[Item], outcome: StepOutcome, step: int) -> None:
        """Make a finite step durable as the method does (a log row now, or tensors when due),
        together with the examples it trained on."""
        ...

    def finish(self, steps: int, session_steps: int) -> None:
        """The loop ended normally with `steps` steps in the candidate (`session_steps` of them in
        this session): commit whatever is pending so the candidate verifies."""
        ...

    def close(self) -> None:
        """Release what the trainer holds on the model (always called, also after an error)."""
        ...


@dataclass(frozen=True)
class ForgetPlan:
    """What forgetting some documents does to the checkpoint log."""

    affected: dict[int, set[int]]  # checkpoint id -> steps that saw the documents
    current_id: int | None
    current_affected: bool
    # Checkpoints of methods that cannot drop single steps (trained tensors, not logs) that saw the
    # documents or started from one that did: they are dropped whole.
    tainted: frozenset[int] = frozenset()

    @property
    def dropped_steps(self) -> int:
        return sum(len(s) for s in self.affected.values())


@dataclass(frozen=True)
class ForgetResult:
    """What a method's `forget` did to the current chain."""

    current_id: int | None  # the new current checkpoint (None: the base, or unchanged when not rebuilt)
    rebuilt: bool  # True: current_id is a rebuilt chain whose hashes `record_hashes` must still store
    fell_back: bool = False  # True: the current checkpoint was dropped whole; current_id is its clean ancestor


@dataclass(frozen=True)
class ModelShape:
    """The base model's sizes the memory estimate needs."""

    n_params: int
    hidden: int
    inter: int
    vocab: int
    heads: int
    bytes_per: int  # bytes per weight of the compute dtype

    def layer_activation_bytes(self, cfg: TrainerConfig) -> int:
        """Activations of one decoder layer over one micro-batch (forward pass)."""
        micro = min(cfg.batch_size, cfg.micro_batch_size)
        tokens = micro * cfg.seq_len
        return tokens * (self.hidden * 6 + self.inter * 3) * 4 + micro * self.heads * cfg.seq_len**2 * 4


class ImportedFile(Protocol):
    """A parsed checkpoint file of some method, not stored yet (trainer.transfer drives the import)."""

    base_fingerprint: str
    spec: dict[str, Any]  # checked: the method's spec_from_dict accepts it
    n_steps: int  # steps of the whole chain

    def apply(self, part: AttachedPart, progress: Progress | None = None) -> bool:
        """Bring a fresh `part` (attached with this file's spec) to the file's trained state, comparing every
        hash the file carries (ReplayMismatch, NonFiniteWeights); True if the final weights matched a hash
        from the file (verified), False if the file carries no hash of them."""
        ...

    def save(self, store: Store, status: Any, note: str | None, val_loss: float | None,
             parent_val_loss: float | None) -> int:
        """Store the file's checkpoint(s) in one transaction, the last with `status`; return its id."""
        ...


@dataclass
class FileView:
    """The parts of ImportedFile every method's parsed file shares: the facts read from its header."""

    file: Any  # the method's parsed file object: base_fingerprint, spec, n_steps
    name: str  # how errors name the file

    @property
    def base_fingerprint(self) -> str:
        return str(self.file.base_fingerprint)

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.file.spec)

    @property
    def n_steps(self) -> int:
        return int(self.file.n_steps)


@runtime_checkable
class TrainingMethod(Protocol):
    """One training method. Implementations are stateless singletons; per-session state lives in
    the `MethodTrainer` that `trainer` returns."""

    key: Method
    file_magic: bytes  # first 8 bytes of its checkpoint files: b"PKTD" + kind (3 bytes) + version (1)
    drops_whole: bool  # forget: a checkpoint that saw a forgotten document (or descends from one) goes whole

    # -- spec -------------------------------------------------------------------------------------
    def spec_from_config(self, cfg: TrainerConfig) -> MethodSpec:
        """The spec a session with this config trains."""
        ...

    def spec_from_dict(self, d: dict[str, Any]) -> MethodSpec:
        """The spec stored in a checkpoint; SpecError if the dict is not one of this method."""
        ...

    def estimator(self, cfg: TrainerConfig) -> dict[str, Any]:
        """The estimator/optimizer config recorded in a new checkpoint."""
        ...

    def lora_spec(self, spec: Any) -> LoraSpec | None:
        """The LoRA adapters the spec puts on the model (None: none)."""
        ...

    def describe(self, spec: Any) -> str:
        """What the spec trains, in a word or two (for messages: "lora", "full", "a side mlp")."""
        ...

    def export_refusal(self, spec: Any, checkpoint_id: int) -> str | None:
        """Why a checkpoint of this spec cannot become a transformers model or PEFT adapter (None: it can)."""
        ...

    # -- weights ------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, spec: Any) -> AttachedPart:
        """Put a fresh (untrained) trainable part on a freshly loaded base model, in place."""
        ...

    def load(self, store: Store, part: AttachedPart, ck: Checkpoint, fingerprint: str, *, verify: bool = False,
             progress: Progress | None = None, snapshots: bool = True) -> int:
        """Bring a fresh `part` to checkpoint `ck`'s trained state; return the steps it holds.
        BaseMismatch / ReplayMismatch when the checkpoint does not belong to this base or does not verify.
        `snapshots` False: rebuild from the method's source of truth only (a seed log is replayed whole even
        if a verified snapshot is stored; `checkpoint verify`)."""
        ...

    def save_snapshot(self, store: Store, checkpoint_id: int, part: AttachedPart) -> int:
        """Store the part (holding checkpoint `checkpoint_id`'s trained state, verified) as the snapshot a later
        `load` may start from; return its bytes (0: none stored, or the method's checkpoints are tensors
        already). Only stored if the log records the same hash at that step."""
        ...

    def record_start(self, store: Store, checkpoint_id: int, part: AttachedPart) -> None:
        """Store the state a new candidate starts from (inside the caller's transaction)."""
        ...

    def record_hashes(self, store: Store, model: nn.Module, fingerprint: str, checkpoint_id: int) -> None:
        """After `forget` rebuilt a chain: store what verifying it needs (model: a fresh base)."""
        ...

    # -- session ---------------------------------------------------------------------------------
    def trainer(self, ctx: SessionContext) -> MethodTrainer:
        """The per-session trainer of the part in `ctx`."""
        ...

    def working_bytes(self, cfg: TrainerConfig, shape: ModelShape) -> float:
        """Memory a session needs beyond the weights, the LM-head chunk and the runtime: activations,
        the trainable tensors' copies (gradients, optimizer state, snapshots)."""
        ...

    def verified(self, ck: Checkpoint, chain_steps: int) -> str:
        """What a successful verification of `ck` checked (for `pocketd checkpoint verify`)."""
        ...

    # -- files and forgetting ------------------------------------------------------------------------
    def export_bytes(self, store: Store, checkpoint_id: int) -> bytes:
        """The checkpoint as a standalone file (CheckpointFileError if it cannot be exported)."""
        ...

    def read_file(self, data: bytes, name: str) -> ImportedFile:
        """Parse and check a file of this method (CheckpointFileError naming `name`): its header, spec
        (within the config's bounds) and step or tensor records. Nothing is stored or allocated from it."""
        ...

    def forget(self, store: Store, plan: ForgetPlan) -> ForgetResult:
        """Rewrite the current chain (the current checkpoint is of this method) without the plan's steps.
        Dropping the affected and tainted checkpoints is the caller's (trainer.forget.forget_in_log, which
        runs torch-free and so uses the same store-only functions, by trainer.forget.STYLES)."""
        ...



def check_base(ck: Checkpoint, fingerprint: str) -> None:
    """BaseMismatch unless the checkpoint was trained on the loaded base."""
    if ck.base_fingerprint != fingerprint:
        raise BaseMismatch(
            f"checkpoint {ck.id} was trained on base {ck.base_fingerprint[:12]}, "
            f"but the loaded base is {fingerprint[:12]}; set trainer.model back or start a new checkpoint"
        )

