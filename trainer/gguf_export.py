"""Exporting a trained model as one GGUF file that llama.cpp (llama-cli, ollama, apps) runs.

`export_gguf` folds the LoRA adapters into the weights (in place, as `export --merged` does), then
writes every tensor of the model's state dict under its GGUF name (gguf's TensorNameMap for Llama
with the model's block count, so appended blocks are written too), with llama.cpp's q/k row
permutation (transformers' GGUF loader undoes it). 1-D tensors and norms are F32; 2-D weights F16 or
Q8_0 (gguf.quants; a row whose length is not a multiple of Q8_0's block of 32 falls back to F16, as
llama.cpp's converter does). Tied embeddings: `output.weight` only if the source GGUF has one or the
model's head is not tied. The metadata comes from trainer.gguf_meta.

The file is streamed tensor by tensor into a unique 0600 temp file next to the target, fsynced,
read back (gguf.GGUFReader: names, types, shapes, a CRC of every tensor's bytes and the block
count must be what was written) and only then renamed into place. Every tensor is checked finite
after conversion (F16 overflow beyond ±65504 and NaN; Q8_0 block scales). A failure or Ctrl-C
leaves no file. The target must be a new file, or with `force` an existing GGUF file; a directory,
symlink, other non-regular file or a non-GGUF file is never replaced.

Memory: the model as loaded (e.g. ~540 MB for the default model in float32), plus one converted
tensor at a time (the largest, the embedding: 57 MB in F16, 30 MB in Q8_0, plus its float32 copy if
the model is bfloat16), Q8_0 temporaries of at most ~16 MB, and the metadata (the default model's
token list and merges: ~20 MB as Python objects, more while gguf's reader parses them). Reading back
uses read() in 1 MiB pieces, so the written file's pages never count in the process's RSS. Measured
(bench/gguf_llama.py, default model): `pocketd export --gguf` peaks at ~1.06 GB RSS against ~0.91 GB
for `--merged`, both mostly the loaded float32 model and the Python/torch runtime.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType
from gguf import MODEL_ARCH, get_tensor_name_map, quantize
from torch import nn

from pocketd.store.private import FILE_MODE, fsync_dir, make_private_dir, publish

from .errors import ExportError, OutputExists
from .gguf_meta import ARCH, KV, check_llama, hf_metadata, source_metadata
from .lora import lora_modules, merge_lora
from .method import Progress

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
Q8_BLOCK = 32
_CHUNK_ELEMENTS = 1 << 20  # float32 elements quantized at once (Q8_0 temporaries stay ~16 MB)


class GgufType(str, Enum):
    """The tensor type of the exported weights (`--type`)."""

    F16 = "f16"
    Q8_0 = "q8_0"


@dataclass(frozen=True)
class GgufReport:
    """What `export_gguf` wrote."""

    path: Path
    bytes: int
    qtype: GgufType
    tensors: int
    block_count: int
    seconds: float
    f16_fallbacks: tuple[str, ...] = field(default=())  # Q8_0 requested, row length not a multiple of 32


@dataclass(frozen=True)
class _Entry:
    hf_name: str
    name: str  # GGUF name
    tensor: torch.Tensor
    ggml_type: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None  # q/k: llama.cpp's rope row order over this many heads


def check_target(out_file: Path, force: bool) -> None:
    """ExportError unless `out_file` may be written: missing, or (with `force`) an existing GGUF file."""
    try:
        st = os.lstat(out_file)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ExportError(f"{out_file}: is a symbolic link; pocketd does not write through it (give a new file name)")
    if stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{out_file}: is a directory; --gguf takes a file name, e.g. {out_file / 'model.gguf'}")
    if not stat.S_ISREG(st.st_mode):
        raise ExportError(f"{out_file}: exists and is not a regular file")
    if not force:
        raise OutputExists(f"{out_file}: file exists (use --force to replace a previous GGUF export)")
    try:
        with open(out_file, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ExportError(f"{out_file}: cannot read it: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise OutputExists(f"{out_file}: exists and is not a GGUF file; refusing to replace it even with --force")


def export_gguf(model: nn.Module, tokenizer: Any, base_path: Path, out_file: Path, qtype: GgufType, *,
                force: bool = False, progress: Progress | None = None) -> GgufReport:
    """Write `model` (its adapters merged in place first) to the GGUF file `out_file`; see the module docstring.

    `base_path`: the configured base, a .gguf file (its metadata is copied) or a Hugging Face directory
    (metadata from the model's config and `tokenizer`). `progress(done, total)` after every tensor.
    ExportError naming the file or the tensor when it cannot be written; nothing is left behind then.
    """
    t0 = time.monotonic()
    out_file = Path(out_file).expanduser()
    check_target(out_file, force)
    _check_plain(model)
    config = model.config
    check_llama(config)
    file_type = LlamaFileType.MOSTLY_F16 if qtype is GgufType.F16 else LlamaFileType.MOSTLY_Q8_0
    base_path = Path(base_path)
    if base_path.suffix.lower() == ".gguf":
        kvs, source_output = source_metadata(base_path, config, file_type)
    else:
        kvs, source_output = hf_metadata(config, tokenizer, file_type, base_path.name), False
    merge_lora(model)  # after every refusal that needs no tensor: a refused export leaves the model as it was
    if lora_modules(model):
        raise ExportError("the model still has LoRA adapters after merging them")
    wanted = GGMLQuantizationType.F16 if qtype is GgufType.F16 else GGMLQuantizationType.Q8_0
    entries = _plan(model, wanted, source_output)
    fallbacks = tuple(e.hf_name for e in entries if wanted is GGMLQuantizationType.Q8_0
                      and len(e.tensor.shape) == 2 and e.ggml_type is GGMLQuantizationType.F16)
    if fallbacks:
        log.warning("%d tensors have rows not a multiple of %d: written F16 instead of Q8_0", len(fallbacks), Q8_BLOCK)
    try:
        make_private_dir(out_file.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    except OSError as e:
        raise ExportError(f"{out_file}: cannot create a file in its folder: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        crcs = _write(tmp, kvs, entries, out_file, progress)
        _verify(tmp, entries, crcs, int(config.num_hidden_layers), out_file)
        _place(tmp, out_file, force)
    except OSError as e:
        raise ExportError(f"{out_file}: cannot write the GGUF: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    size = out_file.stat().st_size
    report = GgufReport(out_file, size, qtype, len(entries), int(config.num_hidden_layers),
                        time.monotonic() - t0, fallbacks)
    log.info("GGUF (%s, %d tensors, %d blocks, %.1f MiB) written to %s in %.1f s", qtype.value, report.tensors,
             report.block_count, size / 2**20, out_file, report.seconds)
    return report


def _check_plain(model: nn.Module) -> None:
    """ExportError if a module of the model has forward hooks (e.g. a side MLP): a GGUF would drop them."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise ExportError(f"module {name or 'the model'} has a forward hook (a side MLP?), which a GGUF "
                              "cannot hold; use a side_part that exports")


def _plan(model: nn.Module, wanted: Any, source_output: bool) -> list[_Entry]:
    """Every tensor to write, with its GGUF name and type, in state-dict order."""
    config = model.config
    n_layers = int(config.num_hidden_layers)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) != n_layers:
        raise ExportError(f"the model has {len(layers) if layers is not None else 'no'} decoder layers but its "
                          f"config says num_hidden_layers = {n_layers}")
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    entries: list[_Entry] = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied and not source_output:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name} has no GGUF name in a Llama model of {n_layers} blocks")
        if not tensor.is_floating_point() or tensor.dim() not in (1, 2):
            raise ExportError(f"tensor {hf_name}: {tensor.dtype} of shape {tuple(tensor.shape)} cannot be exported")
        if tensor.dim() == 1 or name.endswith("_norm.weight"):
            ggml_type = GGMLQuantizationType.F32
        elif wanted is GGMLQuantizationType.Q8_0 and tensor.shape[-1] % Q8_BLOCK != 0:
            ggml_type = GGMLQuantizationType.F16
        else:
            ggml_type = wanted
        permute = heads if ".q_proj." in hf_name else kv_heads if ".k_proj." in hf_name else None
        entries.append(_Entry(hf_name, name, tensor, ggml_type, permute))
    return entries


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(e: _Entry, out_file: Path) -> np.ndarray:
    """The tensor's bytes as written (np.float32 / np.float16, or uint8 Q8_0 blocks), checked finite."""
    w = e.tensor.detach().to(torch.float32)
    if e.permute_heads is not None:
        w = _permute(w, e.permute_heads)
    src = w.contiguous().numpy()
    if e.ggml_type is GGMLQuantizationType.F32:
        data, check = src, src
    elif e.ggml_type is GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused below
            data = src.astype(np.float16)
        check = data
    else:
        rows = src.reshape(-1, src.shape[-1])
        data = np.empty((rows.shape[0], rows.shape[1] // Q8_BLOCK * 34), dtype=np.uint8)
        step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
        for r in range(0, rows.shape[0], step):
            data[r : r + step] = quantize(rows[r : r + step], GGMLQuantizationType.Q8_0)
        check = data.reshape(-1, 34)[:, :2].copy().view(np.float16)  # each block's scale
    if not np.isfinite(check).all():
        raise ExportError(f"{out_file}: tensor {e.hf_name} is not finite after conversion to {e.ggml_type.name} "
                          "(NaN, or values beyond the float16 range ±65504); nothing written")
    return data


def _write(tmp: Path, kvs: list[KV], entries: list[_Entry], out_file: Path,
           progress: Progress | None) -> list[int]:
    """Stream the GGUF into `tmp` (0600) and fsync it; the CRC-32 of every tensor's bytes."""
    writer = _Writer(tmp, ARCH)
    try:
        for kv in kvs:
            writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
        for e in entries:
            shape = tuple(e.tensor.shape)
            if e.ggml_type.name == "Q8_0":
                byte_shape = (*shape[:-1], shape[-1] // Q8_BLOCK * 34)
                writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), e.ggml_type)
            else:
                dtype = np.dtype(np.float32 if e.ggml_type.name == "F32" else np.float16)
                writer.add_tensor_info(e.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        writer.write_header_to_file()
        fout = writer.fout[0] if writer.fout else None
        if fout is None:
            raise ExportError(f"{out_file}: the GGUF writer opened no file")
        os.fchmod(fout.fileno(), FILE_MODE)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        crcs = []
        for i, e in enumerate(entries):
            data = _convert(e, out_file)
            crcs.append(zlib.crc32(data.reshape(-1).view(np.uint8)))
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(i + 1, len(entries))
        writer.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()
    return crcs


def _verify(tmp: Path, entries: list[_Entry], crcs: list[int], block_count: int, out_file: Path) -> None:
    """Read the written file back: every tensor as planned, with the bytes written, and the block count."""
    try:
        reader = GGUFReader(tmp)
    except (ValueError, IndexError, KeyError) as e:
        raise ExportError(f"{out_file}: the written GGUF does not read back: {type(e).__name__}: {e}") from e
    blocks = reader.fields.get(Keys.LLM.BLOCK_COUNT.format(arch=ARCH))
    if blocks is None or int(blocks.contents()) != block_count:
        raise ExportError(f"{out_file}: the written GGUF does not read back with {block_count} blocks")
    if len(reader.tensors) != len(entries):
        raise ExportError(f"{out_file}: {len(reader.tensors)} tensors read back, {len(entries)} written")
    regions = []
    for t, e in zip(reader.tensors, entries):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.name != e.name or t.tensor_type != e.ggml_type or shape != tuple(e.tensor.shape):
            raise ExportError(f"{out_file}: tensor {t.name} {t.tensor_type.name} {shape} read back, "
                              f"{e.name} {e.ggml_type.name} {tuple(e.tensor.shape)} written")
        regions.append((t.name, int(t.data_offset), int(t.n_bytes)))
    del reader
    with open(tmp, "rb") as f:  # read(), not the reader's memory map: the file's pages stay out of our RSS
        for (name, offset, n), crc in zip(regions, crcs):
            f.seek(offset)
            got = 0
            while n > 0:
                chunk = f.read(min(n, 1 << 20))
                if not chunk:
                    break
                got, n = zlib.crc32(chunk, got), n - len(chunk)
            if n or got != crc:
                raise ExportError(f"{out_file}: tensor {name} reads back with other bytes than were written")


def _place(tmp: Path, out_file: Path, force: bool) -> None:
    """Move the verified temp file to `out_file`: never over a file that appeared meanwhile unless `force`."""
    check_target(out_file, force)
    if force:
        publish(tmp, out_file)
        return
    else:
        try:
            os.link(tmp, out_file)  # fails if out_file exists: no clobbering between the check and here
        except FileExistsError:
            raise OutputExists(f"{out_file}: file exists (use --force to replace a previous GGUF export)") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            publish(tmp, out_file)  # a filesystem without hard links (Android shared storage)
            return
    fsync_dir(out_file.parent)


class _Writer(GGUFWriter):  # type: ignore[misc]
    """GGUFWriter that also writes an empty typed array (llama.cpp needs `tokenizer.ggml.merges` even empty)."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return bytes(super()._pack_val(val, vtype, add_vtype, sub_type))
