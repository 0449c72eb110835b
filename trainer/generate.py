"""Text generation with streaming: a small manual loop over the KV cache.

Sampling draws from a private torch.Generator seeded with `seed` (the global RNG
is never touched), so the same model, prompt and seed give the same text;
temperature 0 is greedy. The prompt goes through the tokenizer's chat template
when it has one (unless chat=False).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .errors import GenerationError, PromptTooLong

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what decode yields for an incomplete UTF-8 sequence


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of the prompt: as a user turn of the chat template if there is one and chat is on."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise GenerationError("the prompt is empty and the tokenizer has no BOS token to start from")
        ids = [tokenizer.bos_token_id]
    return list(ids)


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else (nucleus) sampling with `gen`."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # [V], [V]
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class _Streamer:
    """Turns the growing id list into text pieces, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Any, on_token: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.ids: list[int] = []
        self.sent = 0  # characters already passed to on_token

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.text()
        if not text.endswith(REPLACEMENT):
            self._emit(text)

    def finish(self) -> str:
        text = self.text()
        self._emit(text)
        return text

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if len(text) > self.sent and self.on_token is not None:
            self.on_token(text[self.sent:])
        self.sent = max(self.sent, len(text))


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    on_token: Callable[[str], None] | None = None,
    *,
    chat: bool = True,
    top_p: float = 1.0,
    info: dict[str, Any] | None = None,
) -> str:
    """Generate a reply to `prompt`; stream text pieces to `on_token`; return the whole reply.

    Stops at an end-of-sequence token or after `max_new_tokens`. The pieces passed
    to `on_token` concatenate to the returned text. If `info` is given, it gets
    prompt_tokens, completion_tokens and stop ("eos" or "max_tokens").
    """
    ids = encode_prompt(tokenizer, prompt, chat)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens and {max_new_tokens} new tokens were asked for, "
            f"but the model's context is {limit} tokens"
        )
    stops = stop_ids(model, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    streamer = _Streamer(tokenizer, on_token)
    step_input = torch.tensor([ids])  # [1, T] first, then [1, 1]
    past = None
    t0 = time.monotonic()
    n = 0
    stop = "max_tokens"
    for n in range(1, max_new_tokens + 1):
        out = model(input_ids=step_input, past_key_values=past, use_cache=True, **extra)
        past = out.past_key_values
        next_id = sample_next(out.logits[0, -1], temperature, top_p, gen)  # logits [1, t, V] -> [V]
        if next_id in stops:
            stop = "eos"
            break
        streamer.push(next_id)
        step_input = torch.tensor([[next_id]])
    text = streamer.finish()
    if info is not None:
        info.update(prompt_tokens=len(ids), completion_tokens=len(streamer.ids), stop=stop)
    seconds = time.monotonic() - t0
    log.debug("generated %d tokens in %.2f s (prompt %d tokens)", n, seconds, len(ids))
    return text
