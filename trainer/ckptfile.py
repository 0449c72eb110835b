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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, overload

import numpy as np

from pocketd.store.log import StepRecord, f32

from .errors import CheckpointFileError

MAGIC = b"PKTDLOG1"


@dataclass
class Segment:
    estimator: dict[str, Any]
    steps: Sequence[StepRecord]  # a list when exported from the store, a PackedSteps view when read from a file
    hashes: dict[int, str] = dc_field(default_factory=dict)  # n_steps within the segment -> sha256


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


# Bounds on files from outside (checked before anything is allocated from their numbers).
MAX_HEADER_BYTES = 1 << 20  # a header lists segments and hashes: far below this
MAX_SEGMENTS = 10_000
MAX_PERTURBATIONS = 64  # the config's bound on n_perturbations
MAX_STEPS = 16_000_000  # per file: ~1 year of steps at 2 s/step
_HEX = frozenset("0123456789abcdef")


def envelope(data: bytes, magic: bytes, name: str, kind: str) -> tuple[memoryview, int, int]:
    """Check a file's magic (its first 4 bytes: pocketd, the rest: kind and version), trailing sha256 and
    header length; return (payload without the checksum, header start, header length)."""
    if len(data) < len(magic) + 4 + 32 or not data.startswith(magic[:4]):
        raise CheckpointFileError(f"{name}: not a pocketd {kind}")
    if not data.startswith(magic):
        raise CheckpointFileError(f"{name}: unsupported {kind} version {bytes(data[4:8])!r}")
    payload, digest = memoryview(data)[:-32], data[-32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointFileError(f"{name}: checksum mismatch: the file is truncated or corrupt")
    (hlen,) = struct.unpack_from("<I", payload, len(magic))
    start = len(magic) + 4
    if hlen > MAX_HEADER_BYTES or start + hlen > len(payload):
        raise CheckpointFileError(f"{name}: header length {hlen} is past the end of the file or over "
                                  f"{MAX_HEADER_BYTES} bytes")
    return payload, start, hlen


def json_header(payload: memoryview, start: int, hlen: int, name: str) -> dict[str, Any]:
    """The UTF-8 JSON object header; CheckpointFileError naming `name` if it is not one."""
    try:
        header = json.loads(bytes(payload[start : start + hlen]).decode("utf-8"),
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFileError(f"{name}: damaged header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{name}: damaged header (not a JSON object)")
    return header


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number a checkpoint file may hold")


def field(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """d[key] if it is of `kind` (a boolean is never taken for a number); CheckpointFileError naming `where`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    value = d.get(key)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointFileError(f"{where}: field {key!r} is missing or not a {_kind_name(kinds)}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join({dict: "object", list: "list", str: "string", int: "integer", float: "number",
                        type(None): "null", bool: "boolean"}.get(k, k.__name__) for k in kinds)


def sha256_hex(value: Any, where: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and set(value) <= _HEX):
        raise CheckpointFileError(f"{where}: {str(value)[:80]!r} is not a sha256 hex digest")
    return value


def step_dtype(n: int) -> np.dtype:
    """One packed step of n perturbations: f32 lr, then n x (i64 seed, f32 grad), little-endian, unaligned."""
    return np.dtype([("lr", "<f4"), ("pairs", [("seed", "<i8"), ("grad", "<f4")], (n,))])


class PackedSteps(Sequence[StepRecord]):
    """The steps of one segment as a read-only view of the file's bytes (no per-step objects until read)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> StepRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[StepRecord]: ...
    def __getitem__(self, i: int | slice) -> StepRecord | list[StepRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        row = self.rows[i]
        pairs = row["pairs"]
        return StepRecord(i, tuple(int(x) for x in pairs["seed"]), tuple(float(x) for x in pairs["grad"]),
                          float(row["lr"]))

    def __iter__(self) -> Iterator[StepRecord]:
        for i in range(len(self)):
            yield self[i]


def _segment(seg: Any, i: int, payload: memoryview, pos: int, name: str) -> tuple[Segment, int]:
    where = f"{name}: segment {i}"
    if not isinstance(seg, dict):
        raise CheckpointFileError(f"{where}: not an object")
    estimator = field(seg, "estimator", dict, where)
    n = field(seg, "n", int, where)
    n_steps = field(seg, "n_steps", int, where)
    if not 1 <= n <= MAX_PERTURBATIONS:
        raise CheckpointFileError(f"{where}: {n} perturbations per step (1..{MAX_PERTURBATIONS} allowed)")
    if not 0 <= n_steps <= MAX_STEPS:
        raise CheckpointFileError(f"{where}: {n_steps} steps (0..{MAX_STEPS} allowed)")
    dtype = step_dtype(n)
    if pos + n_steps * dtype.itemsize > len(payload):
        raise CheckpointFileError(f"{where}: its {n_steps} steps need {n_steps * dtype.itemsize} bytes, the file "
                                  f"holds {len(payload) - pos}")
    rows = np.frombuffer(payload, dtype=dtype, count=n_steps, offset=pos)
    bad = ~np.isfinite(rows["lr"]) | (rows["lr"] < 0) | ~np.isfinite(rows["pairs"]["grad"]).all(axis=1) \
        | (rows["pairs"]["seed"] < 0).any(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        raise CheckpointFileError(f"{where}: step {k} has a non-finite or negative learning rate, a non-finite "
                                  "gradient or a negative seed")
    raw_hashes = field(seg, "hashes", dict, where)
    hashes: dict[int, str] = {}
    for key, value in raw_hashes.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 9):
            raise CheckpointFileError(f"{where}: hash key {key[:20]!r} is not a step count")
        if int(key) > n_steps:
            raise CheckpointFileError(f"{where}: a hash at step {int(key)}, beyond its last step {n_steps}")
        hashes[int(key)] = sha256_hex(value, f"{where}, hash at step {key}")
    return Segment(estimator, PackedSteps(rows), hashes), pos + n_steps * dtype.itemsize


def unpack(data: bytes, name: str = "checkpoint file") -> CheckpointFile:
    """Parse and check a file's bytes; CheckpointFileError names `name` and the problem.

    Every count is checked against the bytes that are really there before anything is
    allocated from it; the steps stay a view of `data` (PackedSteps), with every learning
    rate and gradient finite. The spec and estimator are checked by the method (replay).
    """
    payload, start, hlen = envelope(data, MAGIC, name, "checkpoint file")
    header = json_header(payload, start, hlen, name)
    segs = field(header, "segments", list, name)
    if not 1 <= len(segs) <= MAX_SEGMENTS:
        raise CheckpointFileError(f"{name}: {len(segs)} segments (1..{MAX_SEGMENTS} allowed)")
    pos, segments = start + hlen, []
    for i, seg in enumerate(segs):
        segment, pos = _segment(seg, i, payload, pos, name)
        segments.append(segment)
    if pos != len(payload):
        raise CheckpointFileError(f"{name}: {len(payload) - pos} unexpected trailing bytes")
    if sum(len(s.steps) for s in segments) > MAX_STEPS:
        raise CheckpointFileError(f"{name}: more than {MAX_STEPS} steps")
    torch_version = header.get("torch_version")
    return CheckpointFile(sha256_hex(header.get("base_fingerprint"), f"{name}: base_fingerprint"),
                          field(header, "spec", dict, name), field(header, "method", str, name),
                          torch_version if isinstance(torch_version, str) else None, segments)
