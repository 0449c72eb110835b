"""A standalone side checkpoint file: a JSON header and the trained tensors. Pure: bytes in, bytes out.

Layout (little-endian):

    b"PKTDSID1"                      magic + format version
    u32 header_len, header (UTF-8 JSON: base fingerprint, method, spec, estimator,
                            torch version, n_steps, sha256 of the tensors)
    the tensors as safetensors bytes
    32 bytes: sha256 of everything before it
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ckptfile import MAX_HEADER_BYTES, envelope, field, json_header, sha256_hex
from .config import Method
from .errors import CheckpointFileError

MAGIC = b"PKTDSID1"


@dataclass(frozen=True)
class SideFile:
    base_fingerprint: str
    spec: dict[str, Any]
    estimator: dict[str, Any]
    torch_version: str | None
    n_steps: int
    sha256: str  # TrainableSet.sha256 of the tensors
    tensors: bytes  # safetensors


def is_side_file(data: bytes) -> bool:
    return data.startswith(MAGIC[:7])


def pack(f: SideFile) -> bytes:
    header = json.dumps({"base_fingerprint": f.base_fingerprint, "method": Method.SIDE.value, "spec": f.spec,
                         "estimator": f.estimator, "torch_version": f.torch_version, "n_steps": f.n_steps,
                         "sha256": f.sha256}, sort_keys=True).encode("utf-8")
    payload = MAGIC + struct.pack("<I", len(header)) + header + f.tensors
    return payload + hashlib.sha256(payload).digest()


MAX_STEPS = 1 << 40  # a step count that fits every clock; larger is a forged header
# Bytes per element of the safetensors dtypes a side part can be stored in (the config's dtypes).
DTYPE_BYTES = {"F32": 4, "BF16": 2}


def unpack(data: bytes, name: str = "checkpoint file") -> SideFile:
    """Parse and check a file's bytes; CheckpointFileError names `name` and the problem.

    The header's fields are type-checked and the tensors' safetensors header is checked
    for consistency (`tensor_header`); whether the spec and shapes fit the base is the
    importer's check (before anything is allocated from them).
    """
    if not is_side_file(data):
        raise CheckpointFileError(f"{name}: not a pocketd side checkpoint file")
    payload, start, hlen = envelope(data, MAGIC, name, "side checkpoint file")
    h = json_header(payload, start, hlen, name)
    n_steps = field(h, "n_steps", int, name)
    if not 0 <= n_steps <= MAX_STEPS:
        raise CheckpointFileError(f"{name}: n_steps {n_steps} is out of range")
    torch_version = h.get("torch_version")
    tensors = bytes(payload[start + hlen :])
    tensor_header(tensors, name)
    return SideFile(sha256_hex(h.get("base_fingerprint"), f"{name}: base_fingerprint"), field(h, "spec", dict, name),
                    field(h, "estimator", dict, name), torch_version if isinstance(torch_version, str) else None,
                    n_steps, sha256_hex(h.get("sha256"), f"{name}: sha256"), tensors)


def tensor_header(tensors: bytes, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) from safetensors bytes, without loading any tensor.

    CheckpointFileError naming `name` unless the header is a JSON object of F32/BF16 tensors whose
    shapes and byte ranges agree, tile the data exactly, and lie inside it.
    """
    bad = f"{name}: the tensors are not valid safetensors"
    if len(tensors) < 8:
        raise CheckpointFileError(f"{bad} (too short)")
    (n,) = struct.unpack_from("<Q", tensors, 0)
    if n > min(len(tensors) - 8, MAX_HEADER_BYTES):
        raise CheckpointFileError(f"{bad} (header length {n} past the end)")
    try:
        meta = json.loads(tensors[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFileError(f"{bad} ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointFileError(f"{bad} (header is not an object)")
    meta.pop("__metadata__", None)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for key, info in meta.items():
        where = f"{name}: tensor {key[:60]!r}"
        if not isinstance(info, dict):
            raise CheckpointFileError(f"{where}: not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise CheckpointFileError(f"{where}: dtype {str(dtype)[:20]!r} (a side part is F32 or BF16)")
        if not (isinstance(shape, list) and len(shape) <= 4
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 32 for d in shape)):
            raise CheckpointFileError(f"{where}: bad shape {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointFileError(f"{where}: bad data_offsets")
        size = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.float64))
        if not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != size:
            raise CheckpointFileError(f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}")
        spans.append((offsets[0], offsets[1]))
        out[key] = (dtype, tuple(shape))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise CheckpointFileError(f"{bad} (tensor data overlaps or has gaps)")
        pos = end
    if pos != len(tensors) - 8 - n:
        raise CheckpointFileError(f"{bad} (the tensor data is {len(tensors) - 8 - n} bytes, the header "
                                  f"describes {pos})")
    return out
