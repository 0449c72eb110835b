"""`pocketd export --gguf FILE [--type f16|q8_0]`: GGUF files that transformers (and llama.cpp) load back.

Round trips go through transformers' GGUF loader (`from_pretrained(folder, gguf_file=name)`), which
undoes llama.cpp's q/k permutation; the tiny model here has larger weights (init_std 0.15) than the
shared one so that attention matters and a wrong permutation shows in the logits. An optional test
runs the file in llama.cpp itself (llama-cpp-python) when it is installed.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

import pocketd.trainer.gguf_export as ge
from pocketd.daemon.cli import cli
from pocketd.trainer.errors import ExportError, OutputExists
from pocketd.trainer.gguf_export import GgufType, export_gguf
from pocketd.trainer.gguf_meta import source_metadata
from pocketd.trainer.lora import LoraSpec, attach_lora
from pocketd.trainer.model import Base, load_base

from tests.trainer_helpers import fill_store

IDS = torch.tensor([[1, 60, 70, 80, 90, 100, 13, 2, 1, 40, 45, 50]])  # [1, 12]
# max |logit difference| / max |logit|: F16 rounds each weight to 11 bits, Q8_0 to 8 bits per block of 32
TOLERANCE = {GgufType.F16: 0.005, GgufType.Q8_0: 0.08}


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pocketd.trainer.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("sharp") / "model", seed=1, init_std=0.15)


@pytest.fixture
def sharp(sharp_model_dir: Path, tmp_path: Path) -> Base:
    return load_base(str(sharp_model_dir), tmp_path / "cache")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_gguf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).eval()


def assert_close(got: torch.Tensor, expected: torch.Tensor, qtype: GgufType) -> None:
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel < TOLERANCE[qtype], f"{qtype.value}: max logit difference {rel:.4f} of the largest logit"


def append_blocks(model: torch.nn.Module, k: int, seed: int = 5) -> None:
    """Block expansion as side_part = "block" does it, with nonzero output projections (so the blocks count)."""
    layers = model.model.layers
    gen = torch.Generator().manual_seed(seed)
    for _ in range(k):
        new = copy.deepcopy(layers[-1])
        new.self_attn.layer_idx = len(layers)
        with torch.no_grad():
            for lin in (new.self_attn.o_proj, new.mlp.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.1)
        layers.append(new)
    model.config.num_hidden_layers = len(layers)


def fields(path: Path) -> dict[str, object]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("qtype", list(GgufType))
def test_round_trip_through_transformers(sharp: Base, tmp_path: Path, qtype: GgufType) -> None:
    expected = logits(sharp.model)
    out = tmp_path / "exports" / "model.gguf"
    report = export_gguf(sharp.model, sharp.tokenizer, sharp.path, out, qtype)
    assert (report.path, report.qtype, report.block_count, report.tensors) == (out, qtype, 2, 20)  # 9 per block + 2
    assert report.bytes == out.stat().st_size and report.f16_fallbacks == ()
    assert_close(logits(load_gguf(out)), expected, qtype)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temp file left
    meta = fields(out)
    assert meta["general.file_type"] == (1 if qtype is GgufType.F16 else 7)
    assert meta["llama.block_count"] == 2 and meta["tokenizer.ggml.pre"] == "gpt-2"
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied embeddings
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == qtype.name


def test_the_tokenizer_and_chat_template_load_back(sharp: Base, tmp_path: Path) -> None:
    out = export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "m.gguf", GgufType.F16).path
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name, local_files_only=True)
    text = "Bread: 500 g flour, wörter <|im_end|> end"
    assert tok(text)["input_ids"] == sharp.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == sharp.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_lora_adapters_are_merged(sharp: Base, tmp_path: Path) -> None:
    spec = LoraSpec(rank=4, alpha=8.0, targets="all", layers=None, seed=1)
    gen = torch.Generator().manual_seed(11)
    for lora in attach_lora(sharp.model, spec).values():
        lora.lora_B.data.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.3)
    expected = logits(sharp.model)
    out = export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "m.gguf", GgufType.F16).path
    assert_close(logits(load_gguf(out)), expected, GgufType.F16)
    fresh = load_base(str(sharp.path), tmp_path / "cache2").model
    assert float((logits(fresh) - expected).abs().max()) > 0.1  # the adapters changed the model


@pytest.mark.parametrize("qtype", list(GgufType))
def test_appended_blocks_adjust_the_block_count(sharp: Base, tmp_path: Path, qtype: GgufType) -> None:
    append_blocks(sharp.model, 2)
    expected = logits(sharp.model)
    out = export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "m.gguf", qtype).path
    assert fields(out)["llama.block_count"] == 4
    loaded = load_gguf(out)
    assert loaded.config.num_hidden_layers == 4
    assert_close(logits(loaded), expected, qtype)


def test_a_gguf_base_has_its_metadata_copied(sharp: Base, tmp_path: Path) -> None:
    """A GGUF base (as the default model): every key copied, except block count and file type."""
    source = export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "base.gguf", GgufType.F16).path
    append_blocks(sharp.model, 1)
    expected = logits(sharp.model)
    out = export_gguf(sharp.model, sharp.tokenizer, source, tmp_path / "out.gguf", GgufType.Q8_0).path
    before, after = fields(source), fields(out)
    assert (after["llama.block_count"], after["general.file_type"], after["GGUF.tensor_count"]) == (3, 7, 29)
    changed = {"llama.block_count", "general.file_type", "GGUF.tensor_count"}
    assert {k: v for k, v in before.items() if k not in changed} == {k: v for k, v in after.items() if k not in changed}
    assert_close(logits(load_gguf(out)), expected, GgufType.Q8_0)


def test_a_source_gguf_that_does_not_fit_the_model_is_refused(sharp: Base, tmp_path: Path) -> None:
    source = export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "base.gguf", GgufType.F16).path
    config = copy.deepcopy(sharp.model.config)
    config.hidden_size = 64
    with pytest.raises(ExportError, match="embedding_length is 32 but the loaded model has 64"):
        source_metadata(source, config, 1)


def test_rows_not_a_multiple_of_32_fall_back_to_f16(tmp_path: Path) -> None:
    from pocketd.trainer.tiny import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "odd", seed=2, hidden_size=48, intermediate_size=80, num_heads=4,
                                    num_kv_heads=2, init_std=0.15)
    base = load_base(str(model_dir), tmp_path / "cache")
    expected = logits(base.model)
    report = export_gguf(base.model, base.tokenizer, base.path, tmp_path / "m.gguf", GgufType.Q8_0)
    assert report.f16_fallbacks and all("down_proj" in n or "embed" in n or "proj" in n for n in report.f16_fallbacks)
    types = {t.name: t.tensor_type.name for t in GGUFReader(report.path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80
    assert types["blk.0.ffn_up.weight"] == "F16"  # rows of 48
    assert_close(logits(load_gguf(report.path)), expected, GgufType.Q8_0)


# -- refusals and safety --------------------------------------------------------------------------------------


def test_an_existing_file_is_refused_without_force(sharp: Base, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF old export")
    with pytest.raises(OutputExists, match="--force"):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, out, GgufType.F16)
    assert out.read_bytes() == b"GGUF old export"
    export_gguf(sharp.model, sharp.tokenizer, sharp.path, out, GgufType.F16, force=True)
    assert out.stat().st_size > 1000 and stat.S_IMODE(out.stat().st_mode) == 0o600
    notes = tmp_path / "notes.txt"
    notes.write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExists, match="not a GGUF file"):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, notes, GgufType.F16, force=True)
    assert notes.read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_a_target_that_is_not_a_regular_file_is_refused(sharp: Base, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "target"
    if kind == "directory":
        target.mkdir()
        match = "is a directory"
    elif kind == "symlink":
        (folder / "real.gguf").write_bytes(b"GGUF")
        target.symlink_to(folder / "real.gguf")
        match = "symbolic link"
    else:
        os.mkfifo(target)
        match = "not a regular file"
    with pytest.raises(ExportError, match=match):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, target, GgufType.F16, force=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["target", *(["real.gguf"] if kind == "symlink" else [])])


def test_a_failed_write_leaves_no_file(sharp: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    convert, calls = ge._convert, []

    def failing(e: object, out_file: Path) -> np.ndarray:
        calls.append(e)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return convert(e, out_file)

    monkeypatch.setattr(ge, "_convert", failing)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ExportError, match="m.gguf: cannot write the GGUF: No space left"):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, folder / "m.gguf", GgufType.F16)
    assert list(folder.iterdir()) == []


def test_bytes_that_read_back_wrong_are_refused(sharp: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back check compares every tensor's bytes with what was converted (here: one bit flipped on
    its way to the file)."""
    write = ge._Writer.write_tensor_data

    def flipping(self: object, tensor: np.ndarray, *args: object) -> None:
        if not getattr(self, "flipped", False):
            self.flipped = True  # type: ignore[attr-defined]
            tensor = tensor.copy()
            tensor.reshape(-1).view(np.uint8)[7] ^= 1
        write(self, tensor, *args)

    monkeypatch.setattr(ge._Writer, "write_tensor_data", flipping)
    with pytest.raises(ExportError, match="tensor token_embd.weight reads back with other bytes"):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "out" / "m.gguf", GgufType.Q8_0)
    assert list((tmp_path / "out").iterdir()) == []


def test_weights_beyond_the_float16_range_are_refused(sharp: Base, tmp_path: Path) -> None:
    with torch.no_grad():
        sharp.model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(ExportError, match=r"model.layers.1.mlp.up_proj.weight is not finite after conversion to F16"):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "m.gguf", GgufType.F16)
    assert not (tmp_path / "m.gguf").exists()


def test_a_forward_hook_is_refused(sharp: Base, tmp_path: Path) -> None:
    sharp.model.model.norm.register_forward_hook(lambda _m, _a, out: out * 2)
    with pytest.raises(ExportError, match="forward hook"):
        export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "m.gguf", GgufType.F16)


def _tokenizer(model: object, pre: object | None) -> object:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(model)
    if pre is not None:
        backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("case", ["wordlevel", "bytelevel-no-regex-with-merges", "whitespace-pre"])
def test_unsupported_tokenizers_are_refused(sharp: Base, tmp_path: Path, case: str) -> None:
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3}
    tok, match = {
        "wordlevel": (_tokenizer(models.WordLevel(vocab, unk_token="<unk>"), None), "tokenizer model 'WordLevel'"),
        "bytelevel-no-regex-with-merges": (
            _tokenizer(models.BPE(vocab, [("a", "b")]), pre_tokenizers.ByteLevel(use_regex=False)),
            "pre-tokenizer .* has no llama.cpp equivalent"),
        "whitespace-pre": (_tokenizer(models.BPE(vocab, [("a", "b")]), pre_tokenizers.Whitespace()),
                           "Whitespace.* has no llama.cpp equivalent"),
    }[case]
    with pytest.raises(ExportError, match=match):
        export_gguf(sharp.model, tok, sharp.path, tmp_path / "m.gguf", GgufType.F16)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".m.gguf*")) == []


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259)).eval()
    with pytest.raises(ExportError, match="Llama-architecture models only; this base is 'gpt2'"):
        export_gguf(model, None, tmp_path, tmp_path / "m.gguf", GgufType.F16)
    assert not (tmp_path / "m.gguf").exists()


def test_a_source_gguf_of_another_architecture_is_refused(sharp: Base, tmp_path: Path) -> None:
    from gguf import GGUFWriter

    source = tmp_path / "qwen.gguf"
    writer = GGUFWriter(source, "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ExportError, match="qwen.gguf: GGUF export writes Llama-architecture models only; this one is 'qwen2'"):
        export_gguf(sharp.model, sharp.tokenizer, source, tmp_path / "m.gguf", GgufType.F16)


# -- the command line ---------------------------------------------------------------------------------------


def _cli_env(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, trainer: str) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[trainer]\nmodel = "{model_dir}"\n{trainer}batch_size = 4\nseq_len = 32\nseed = 3\n'
                   f'eval_examples = 16\n[paths]\ndata_dir = "{tmp_path / "data"}"\n'
                   f'cache_dir = "{tmp_path / "cache"}"\n', encoding="utf-8")
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    fill_store(tmp_path / "data" / "pocketd.sqlite3")
    return tmp_path


def pocketd(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _checkpoint_model(tmp_path: Path, checkpoint_id: int) -> torch.nn.Module:
    """A checkpoint's model, as pocketd loads it."""
    from pocketd.daemon.config import load_config
    from pocketd.store import Store
    from pocketd.trainer.checkpoints import load_checkpoint

    cfg = load_config().config
    with Store.open(tmp_path / "data" / "pocketd.sqlite3") as store:
        base, _params, ck = load_checkpoint(store, cfg.trainer, cfg.paths.cache_dir, checkpoint_id)
    assert ck is not None and ck.id == checkpoint_id
    return base.model


@pytest.mark.parametrize("trainer", ['method = "mezo"\nlr = 1e-2\neps = 1e-2\n',
                                     'method = "side"\nside_part = "block"\nside_blocks = 2\nside_lr = 1e-2\n'],
                         ids=["mezo-lora", "side-block"])
def test_cli_exports_a_trained_checkpoint(sharp_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          trainer: str) -> None:
    env = _cli_env(tmp_path, sharp_model_dir, monkeypatch, trainer)
    code, out, err = pocketd("train", "--steps", "4")
    assert code == 0 and "checkpoint 1" in out, out + err
    expected = logits(_checkpoint_model(env, 1))  # promoted or not (a few steps may not improve held-out loss)
    out_file = env / "exports" / "model.gguf"
    code, out, err = pocketd("export", "--gguf", str(out_file), "--type", "q8_0", "--json", "--checkpoint", "1")
    assert code == 0, out + err
    report = json.loads(out.strip().splitlines()[-1])
    blocks = 4 if "block" in trainer else 2
    assert report["kind"] == "gguf" and report["type"] == "q8_0" and report["block_count"] == blocks
    assert report["path"] == str(out_file) and report["bytes"] == out_file.stat().st_size
    assert report["checkpoint"]["id"] == 1 and report["tensors"] == 2 + 9 * blocks
    assert "writing q8_0 GGUF" in err
    assert_close(logits(load_gguf(out_file)), expected, GgufType.Q8_0)
    code, out, err = pocketd("export", "--gguf", str(out_file), "--checkpoint", "1")
    assert code == 1 and "--force" in err and "file exists" in err
    code, out, err = pocketd("export", "--gguf", str(out_file), "--force", "--checkpoint", "1")
    assert code == 0 and "f16 GGUF" in out and f"{blocks} blocks" in out, out + err


def test_cli_usage_errors(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cli_env(tmp_path, tiny_model_dir, monkeypatch, "")
    code, out, err = pocketd("export", "--gguf", "a.gguf", "--merged", "b")
    assert code == 2 and "exactly one of --merged DIR, --adapter DIR and --gguf FILE" in err
    code, out, err = pocketd("export", "--merged", "b", "--type", "q8_0")
    assert code == 2 and "--type goes with --gguf" in err
    code, out, err = pocketd("export", "--gguf", "a.gguf", "--type", "q4_0")
    assert code == 2 and "q4_0" in err
    (tmp_path / "adir").mkdir()
    code, out, err = pocketd("export", "--gguf", str(tmp_path / "adir"))
    assert code == 1 and "is a directory" in err


def test_cli_refuses_a_side_mlp(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _cli_env(tmp_path, tiny_model_dir, monkeypatch, 'method = "side"\nside_part = "mlp"\nside_hidden = 16\n')
    assert pocketd("train", "--steps", "3")[0] == 0
    code, out, err = pocketd("export", "--gguf", str(env / "m.gguf"))
    assert code == 1 and "side MLP" in err and not (env / "m.gguf").exists(), out + err


# -- llama.cpp itself (optional: llama-cpp-python builds llama.cpp from source) ----------------------------------


@pytest.mark.parametrize("qtype", list(GgufType))
def test_llama_cpp_runs_the_export(sharp: Base, tmp_path: Path, qtype: GgufType) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    expected = logits(sharp.model)[0]  # [T, V]
    out = export_gguf(sharp.model, sharp.tokenizer, sharp.path, tmp_path / "m.gguf", qtype).path
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1, seed=0)
    try:
        text = "Bread: 500 g flour, wörter"
        ids = sharp.tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(IDS[0].tolist())
        got = torch.tensor(np.asarray(llm.scores[: IDS.shape[1]]))
    finally:
        llm.close()
    assert_close(got, expected, qtype)


# -- the real default model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_default_gguf_exports_with_its_metadata_and_tokenizer(tmp_path: Path) -> None:
    from pocketd.trainer.model import default_gguf_path

    base = load_base("default", tmp_path / "cache")
    source = default_gguf_path()
    out = export_gguf(base.model, base.tokenizer, base.path, tmp_path / "smol.gguf", GgufType.Q8_0).path
    before, after = fields(source), fields(out)
    changed = {"general.file_type"}
    assert after["general.file_type"] == 7 and after["llama.block_count"] == before["llama.block_count"] == 30
    assert {k: v for k, v in before.items() if k not in changed} == {k: v for k, v in after.items() if k not in changed}
    assert [t.name for t in GGUFReader(out).tensors if t.name == "output.weight"] == []  # tied, as the source
    text = "Notes from 2023: the sourdough starter needs 100 g flour — twice a day!"
    exported = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name, local_files_only=True)
    assert exported(text)["input_ids"] == base.tokenizer(text)["input_ids"]
    assert exported.chat_template == base.tokenizer.chat_template
