"""The side method's block part (side_part = "block"): appended decoder layers, a standard model of L + k layers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from pocketd.daemon.cli import cli
from pocketd.store import Status, Store
from pocketd.trainer.config import SidePart, TrainerConfig
from pocketd.trainer.errors import SpecError
from pocketd.trainer.model import load_base
from pocketd.trainer.side import SideSpec, attach_side

from tests.trainer_helpers import invoke_cli, side_cli_env

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])  # [1, 7]


def test_a_fresh_expansion_is_exactly_the_base(tmp_path, tiny_model_dir):
    base = load_base(str(tiny_model_dir), tmp_path / "cache")
    n = base.model.config.num_hidden_layers
    with torch.no_grad():
        before = base.model(IDS).logits
    greedy_before = base.model.generate(IDS, max_new_tokens=6, do_sample=False)
    att = attach_side(base.model, SideSpec(SidePart.BLOCK, blocks=2))
    layers = base.model.model.layers
    assert len(layers) == n + 2 and base.model.config.num_hidden_layers == n + 2
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(n + 2))  # own KV-cache slots
    with torch.no_grad():
        assert torch.equal(base.model(IDS).logits, before)
    assert torch.equal(base.model.generate(IDS, max_new_tokens=6, do_sample=False), greedy_before)
    # The trained tensors are the new layers' (all of them, attention and MLP), zero output projections.
    assert len(att.params.names) == 2 * len(list(layers[0].parameters()))
    zeroed = [n for n, t in zip(att.params.names, att.params.tensors) if not t.any()]
    assert sorted(zeroed) == sorted(f"side.block{i}.{p}.weight" for i in (0, 1)
                                    for p in ("self_attn.o_proj", "mlp.down_proj"))
    assert all(not p.requires_grad for p in base.model.parameters())  # frozen until a session trains it


def test_the_spec_is_validated_by_field(tmp_path, tiny_model_dir):
    assert SideSpec.from_config(TrainerConfig(method="side", side_part="block", side_blocks=3)).blocks == 3
    spec = SideSpec(SidePart.BLOCK, blocks=2, seed=4)
    assert SideSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValidationError, match="side_blocks"):
        TrainerConfig(method="side", side_part="block", side_blocks=0)
    with pytest.raises(SpecError, match="side_blocks"):
        SideSpec.from_dict({"side": "block", "blocks": 9, "seed": 0})
    with pytest.raises(SpecError, match="needs a number of blocks"):
        SideSpec.from_dict({"side": "block", "seed": 0})
    with pytest.raises(SpecError, match="blocks is for part block"):
        SideSpec.from_dict({"side": "mlp", "hidden": 8, "blocks": 1, "seed": 0})


def test_an_architecture_without_llama_projections_is_refused_before_changing_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(SpecError, match="Llama-style"):
        attach_side(model, SideSpec(SidePart.BLOCK, blocks=1))
    assert len(model.transformer.h) == 2 and model.config.num_hidden_layers == 2


# -- the command line: train, verify, export as a standard model, import, forget ---------------------------------

@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    return side_cli_env(tmp_path, tiny_model_dir, monkeypatch, 'side_part = "block"\nside_blocks = 2\n')


pocketd = invoke_cli


def test_cli_block_trains_and_exports_a_standard_model_with_pocketds_logits(env, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    code, out = pocketd("train", "--steps", "8")
    assert code == 0 and "checkpoint 1: promoted" in out, out
    code, out = pocketd("checkpoint", "verify", "1")
    assert code == 0 and "side tensors of 8 steps" in out, out
    result = CliRunner().invoke(cli, ["export", "--merged", str(env / "merged"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "merged" and "config.json" in report["files"]
    config = json.loads((env / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 + 2

    exported = AutoModelForCausalLM.from_pretrained(env / "merged").eval()
    from pocketd.trainer.checkpoints import load_checkpoint

    cfg = TrainerConfig(model=str(tiny_model_dir), method="side", side_part="block", side_blocks=2)
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        ours, _params, ck = load_checkpoint(store, cfg, env / "cache", 1, verify=True)
    plain = load_base(str(tiny_model_dir), env / "cache").model
    with torch.no_grad():
        want = ours.model(IDS).logits
        got = exported(IDS).logits
        base_logits = plain(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the export carries what was trained


def test_cli_block_checkpoint_file_round_trip_and_forget(env):
    assert pocketd("train", "--steps", "4")[0] == 0
    f = env / "block.ckpt"
    code, out = pocketd("checkpoint", "export", "1", str(f))
    assert code == 0, out
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 0 and "as checkpoint 2 (4 steps, verified" in out, out
    db = env / "data" / "pocketd.sqlite3"
    with Store.open(db) as store:
        doc = next(d.id for d in store.docs.list() if store.log.checkpoints_with_documents([d.id]).get(1))
    code, out = pocketd("forget", "--document", str(doc))
    assert code == 0, out
    with Store.open(db) as store:
        assert store.log.get(1).status is Status.FORGOTTEN and store.log.state(1) is None
        assert store.log.checkpoints_with_documents([doc]) == {}
