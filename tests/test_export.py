"""Export round trips: merged directory through transformers, adapter through PEFT; safety of the target."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import pocketd.trainer.model as tm
from pocketd.trainer.errors import ExportError, OutputNotEmpty
from pocketd.trainer.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MARKER, export_adapter, export_merged
from pocketd.trainer.lora import LoraSpec, attach_lora
from pocketd.trainer.model import Base, load_base

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

IDS = torch.tensor([[1, 60, 70, 80, 90, 100, 13, 2, 1, 40]])  # [1, 10]


def _with_lora(base: Base, layers: int | None = None) -> tuple[LoraSpec, torch.Tensor]:
    """Attach adapters with a nonzero B; return the spec and the logits [1, T, V] with them."""
    spec = LoraSpec(rank=4, alpha=8.0, targets="all", layers=layers, seed=1)
    gen = torch.Generator().manual_seed(11)
    for lora in attach_lora(base.model, spec).values():
        lora.lora_B.data.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.3)
    with torch.no_grad():
        return spec, base.model(IDS).logits


def make_current_checkpoint(model_dir: Path, cache: Path, data: Path) -> tuple[int, str, torch.nn.Module]:
    """A current lora checkpoint (rank 4) with three logged steps in data/pocketd.sqlite3.

    Returns (checkpoint id, base fingerprint, the model rebuilt by replay).
    """
    from pocketd.store import Status, StepRecord, Store
    from pocketd.trainer.config import TrainerConfig
    from pocketd.trainer.checkpoints import load_current
    from pocketd.trainer.replay import Spec, estimator_dict

    cfg = TrainerConfig(model=str(model_dir), lora_rank=4, lora_alpha=8.0)
    fingerprint = load_base(cfg.model, cache).fingerprint
    with Store.open(data / "pocketd.sqlite3") as store:
        cid = store.log.create(parent_id=None, method="mezo", base_fingerprint=fingerprint,
                               spec=Spec.from_config(cfg).to_dict(), estimator=estimator_dict(cfg),
                               status=Status.CURRENT)
        for i in range(3):
            store.log.append_step(cid, StepRecord(step=i, seeds=(100 + i,), grads=(40.0,), lr=0.01))
        _, model, ck = load_current(store, cfg, cache)
    if ck is None or ck.id != cid or model is None:
        raise RuntimeError("load_current did not return the checkpoint just made")
    return cid, fingerprint, model


@pytest.fixture
def tiny(tiny_model_dir: Path, tmp_path: Path) -> Base:
    return load_base(str(tiny_model_dir), tmp_path / "cache")


def _modes_private(root: Path) -> bool:
    paths = [root, *root.rglob("*")]
    return all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600) for p in paths)


def test_merged_export_loads_with_transformers_and_matches(tiny: Base, tmp_path: Path) -> None:
    _, expected = _with_lora(tiny)
    out = export_merged(tiny.model, tiny.tokenizer, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-5, rtol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert AutoTokenizer.from_pretrained(out).chat_template == tiny.tokenizer.chat_template
    assert _modes_private(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging left


def test_adapter_export_loads_with_peft_and_matches(tiny: Base, tiny_model_dir: Path, tmp_path: Path) -> None:
    spec, expected = _with_lora(tiny)
    out = export_adapter(tiny.model, spec, str(tiny.model_dir), tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                "up_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    fresh = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], local_files_only=True)
    peft_model = peft.PeftModel.from_pretrained(fresh, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, expected, atol=1e-5, rtol=0)
    assert _modes_private(out)


def test_adapter_on_the_top_layers_only_names_full_paths(tiny: Base, tmp_path: Path) -> None:
    spec, expected = _with_lora(tiny, layers=1)
    out = export_adapter(tiny.model, spec, str(tiny.model_dir), tmp_path / "adapter")
    targets = json.loads((out / ADAPTER_CONFIG).read_text(encoding="utf-8"))["target_modules"]
    assert all(t.startswith("model.layers.1.") for t in targets) and len(targets) == 7
    fresh = AutoModelForCausalLM.from_pretrained(tiny.model_dir, local_files_only=True)
    peft_model = peft.PeftModel.from_pretrained(fresh, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, expected, atol=1e-5, rtol=0)


def test_full_model_exports_merged_but_not_as_adapter(tiny: Base, tmp_path: Path) -> None:
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight.add_(0.5)  # as a `full` checkpoint would
        expected = tiny.model(IDS).logits
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_adapter(tiny.model, LoraSpec(4, 8.0, "all", None, 0), "x", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    out = export_merged(tiny.model, tiny.tokenizer, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, expected,
                                   atol=1e-6, rtol=0)


def test_non_empty_target_is_refused_and_force_only_replaces_an_export(tiny: Base, tmp_path: Path) -> None:
    spec, _ = _with_lora(tiny)
    user_dir = tmp_path / "documents"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine", encoding="utf-8")
    for force in (False, True):
        with pytest.raises(OutputNotEmpty, match=str(user_dir)):
            export_adapter(tiny.model, spec, "base", user_dir, force=force)
    assert [p.name for p in user_dir.iterdir()] == ["notes.txt"]

    out = tmp_path / "adapter"
    export_adapter(tiny.model, spec, "base", out)
    (out / "stale.bin").write_bytes(b"old")
    with pytest.raises(OutputNotEmpty, match="--force"):
        export_adapter(tiny.model, spec, "base", out)
    export_adapter(tiny.model, spec, "base", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MARKER])
    empty = tmp_path / "empty"
    empty.mkdir()
    export_adapter(tiny.model, spec, "base", empty)  # an empty directory is fine without --force
    assert (empty / ADAPTER_CONFIG).is_file()


def test_a_failed_export_leaves_nothing(tiny: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(model: object, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tm, "save_plain_model", boom)
    with pytest.raises(OSError, match="disk full"):
        export_merged(tiny.model, tiny.tokenizer, tmp_path / "merged")
    assert not [p for p in tmp_path.iterdir() if "merged" in p.name]


def test_cli_export_of_the_current_checkpoint_round_trips(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A current lora checkpoint with logged steps: both exports reproduce the replayed model."""
    from pocketd.daemon.cli import cli

    cache, data = tmp_path / "cache", tmp_path / "data"
    cid, fingerprint, model = make_current_checkpoint(tiny_model_dir, cache, data)
    with torch.no_grad():
        expected = model(IDS).logits

    settings = ["--set", f"trainer.model={tiny_model_dir}", "--set", "trainer.lora_rank=4",
                "--set", f"paths.data_dir={data}", "--set", f"paths.cache_dir={cache}"]
    runner = CliRunner()
    for flag in ("--adapter", "--merged"):
        result = runner.invoke(cli, [*settings, "export", flag, str(tmp_path / flag[2:])], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert f"checkpoint {cid}" in result.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    adapted = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True), tmp_path / "adapter")
    with torch.no_grad():
        assert (expected - load_base(str(tiny_model_dir), cache).model(IDS).logits).abs().max() > 1e-3
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted(IDS).logits, expected, atol=1e-5, rtol=0)
    marker = json.loads((tmp_path / "adapter" / MARKER).read_text(encoding="utf-8"))
    assert marker["checkpoint"] == cid and marker["base_fingerprint"] == fingerprint

    again = runner.invoke(cli, [*settings, "export", "--adapter", str(tmp_path / "adapter")])
    assert again.exit_code == 1 and "--force" in again.stderr
    both = runner.invoke(cli, [*settings, "export", "--adapter", "a", "--merged", "b"])
    assert both.exit_code == 2 and "exactly one" in both.output
