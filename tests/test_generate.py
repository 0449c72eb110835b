"""Generation: deterministic per seed, streaming, greedy, stop tokens, chat template, the CLI."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from pocketd.trainer.errors import PromptTooLong
from pocketd.trainer.generate import encode_prompt, generate
from pocketd.trainer.lora import LoraSpec, attach_lora
from pocketd.trainer.model import Base, load_base
from pocketd.trainer.tiny import SPECIAL_TOKENS, make_tokenizer

EOS = SPECIAL_TOKENS.index("<|im_end|>")


@pytest.fixture
def tiny(tiny_model_dir: Path, tmp_path: Path) -> Base:
    return load_base(str(tiny_model_dir), tmp_path / "cache")


def test_same_seed_same_text_other_seed_other_text(tiny: Base) -> None:
    a = generate(tiny.model, tiny.tokenizer, "hello", 24, 1.0, seed=5)
    b = generate(tiny.model, tiny.tokenizer, "hello", 24, 1.0, seed=5)
    c = generate(tiny.model, tiny.tokenizer, "hello", 24, 1.0, seed=6)
    assert a == b and a != c


def test_streams_pieces_that_add_up_to_the_reply(tiny: Base) -> None:
    pieces: list[str] = []
    text = generate(tiny.model, tiny.tokenizer, "hello", 24, 1.0, seed=1, on_token=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text


def test_sampling_leaves_the_global_rng_alone(tiny: Base) -> None:
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    generate(tiny.model, tiny.tokenizer, "hello", 8, 1.0, seed=9)
    assert torch.equal(torch.rand(2), expected)


def test_temperature_zero_is_greedy_and_ignores_the_seed(tiny: Base) -> None:
    greedy = generate(tiny.model, tiny.tokenizer, "hi", 16, 0.0, seed=1)
    assert greedy == generate(tiny.model, tiny.tokenizer, "hi", 16, 0.0, seed=2)
    # A nucleus this small keeps only the most likely token: the same as greedy.
    assert generate(tiny.model, tiny.tokenizer, "hi", 16, 1.0, seed=3, top_p=1e-9) == greedy


def test_lora_with_zero_b_generates_like_the_base(tiny: Base) -> None:
    before = generate(tiny.model, tiny.tokenizer, "hi", 12, 0.0, seed=0)
    attach_lora(tiny.model, LoraSpec(rank=2, alpha=4.0, targets="all", layers=None, seed=0))
    assert generate(tiny.model, tiny.tokenizer, "hi", 12, 0.0, seed=0) == before


def test_chat_template_is_used_unless_disabled() -> None:
    tok = make_tokenizer()
    chat = tok.decode(encode_prompt(tok, "hi"))
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(encode_prompt(tok, "hi", chat=False)) == "hi"


def test_prompt_longer_than_the_context_is_refused(tiny: Base) -> None:
    with pytest.raises(PromptTooLong, match="context is 512 tokens"):
        generate(tiny.model, tiny.tokenizer, "x" * 500, 32, 0.0, seed=0)


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token script (greedy), one token per forward, then EOS; counts forwards."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script = script
        self.calls = 0
        self.config = SimpleNamespace(max_position_embeddings=1024)
        self.generation_config = SimpleNamespace(eos_token_id=[EOS])

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = True,
                logits_to_keep: int = 0) -> SimpleNamespace:
        token = self.script[self.calls] if self.calls < len(self.script) else EOS
        self.calls += 1
        logits = torch.zeros(1, input_ids.shape[1] if not logits_to_keep else 1, 259)
        logits[0, -1, token] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=(past_key_values or 0) + 1)


def _byte_ids(text: str) -> list[int]:
    return [len(SPECIAL_TOKENS) + b for b in text.encode("utf-8")]


def test_stops_at_eos_and_at_max_new_tokens() -> None:
    tok = make_tokenizer()
    model = ScriptedLM(_byte_ids("abc"))
    assert generate(model, tok, "q", 50, 0.0, 0) == "abc"
    assert model.calls == 4  # three tokens, then EOS
    model = ScriptedLM(_byte_ids("abcdefgh"))
    assert generate(model, tok, "q", 5, 0.0, 0) == "abcde"
    assert model.calls == 5


def test_multibyte_characters_are_never_streamed_half() -> None:
    tok = make_tokenizer()
    pieces: list[str] = []
    text = generate(ScriptedLM(_byte_ids("añ€😀!")), tok, "q", 50, 0.0, 0, pieces.append)
    assert text == "añ€😀!" and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_cli_generate_base_streams_to_stdout(tiny_model_dir: Path, tiny: Base) -> None:
    from pocketd.daemon.cli import cli

    expected = generate(tiny.model, tiny.tokenizer, "hello", 10, 0.8, seed=4, top_p=0.5)
    result = CliRunner().invoke(
        cli, ["--set", f"trainer.model={tiny_model_dir}", "generate", "hello", "--base",
              "--max-tokens", "10", "--temperature", "0.8", "--seed", "4", "--top-p", "0.5"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert "base model" in result.stderr and "seed 4" in result.stderr


def test_cli_generate_names_a_missing_model(tmp_path: Path) -> None:
    from pocketd.daemon.cli import cli

    missing = tmp_path / "nope"
    result = CliRunner().invoke(cli, ["--set", f"trainer.model={missing}", "generate", "hi", "--base"])
    assert result.exit_code == 1
    assert "pocketd: error:" in result.stderr and str(missing) in result.stderr


def test_cli_generate_applies_the_current_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    from pocketd.daemon.cli import cli
    from tests.test_export import make_current_checkpoint

    cache, data = tmp_path / "cache", tmp_path / "data"
    cid, _, model = make_current_checkpoint(tiny_model_dir, cache, data)
    pieces: list[str] = []  # what the CLI streams to stdout (a random tiny model emits invalid UTF-8 bytes)
    generate(model, make_tokenizer(), "hello", 10, 0.8, seed=4, top_p=0.9, on_token=pieces.append)  # CLI default
    expected = "".join(pieces)
    result = CliRunner().invoke(
        cli, ["--set", f"trainer.model={tiny_model_dir}", "--set", "trainer.lora_rank=4",
              "--set", f"paths.data_dir={data}", "--set", f"paths.cache_dir={cache}",
              "generate", "hello", "--max-tokens", "10", "--temperature", "0.8", "--seed", "4"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n" and f"checkpoint {cid}" in result.stderr
