"""The control socket's wire format: names, one JSON object per line, and socket addresses.

What both ends need to exchange bytes, and nothing more: the client (`pocketd status`) imports
this module and not `protocol` (whose request models load pydantic), so it starts at once.
`protocol` re-exports every name here; import them from there in daemon code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

SOCKET_NAME = "pocketd.sock"
LOCK_NAME = "pocketd.lock"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the NUL


def _default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    # A dataclass or a pydantic model can only exist once its module is loaded: look the modules up
    # instead of importing them (the client sends plain values and should not pay for either).
    dataclasses = sys.modules.get("dataclasses")
    if dataclasses is not None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(message: dict[str, Any]) -> bytes:
    """One message as a JSON line (NaN and infinities become null)."""
    text = json.dumps(message, default=_default, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(_finite(json.loads(text)), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def decode_reply(line: bytes) -> dict[str, Any]:
    """One reply line as an object with a boolean `ok`; ValueError (or a subclass) otherwise."""
    data = json.loads(line.decode("utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ValueError(f"not a pocketd reply: {line[:200]!r}")
    return data


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for bind/connect; long paths go through /proc/self/fd/N of the open directory.

    sun_path holds 107 bytes; pytest temp dirs and deep Termux prefixes can be longer.
    """
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_UNIX_PATH:
        yield text
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(short)) > MAX_UNIX_PATH:
            raise OSError(f"socket name too long: {path.name}")
        yield short
    finally:
        os.close(fd)
