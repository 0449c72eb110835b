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

from .ckptfile import envelope
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


def unpack(data: bytes, name: str = "checkpoint file") -> SideFile:
    """Parse and check a file's bytes; CheckpointFileError names `name` and the problem."""
    if not is_side_file(data):
        raise CheckpointFileError(f"{name}: not a pocketd side checkpoint file")
    payload, start, hlen = envelope(data, MAGIC, name, "side checkpoint file")
    try:
        h = json.loads(payload[start : start + hlen].decode("utf-8"))
        return SideFile(str(h["base_fingerprint"]), dict(h["spec"]), dict(h["estimator"]), h.get("torch_version"),
                        int(h["n_steps"]), str(h["sha256"]), bytes(payload[start + hlen :]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFileError(f"{name}: damaged header ({e})") from e
