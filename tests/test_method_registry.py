"""The training-method interface: every Method has one implementation, and the one session loop drives
any implementation registered for it (here a fake one) without knowing which it is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from pocketd.store import Checkpoint, Status, StepRecord, Store
from pocketd.trainer import registry
from pocketd.trainer.config import Method, TrainerConfig
from pocketd.trainer.data import Item, collate
from pocketd.trainer.errors import UnknownMethod
from pocketd.trainer.loss import mean_loss
from pocketd.trainer.method import (
    ForgetPlan, ForgetResult, MethodTrainer, ModelShape, SessionContext, StepOutcome, TrainingMethod,
)
from pocketd.trainer.params import TrainableSet
from pocketd.trainer.session import EndReason

from tests.trainer_helpers import fill_store, make_job, run

PROTOCOL_MEMBERS = sorted(
    n for n in vars(TrainingMethod) if not n.startswith("_") and n not in ("key", "file_magic", "drops_whole")
)


def test_every_method_has_exactly_one_implementation_that_conforms() -> None:
    assert set(registry.METHODS) == set(Method)
    for key, method in registry.METHODS.items():
        assert method.key is key
        assert isinstance(method, TrainingMethod)
        assert all(callable(getattr(method, n)) for n in PROTOCOL_MEMBERS)
        assert isinstance(method.drops_whole, bool)
        assert len(method.file_magic) == 8 and method.file_magic.startswith(b"PKTD")
        spec = method.spec_from_config(TrainerConfig(method=key))
        assert method.spec_from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    magics = [m.file_magic[:7] for m in registry.METHODS.values()]
    assert len(set(magics)) == len(magics)  # a file's kind names one method


def test_files_dispatch_on_their_kind() -> None:
    for method in registry.METHODS.values():
        assert registry.method_of_file(method.file_magic + b"rest", "f") is method
    assert registry.method_of_file(b"not a checkpoint", "f") is registry.METHODS[registry.FALLBACK_FILE_METHOD]


def test_a_checkpoint_of_an_unknown_method_is_named() -> None:
    ck = Checkpoint(id=3, parent_id=None, created_at="", updated_at=None, status=Status.CURRENT, method="telepathy",
                    base_fingerprint="x", spec={}, estimator={}, torch_version=None, n_steps=0, val_loss=None,
                    parent_val_loss=None, note=None)
    with pytest.raises(UnknownMethod, match="telepathy"):
        registry.method_of(ck)


# -- a fake method: trains nothing, logs one row per step -----------------------------------------------

@dataclass
class FakeSpec:
    tag: str = "fake"

    def to_dict(self) -> dict[str, Any]:
        return {"fake": self.tag}


@dataclass
class FakePart:
    spec: FakeSpec
    params: TrainableSet = field(default_factory=lambda: TrainableSet(("fake.w",), (torch.zeros(2),)))


@dataclass
class FakeTrainer:
    ctx: SessionContext
    calls: list[str]

    def step(self, items: Sequence[Item], step: int, chain_step: int) -> StepOutcome:
        self.calls.append(f"step {step}/{chain_step}")
        with torch.no_grad():
            loss = mean_loss(self.ctx.base.model, collate(list(items), self.ctx.pad), micro_batch=4, chunk_tokens=64)
        return StepOutcome(loss, record=StepRecord(step, (step,), (0.0,), 0.0, loss,
                                                   tuple(sorted({it.document_id for it in items}))))

    def commit(self, items: Sequence[Item], outcome: StepOutcome, step: int) -> None:
        self.calls.append(f"commit {step}")
        self.ctx.store.log.append_step(self.ctx.checkpoint_id, outcome.record)

    def finish(self, steps: int, session_steps: int) -> None:
        self.calls.append(f"finish {steps}/{session_steps}")
        self.ctx.store.log.add_hash(self.ctx.checkpoint_id, steps, self.ctx.part.params.sha256())

    def close(self) -> None:
        self.calls.append("close")


class FakeMethod:
    key = Method.MEZO  # the slot it is registered in for the test
    file_magic = b"PKTDFAK1"
    drops_whole = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    def spec_from_config(self, cfg: TrainerConfig) -> FakeSpec:
        return FakeSpec()

    def spec_from_dict(self, d: dict[str, Any]) -> FakeSpec:
        return FakeSpec(d["fake"])

    def estimator(self, cfg: TrainerConfig) -> dict[str, Any]:
        return {"fake": True}

    def lora_spec(self, spec: FakeSpec) -> None:
        return None

    def describe(self, spec: FakeSpec) -> str:
        return "nothing"

    def export_refusal(self, spec: FakeSpec, checkpoint_id: int) -> str | None:
        return "a fake checkpoint cannot be exported"

    def attach(self, model: torch.nn.Module, spec: FakeSpec) -> FakePart:
        return FakePart(spec)

    def load(self, store: Store, part: FakePart, ck: Checkpoint, fingerprint: str, *, verify: bool = False,
             progress: Any = None) -> int:
        self.calls.append(f"load {ck.id}")
        return ck.n_steps

    def record_start(self, store: Store, checkpoint_id: int, part: FakePart) -> None:
        store.log.add_hash(checkpoint_id, 0, part.params.sha256())

    def record_hashes(self, store: Store, model: torch.nn.Module, fingerprint: str, checkpoint_id: int) -> None:
        pass

    def save_snapshot(self, store: Store, checkpoint_id: int, part: FakePart) -> int:
        return 0

    def trainer(self, ctx: SessionContext) -> MethodTrainer:
        return FakeTrainer(ctx, self.calls)

    def working_bytes(self, cfg: TrainerConfig, shape: ModelShape) -> float:
        return 0.0

    def verified(self, ck: Checkpoint, chain_steps: int) -> str:
        return "fake"

    def export_bytes(self, store: Store, checkpoint_id: int) -> bytes:
        raise NotImplementedError

    def read_file(self, data: bytes, name: str) -> Any:
        raise NotImplementedError

    def forget(self, store: Store, plan: ForgetPlan) -> ForgetResult:
        return ForgetResult(None, rebuilt=False)


def test_the_session_loop_drives_a_registered_method(tmp_path, tiny_model_dir, monkeypatch) -> None:
    fake = FakeMethod()
    assert isinstance(fake, TrainingMethod)
    monkeypatch.setitem(registry.METHODS, Method.MEZO, fake)
    job = make_job(tmp_path, tiny_model_dir, max_steps=3)
    fill_store(job.database)
    out = run(job)
    assert out.end_reason is EndReason.STEPS and out.steps == 3 and out.promoted is not None
    assert fake.calls == ["step 0/0", "commit 0", "step 1/1", "commit 1", "step 2/2", "commit 2", "finish 3/3",
                          "close"]
    with Store.open(job.database) as store:
        ck = store.log.get(out.checkpoint_id)
        assert ck.spec == {"fake": "fake"} and ck.estimator == {"fake": True} and ck.n_steps == 3

    # A stopped session's candidate is resumed through the method's load, from where it stopped.
    fake.calls.clear()
    first = run(job.model_copy(update={"max_steps": 50}), stop_after=2)
    assert first.end_reason is EndReason.STOPPED and first.promoted is None
    fake.calls.clear()
    second = run(job.model_copy(update={"max_steps": 1}))
    assert second.checkpoint_id == first.checkpoint_id
    assert fake.calls[0] == f"load {first.checkpoint_id}" and fake.calls[1].startswith("step 2/")
