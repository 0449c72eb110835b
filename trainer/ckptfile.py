"""A standalone checkpoint file: a JSON header and the packed steps of a whole chain. Pure: bytes in, bytes out.

Layout (little-endian):

    b"PKTDLOG1"                      magic + format version
    u32 header_len, header (UTF-8 JSON: base fingerprint, spec, torch version,
                            segments [{estimator, n_steps, n_perturbations, hashes}], ...)
    steps, for each segment, for each step:
        f32 lr, then n x (i64 seed, f32 grad)   -> 16 bytes for a single-perturbation step
    32 bytes: sha256 of everything before it

Each segment is one checkpoint of the chain, root first; importing recreates the chain.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from pocketd.store.log import StepRecord, f32

from .errors import CheckpointFileError

MAGIC = b"PKTDLOG1"


@dataclass
class Segment:
    estimator: dict[str, Any]
    steps: list[StepRecord]
    hashes: dict[int, str] = field(default_factory=dict)  # n_steps within the segment -> sha256


@dataclass
class CheckpointFile:
    base_fingerprint: str
    spec: dict[str, Any]
    method: str
    torch_version: str | None
    segments: list[Segment]

    @property
    def n_steps(self) -> int:
        return sum(len(s.steps) for s in self.segments)


def pack(ck: CheckpointFile) -> bytes:
    segs = []
    body = bytearray()
    for seg in ck.segments:
        n = len(seg.steps[0].seeds) if seg.steps else int(seg.estimator.get("n", 1))
        for rec in seg.steps:
            if len(rec.seeds) != n:
                raise CheckpointFileError(f"step {rec.step}: {len(rec.seeds)} perturbations, segment has {n}")
            if f32(rec.lr) != rec.lr:
                raise CheckpointFileError(f"step {rec.step}: learning rate {rec.lr!r} is not a float32 value")
            body += struct.pack("<f", rec.lr)
            for seed, grad in zip(rec.seeds, rec.grads):
                body += struct.pack("<qf", seed, grad)
        segs.append({"estimator": seg.estimator, "n_steps": len(seg.steps), "n": n,
                     "hashes": {str(k): v for k, v in seg.hashes.items()}})
    header = json.dumps(
        {"base_fingerprint": ck.base_fingerprint, "spec": ck.spec, "method": ck.method,
         "torch_version": ck.torch_version, "segments": segs},
        sort_keys=True,
    ).encode("utf-8")
    out = MAGIC + struct.pack("<I", len(header)) + header + bytes(body)
    return out + hashlib.sha256(out).digest()


def envelope(data: bytes, magic: bytes, name: str, kind: str) -> tuple[bytes, int, int]:
    """Check a file's magic (its first 4 bytes: pocketd, the rest: kind and version) and trailing
    sha256; return (payload without the checksum, header start, header length)."""
    if len(data) < len(magic) + 4 + 32 or not data.startswith(magic[:4]):
        raise CheckpointFileError(f"{name}: not a pocketd {kind}")
    if not data.startswith(magic):
        raise CheckpointFileError(f"{name}: unsupported {kind} version {data[4:8]!r}")
    payload, digest = data[:-32], data[-32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointFileError(f"{name}: checksum mismatch: the file is truncated or corrupt")
    (hlen,) = struct.unpack_from("<I", payload, len(magic))
    return payload, len(magic) + 4, hlen


def unpack(data: bytes, name: str = "checkpoint file") -> CheckpointFile:
    """Parse and check a file's bytes; CheckpointFileError names `name` and the problem."""
    payload, start, hlen = envelope(data, MAGIC, name, "checkpoint file")
    try:
        header = json.loads(payload[start : start + hlen].decode("utf-8"))
        pos = start + hlen
        segments = []
        for seg in header["segments"]:
            n, steps = int(seg["n"]), []
            for i in range(int(seg["n_steps"])):
                (lr,) = struct.unpack_from("<f", payload, pos)
                pos += 4
                pairs = [struct.unpack_from("<qf", payload, pos + 12 * j) for j in range(n)]
                pos += 12 * n
                steps.append(StepRecord(i, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), lr))
            segments.append(Segment(seg["estimator"], steps, {int(k): v for k, v in seg["hashes"].items()}))
        if pos != len(payload):
            raise CheckpointFileError(f"{name}: {len(payload) - pos} unexpected trailing bytes")
        return CheckpointFile(header["base_fingerprint"], header["spec"], header["method"],
                              header.get("torch_version"), segments)
    except (KeyError, TypeError, ValueError, struct.error) as e:
        raise CheckpointFileError(f"{name}: malformed checkpoint file: {e}") from None
