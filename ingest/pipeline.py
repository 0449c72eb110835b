"""The library entry points: text in, documents and examples stored, a report out.

`ingest_paths` (files, folders, "-" for stdin) and `ingest_text` (one string, for the
control socket) check, normalize and split each document, then store it with its
examples in one transaction (`store.docs.add_document`). A rejected input stores
nothing; a store failure (disk full, a broken database) propagates, leaving every
document stored before it intact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pocketd.store import Store

from .config import IngestConfig
from .decode import check_size, check_text
from .errors import EmptyText, IngestError, InvalidUnicode, TooLarge
from .normalize import normalize
from .report import Added, Duplicate, IngestReport, Rejected, Skipped
from .sources import RawDocument, display_path, iter_inputs
from .split import split_examples

log = logging.getLogger(__name__)


def prepare(text: str, input_name: str, config: IngestConfig, *, decoded: bool = False) -> tuple[str, list[str]]:
    """Check and normalize one document's text and split it into examples; IngestError if unusable.

    `decoded`: the text came through `decode`, whose NUL and binary checks need not run again.
    """
    if not decoded:
        check_text(text, input_name)
    size = len(text.encode("utf-8"))
    check_size(size, input_name, config.max_document_bytes)
    normalized = normalize(text)
    if not normalized:
        raise EmptyText(input_name, whitespace_only=bool(text))
    # What is stored is the normalized text, which NFC can make up to 3x longer: check that too.
    stored = len(normalized.encode("utf-8"))
    if stored > config.max_document_bytes:
        raise TooLarge(input_name, stored, config.max_document_bytes, size_as_given=size)
    return normalized, split_examples(normalized, config.example_max_chars)


def store_document(store: Store, raw: RawDocument, config: IngestConfig) -> Added | Duplicate | Rejected:
    """Prepare and store one document (one transaction); the entry for the report."""
    try:
        text, examples = prepare(raw.text, raw.name, config, decoded=raw.decoded)
    except IngestError as e:
        log.info("rejected %s", e)
        return Rejected.from_error(e)
    try:
        result = store.docs.add_document(
            text,
            examples,
            source=raw.source,
            source_kind=raw.source_kind,
            origin=raw.origin,
            created_at=raw.created_at,
            meta=raw.meta,
            validation_percent=config.validation_percent,
        )
    except UnicodeEncodeError as e:
        # A lone surrogate in the source name, origin or metadata (the text was checked above), which
        # SQLite cannot store as UTF-8; the document's transaction was rolled back.
        bad = e.object[e.start : e.start + 1] if isinstance(e.object, str) else ""
        error = InvalidUnicode(raw.name, 0, bad or "\ud800", where="the source name, origin or metadata")
        log.info("rejected %s", error)
        return Rejected.from_error(error)
    if result.added:
        log.debug("added %s as document %d (%d examples)", raw.name, result.document_id, result.n_examples)
        return Added(raw.name, result.document_id, result.content_hash, result.n_examples)
    log.debug("%s is already stored as document %d", raw.name, result.document_id)
    return Duplicate(raw.name, result.document_id, result.content_hash)


def ingest_paths(
    store: Store,
    paths: Sequence[str | Path],
    config: IngestConfig,
    source: str | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdin_format: str = "text",
) -> IngestReport:
    """Ingest files and folders ("-" reads `stdin`, as plain text or "jsonl"); see ingest.sources for naming."""
    report = IngestReport()
    for item in iter_inputs(paths, config, source=source, stdin=stdin, stdin_format=stdin_format):
        if isinstance(item, RawDocument):
            report.add(store_document(store, item, config))
        else:
            if isinstance(item, Skipped):
                log.info("skipped %s: %s", item.input, item.reason)
            else:
                log.info("rejected %s: %s", item.input, item.reason)
            report.add(item)
    return report


def ingest_text(
    store: Store,
    text: str,
    source: str,
    config: IngestConfig,
    *,
    name: str | None = None,
    origin: str | None = None,
    created_at: str | None = None,
    meta: dict[str, Any] | None = None,
    source_kind: str = "text",
) -> IngestReport:
    """Ingest one string as one document of `source` (the control socket's `ingest` command)."""
    label = display_path(name or f"<{source}>")  # printable even if the source name is not valid Unicode
    raw = RawDocument(label, text, source, source_kind, origin or label, created_at, dict(meta or {}))
    report = IngestReport()
    report.add(store_document(store, raw, config))
    return report
