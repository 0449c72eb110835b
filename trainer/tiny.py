"""A tiny randomly initialized Llama model directory for tests (nothing downloaded).

It is shaped like SmolLM2 (Llama architecture, grouped-query attention, tied
embeddings, ChatML chat template, eos = pad = <|im_end|>) but has hidden size 32
and a byte-level tokenizer: ids 0-2 are the special tokens, id 3 + b is byte b.
The directory is an ordinary Hugging Face model directory, so tests load it with
`trainer.model = "<dir>"` exactly like a user's local model. Same seed, same
weights (and so the same fingerprint); the global torch RNG is left untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (as in SmolLM2)
N_BYTES = 256
VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTES  # 259

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(N_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(N_BYTES + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def make_tokenizer() -> object:
    """A byte-level tokenizer (PreTrainedTokenizerFast) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(SPECIAL_TOKENS) + b
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[2],
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    seed: int = 0,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_positions: int = 512,
    init_std: float = 0.02,
) -> object:
    """A LlamaForCausalLM with weights drawn from a private generator seeded with `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=init_std,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # tied lm_head appears once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    model.tie_weights()
    return model.eval()


def make_tiny_model_dir(path: Path, seed: int = 0, **shape: int | float) -> Path:
    """Write a tiny model + tokenizer to `path` (created) as a Hugging Face model directory."""
    from pocketd.store import make_private_dir

    path = make_private_dir(Path(path))
    model = make_tiny_model(seed, **shape)  # type: ignore[arg-type]
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)  # type: ignore[attr-defined]
    log.info("tiny model (seed %d) written to %s", seed, path)
    return path
