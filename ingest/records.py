"""JSON records: `{"text": ..., "source"?: ..., "time"?: ..., "meta"?: {...}}`.

Used by .jsonl files (one record per line) and .json files (one record, or a list
of records). Keys other than these four are kept in the document's metadata
(an explicit "meta" object wins on a clash), so exports with extra fields
(ids, titles, paths) ingest as they are.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import IngestError

log = logging.getLogger(__name__)

RECORD_KEYS = ("text", "source", "time", "meta")
# Metadata is stored as JSON text; deeper nesting than this is refused (JSON that deep is not metadata).
MAX_META_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Record:
    """A validated record: text not yet checked or normalized."""

    text: str
    source: str | None = None
    created_at: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def parse_time(value: Any) -> str | None:
    """A record's "time": ISO 8601 text or Unix seconds; returned as ISO 8601 (UTC if the zone is known).

    ValueError with a short reason if it is neither.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError('"time" must be ISO 8601 text or Unix seconds, got a boolean')
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f'"time" {value!r} is not a finite number')
        try:
            when = datetime.fromtimestamp(value, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f'"time" {value!r} is out of range') from None
        return when.isoformat(timespec="milliseconds")
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f'"time" {value!r} is not an ISO 8601 date or time') from None
        if when.tzinfo is not None:
            return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")
        return when.isoformat()
    raise ValueError(f'"time" must be ISO 8601 text or Unix seconds, got {_type_name(value)}')


def _lone_surrogate(text: str) -> str | None:
    bad = _SURROGATE.search(text)
    return None if bad is None else f"U+{ord(bad.group()):04X}"


def _check_meta(field_name: str, value: Any, error: Callable[[str], IngestError]) -> None:
    """Metadata must be storable: no lone surrogates (a "\\ud800" escape) and at most MAX_META_DEPTH levels."""
    stack = [(value, 1)]
    while stack:  # iterative: nesting must not overflow the stack here either
        v, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise error(f"{field_name} is nested more than {MAX_META_DEPTH} levels deep")
        strings: list[str] = []
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, dict):
            strings.extend(v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        for text in strings:
            bad = _lone_surrogate(text)
            if bad:
                raise error(f"{field_name} holds invalid Unicode: a lone surrogate {bad}")


def parse_record(obj: Any, error: Callable[[str], IngestError]) -> Record:
    """Validate one decoded JSON value as a record; raise `error(reason)` if it is not one."""
    if not isinstance(obj, dict):
        raise error(f"expected a JSON object with a \"text\" field, got {_type_name(obj)}")
    if "text" not in obj:
        raise error('the record has no "text" field')
    text = obj["text"]
    if not isinstance(text, str):
        raise error(f'"text" must be a string, got {_type_name(text)}')
    source = obj.get("source")
    if source is not None:
        if not isinstance(source, str):
            raise error(f'"source" must be a string, got {_type_name(source)}')
        if not source.strip():
            raise error('"source" is empty')
        bad = _lone_surrogate(source)
        if bad:
            raise error(f'"source" holds invalid Unicode: a lone surrogate {bad}')
        source = source.strip()
    try:
        created_at = parse_time(obj.get("time"))
    except ValueError as e:
        raise error(str(e)) from None
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise error(f'"meta" must be an object, got {_type_name(meta)}')
    merged = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    for key, value in merged.items():
        _check_meta(f"field {key!r}", {key: value}, error)
    if meta:
        _check_meta('"meta"', meta, error)
    merged.update(meta or {})
    return Record(text=text, source=source, created_at=created_at, meta=merged)
