"""The metadata of a GGUF export: copied from the source GGUF, or written from a Hugging Face directory.

A GGUF base (the default model): every key-value of the source file is copied as it is (tokenizer,
chat template, rope, names, ...), strings as their raw bytes, except what the export changes:
`<arch>.block_count` (block expansion appends layers), `general.file_type` and
`general.quantization_version` (the new tensor types), and keys describing the source's quantization
or its split into shards (`quantize.*`, `split.*`). The source must describe the loaded model (same
widths, heads and vocabulary, at most as many layers): ExportError otherwise.

A Hugging Face directory base (a user's own model, the tiny test model): the Llama keys come from its
config (what llama.cpp's convert_hf_to_gguf.py writes for a Llama), the tokenizer keys from the loaded
tokenizer. Only byte-level BPE tokenizers whose pre-tokenizer has a llama.cpp equivalent are supported
(GPT-2's, and SmolLM's digits-then-GPT-2); anything else is refused naming what is missing, since a
GGUF whose tokenizer splits text differently would quietly give other token ids than the model learned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError

log = logging.getLogger(__name__)

ARCH = "llama"
_SKIP_PREFIXES = ("GGUF.", "quantize.", "split.")


@dataclass(frozen=True)
class KV:
    """One metadata key-value as GGUFWriter.add_key_value takes it."""

    key: str
    value: Any
    vtype: Any  # gguf.GGUFValueType
    sub_type: Any = None  # element type of an array


def check_llama(config: Any) -> None:
    """ExportError unless the model is a Llama (the one architecture the GGUF export writes)."""
    model_type = getattr(config, "model_type", None)
    if model_type != ARCH:
        raise ExportError(f"GGUF export writes Llama-architecture models only; this base is {model_type!r} "
                          "(export it with --merged and convert it with llama.cpp's convert_hf_to_gguf.py)")


def own_keys(config: Any, file_type: int) -> list[KV]:
    """The keys every export sets itself: block count, file type, quantization version."""
    from gguf import GGML_QUANT_VERSION, GGUFValueType, Keys

    u32 = GGUFValueType.UINT32
    return [KV(Keys.LLM.BLOCK_COUNT.format(arch=ARCH), int(config.num_hidden_layers), u32),
            KV(Keys.General.FILE_TYPE, int(file_type), u32),
            KV(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, u32)]


# ---------------------------------------------------------------------------
# From the source GGUF


def source_metadata(source: Path, config: Any, file_type: int) -> tuple[list[KV], bool]:
    """The source GGUF's key-values to write (see the module docstring) and whether it has `output.weight`."""
    from gguf import GGUFReader, GGUFValueType, Keys

    try:
        reader = GGUFReader(source)
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ExportError(f"{source}: cannot read the source GGUF: {type(e).__name__}: {e}") from e
    arch_field = reader.fields.get(Keys.General.ARCHITECTURE)
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace") if arch_field else None
    if arch != ARCH:
        raise ExportError(f"{source}: GGUF export writes Llama-architecture models only; this one is {arch!r}")
    own = {kv.key for kv in own_keys(config, file_type)}
    out: list[KV] = []
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_PREFIXES) or key == Keys.General.ARCHITECTURE or key in own:
            continue
        vtype = GGUFValueType(int(field.types[0]))
        if vtype is GGUFValueType.ARRAY:
            if len(field.types) > 2:
                raise ExportError(f"{source}: key {key} is a nested array, which this export cannot copy")
            sub = GGUFValueType(int(field.types[1]) if len(field.types) > 1 else int(field.parts[3][0]))
            if sub is GGUFValueType.STRING:
                value: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                value = list(field.contents())
            out.append(KV(key, value, vtype, sub))
            values[key] = len(value)
        else:
            value = bytes(field.parts[field.data[0]]) if vtype is GGUFValueType.STRING else field.contents()
            out.append(KV(key, value, vtype))
            values[key] = value
    _check_source_fits(source, values, config, reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    del reader  # its memory map
    return out + own_keys(config, file_type), has_output


def _check_source_fits(source: Path, values: dict[str, Any], config: Any, reader: Any) -> None:
    """ExportError unless the source GGUF describes the loaded model (apart from appended blocks)."""
    from gguf import Keys

    L = Keys.LLM
    expected = {
        L.EMBEDDING_LENGTH.format(arch=ARCH): config.hidden_size,
        L.FEED_FORWARD_LENGTH.format(arch=ARCH): config.intermediate_size,
        Keys.Attention.HEAD_COUNT.format(arch=ARCH): config.num_attention_heads,
        Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH): config.num_key_value_heads,
        Keys.Tokenizer.LIST: config.vocab_size,  # the token list's length
    }
    for key, want in expected.items():
        if key in values and int(values[key]) != int(want):
            raise ExportError(f"{source}: {key} is {values[key]} but the loaded model has {want}; "
                              "the source GGUF is not the model's base (was the file replaced?)")
    blocks = reader.fields.get(L.BLOCK_COUNT.format(arch=ARCH))
    if blocks is not None and int(blocks.contents()) > int(config.num_hidden_layers):
        raise ExportError(f"{source}: has {int(blocks.contents())} blocks but the model only "
                          f"{config.num_hidden_layers}; the source GGUF is not the model's base")


# ---------------------------------------------------------------------------
# From a Hugging Face config and tokenizer


def hf_metadata(config: Any, tokenizer: Any, file_type: int, name: str) -> list[KV]:
    """Llama and tokenizer keys for a model loaded from a Hugging Face directory; ExportError naming what
    is not supported (a rope scaling, a tokenizer that is not byte-level BPE, an unknown pre-tokenizer)."""
    from gguf import GGUFValueType as T, Keys

    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported by the GGUF "
                          "export of a Hugging Face directory (export --merged and use llama.cpp's converter)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("the model config has no rope_theta")
    a = {"arch": ARCH}
    kvs = [
        KV(Keys.General.TYPE, "model", T.STRING),
        KV(Keys.General.NAME, name, T.STRING),
        KV(L.CONTEXT_LENGTH.format(**a), int(config.max_position_embeddings), T.UINT32),
        KV(L.EMBEDDING_LENGTH.format(**a), int(config.hidden_size), T.UINT32),
        KV(L.FEED_FORWARD_LENGTH.format(**a), int(config.intermediate_size), T.UINT32),
        KV(A.HEAD_COUNT.format(**a), heads, T.UINT32),
        KV(A.HEAD_COUNT_KV.format(**a), int(config.num_key_value_heads), T.UINT32),
        KV(R.FREQ_BASE.format(**a), float(theta), T.FLOAT32),
        KV(A.LAYERNORM_RMS_EPS.format(**a), float(config.rms_norm_eps), T.FLOAT32),
        KV(L.VOCAB_SIZE.format(**a), int(config.vocab_size), T.UINT32),
        KV(R.DIMENSION_COUNT.format(**a), head_dim, T.UINT32),
    ]
    if head_dim * heads != int(config.hidden_size):
        kvs += [KV(A.KEY_LENGTH.format(**a), head_dim, T.UINT32), KV(A.VALUE_LENGTH.format(**a), head_dim, T.UINT32)]
    return kvs + tokenizer_metadata(tokenizer, int(config.vocab_size)) + own_keys(config, file_type)


def pre_tokenizer_name(pre: Any, has_merges: bool) -> str:
    """llama.cpp's name for a tokenizers pre-tokenizer (as serialized in tokenizer.json); ExportError if none."""
    def byte_level(p: Any, regex: bool | None) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and (regex is None or bool(p.get("use_regex", True)) is regex))

    if byte_level(pre, True) or (byte_level(pre, None) and not has_merges):  # no merges: every byte is a token
        return "gpt-2"  # llama.cpp's name (the tokenizer model stays "gpt2")
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True}
                and byte_level(parts[1], True)):
            return "smollm"
    raise ExportError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent this "
                      "export knows (byte-level GPT-2 or SmolLM only); export --merged and convert it with "
                      "llama.cpp's convert_hf_to_gguf.py")


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> list[KV]:
    """tokenizer.ggml.* keys of a byte-level BPE tokenizer (as llama.cpp's converter writes them)."""
    from gguf import GGUFValueType as T, Keys, TokenType

    K = Keys.Tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the tokenizer is a slow (Python) tokenizer without tokenizer.json; "
                          "GGUF export needs a fast byte-level BPE tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges"):
        raise ExportError(f"the tokenizer model {model.get('type')!r} (byte_fallback {model.get('byte_fallback')}, "
                          f"ignore_merges {model.get('ignore_merges')}) is not supported: GGUF export writes "
                          "byte-level BPE tokenizers only")
    if spec.get("normalizer") is not None:
        raise ExportError(f"the tokenizer has a normalizer ({spec['normalizer'].get('type')}), "
                          "which a byte-level BPE GGUF tokenizer cannot express")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), bool(merges))
    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(vocab.values())} but the model only {vocab_size} embeddings")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    kvs = [KV(K.MODEL, "gpt2", T.STRING), KV(K.PRE, pre, T.STRING),
           KV(K.LIST, tokens, T.ARRAY, T.STRING), KV(K.TOKEN_TYPE, [int(t) for t in types], T.ARRAY, T.INT32),
           KV(K.MERGES, merges, T.ARRAY, T.STRING)]  # llama.cpp needs the key even when empty
    ids = {K.BOS_ID: "bos_token_id", K.EOS_ID: "eos_token_id", K.UNK_ID: "unk_token_id", K.PAD_ID: "pad_token_id"}
    for key, attr in ids.items():
        value = getattr(tokenizer, attr, None)
        if value is not None:
            kvs.append(KV(key, int(value), T.UINT32))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    kvs += [KV(K.ADD_BOS, bool(probe) and probe[0] == bos, T.BOOL), KV(K.ADD_EOS, bool(probe) and probe[-1] == eos, T.BOOL)]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kvs.append(KV(K.CHAT_TEMPLATE, template, T.STRING))
    elif template:
        log.warning("the tokenizer has several chat templates; the GGUF gets none")
    return kvs
