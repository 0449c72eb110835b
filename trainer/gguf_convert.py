"""The weights stage of a GGUF conversion, resumable tensor by tensor (in the converter process).

transformers' GGUF load (`load_gguf_checkpoint(..., return_tensors=True)`) dequantizes every
tensor in one call, so a conversion killed by a stop restarts from zero. This is the same loop
(transformers' own `dequantize`, `TENSOR_PROCESSORS`, `get_gguf_hf_weights_map`, float32),
writing the converted tensors to numbered safetensors chunks in the partial dir and recording
the GGUF tensors done (WEIGHTS_MARKER, atomically) after each chunk, so a killed conversion
resumes where its last chunk ended. The config (from `load_gguf_checkpoint(return_tensors=False)`)
is kept in the marker too: parsing it again costs seconds. At the end the model is built on the
meta device from the config, given the chunks' tensors, tied, and saved as `save_plain_model`
does; once the caller has recorded the stage as done, remove_progress deletes the chunks and marker.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pocketd.store.private import atomic_write

log = logging.getLogger(__name__)

WEIGHTS_MARKER = "pocketd-weights.json"  # in a partial conversion: the weight chunks written so far
CHUNK_PREFIX = "pocketd-weights-"  # chunk files: pocketd-weights-00000.safetensors, ... (never "model*")
CHUNK_BYTES = 16 << 20
WEIGHTS_FORMAT = 1


def _chunk_name(i: int) -> str:
    return f"{CHUNK_PREFIX}{i:05d}.safetensors"


def _read_progress(out_dir: Path, gguf: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / WEIGHTS_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    st = gguf.stat()
    if (not isinstance(data, dict) or data.get("format") != WEIGHTS_FORMAT
            or data.get("gguf_size") != st.st_size or data.get("gguf_mtime_ns") != st.st_mtime_ns
            or not isinstance(data.get("config"), dict) or not isinstance(data.get("chunks"), list)
            or not isinstance(data.get("tensors"), list) or not isinstance(data.get("weights_map"), dict)):
        return None
    if not all((out_dir / c["file"]).is_file() for c in data["chunks"]):
        return None
    return data


def _model_config(config_dict: dict[str, Any]) -> Any:
    """The transformers config `from_pretrained(gguf_file=...)` builds from the GGUF metadata."""
    from transformers import AutoConfig

    d = dict(config_dict)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def convert_weights(gguf: Path, out_dir: Path, *, chunk_bytes: int = CHUNK_BYTES,
                    after_chunk: Callable[[int], None] | None = None) -> None:
    """Convert the weights of `gguf` into `out_dir/model.safetensors` (+ config), resuming from chunks.

    `after_chunk(n)` (tests) is called after chunk n is recorded.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize
    from safetensors.torch import load_file, save
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    progress = _read_progress(out_dir, gguf)
    if progress is None:
        for p in out_dir.glob(f"{CHUNK_PREFIX}*"):
            p.unlink()
        progress = _index(gguf)
        atomic_write(out_dir / WEIGHTS_MARKER, json.dumps(progress))
    config_dict: dict[str, Any] = progress["config"]
    config = _model_config(config_dict)
    done = {name for c in progress["chunks"] for name in c["done"]}

    if len(done) < len(progress["tensors"]):
        processor = TENSOR_PROCESSORS.get(progress["architecture"], TensorProcessor)(config=config_dict)
        tensor_key_mapping: dict[str, str] = progress["weights_map"]
        parsed_parameters: dict[str, Any] = {"config": config_dict, "tensors": {}}
        pending: dict[str, torch.Tensor] = {}
        pending_names: list[str] = []
        pending_bytes = 0
        mm = np.memmap(gguf, mode="r")

        def flush() -> None:
            nonlocal pending, pending_names, pending_bytes
            i = len(progress["chunks"])
            atomic_write(out_dir / _chunk_name(i), save(pending))
            progress["chunks"].append({"file": _chunk_name(i), "done": pending_names})
            atomic_write(out_dir / WEIGHTS_MARKER, json.dumps(progress))
            pending, pending_names, pending_bytes = {}, [], 0
            if after_chunk is not None:
                after_chunk(i)

        for entry in progress["tensors"]:  # the loop of transformers' load_gguf_checkpoint
            name = entry["name"]
            if name in done:
                continue
            dtype = np.dtype(entry["dtype"])
            off, shape = entry["offset"], tuple(entry["shape"])
            data = mm[off:off + dtype.itemsize * int(np.prod(shape))].view(dtype).reshape(shape)
            weights = dequantize(data, GGMLQuantizationType(entry["type"]))
            result = processor.process(weights=weights, name=name, tensor_key_mapping=tensor_key_mapping,
                                       parsed_parameters=parsed_parameters)
            # some processors put extra tensors into parsed_parameters["tensors"] themselves
            for key, extra in parsed_parameters["tensors"].items():
                pending[key] = extra.contiguous()
                pending_bytes += extra.numel() * extra.element_size()
            parsed_parameters["tensors"].clear()
            if result.name in tensor_key_mapping:
                t = torch.from_numpy(np.copy(result.weights)).to(torch.float32)
                pending[tensor_key_mapping[result.name]] = t
                pending_bytes += t.numel() * t.element_size()
            pending_names.append(name)
            if pending_bytes >= chunk_bytes:
                flush()
        if pending_names:
            flush()
        del mm

    state: dict[str, torch.Tensor] = {}
    for c in progress["chunks"]:
        state.update(load_file(str(out_dir / c["file"])))
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    still_meta = [n for n, p in fresh.state_dict().items() if p.is_meta]
    if unexpected or still_meta:
        raise ValueError(f"GGUF weights do not fit the model: missing {still_meta}, unexpected {unexpected}")
    del missing
    if fresh.can_generate():
        fresh.generation_config = GenerationConfig.from_model_config(config)
    fresh.save_pretrained(out_dir, safe_serialization=True)


def remove_progress(out_dir: Path) -> None:
    """Delete the chunks and WEIGHTS_MARKER, once the weights stage is recorded as done."""
    for pattern in (f"{CHUNK_PREFIX}*", ".pocketd-weights*"):  # also atomic_write temp files of a killed run
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)
    (out_dir / WEIGHTS_MARKER).unlink(missing_ok=True)



def _index(gguf: Path) -> dict[str, Any]:
    """What a resumed run needs without parsing the GGUF metadata again (seconds): the config,
    the architecture, the GGUF -> transformers tensor names and where each tensor's data lies."""
    import gguf as gguf_py
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    # transformers' functions import these from gguf when called: load_gguf_checkpoint gets the
    # reader parsed here (parsing is seconds), and get_gguf_hf_weights_map, which builds the same
    # name map for each of the ~400 submodules (~8 s), gets it built once per argument tuple.
    reader = gguf_py.GGUFReader(str(gguf))
    real_reader, real_name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    gguf_py.GGUFReader = lambda *args, **kwargs: reader
    gguf_py.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_name_map)
    try:
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
        architecture = read_field(reader, "general.architecture")[0]
        config_dict = parsed["config"]
        with torch.device("meta"):
            model_to_load = AutoModelForCausalLM.from_config(_model_config(config_dict), dtype=torch.float32)
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
        weights_map = get_gguf_hf_weights_map(model_to_load, processor)
    finally:
        gguf_py.GGUFReader, gguf_py.get_tensor_name_map = real_reader, real_name_map
    tensors = [{"name": t.name, "type": int(t.tensor_type), "offset": int(t.data_offset),
                "dtype": t.data.dtype.str, "shape": list(t.data.shape)} for t in reader.tensors]
    st = gguf.stat()
    return {"format": WEIGHTS_FORMAT, "gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns,
            "architecture": architecture, "config": config_dict, "weights_map": weights_map,
            "tensors": tensors, "chunks": []}
