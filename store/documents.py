"""Documents and their training examples: the typed API the rest of pocketd uses."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlite_utils import Database

from .clock import utcnow
from .errors import DocumentNotFound, DocumentsInTraining, SourceNotFound

log = logging.getLogger(__name__)

Split = Literal["train", "validation"]


def content_hash(text: str) -> str:
    """sha256 of the (already normalized) text, hex: the document's identity."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_for(hash_hex: str, validation_percent: int) -> Split:
    """Deterministic train/validation split of a whole document by its content hash."""
    bucket = int(hash_hex[:8], 16) % 100
    return "validation" if bucket < validation_percent else "train"


@dataclass(frozen=True)
class Document:
    id: int
    content_hash: str
    source: str
    origin: str | None
    created_at: str | None
    ingested_at: str
    n_bytes: int
    n_chars: int
    split: Split
    meta: dict[str, Any]
    n_examples: int


@dataclass(frozen=True)
class Example:
    id: int
    document_id: int
    ordinal: int
    text: str
    split: Split
    trained_count: int


@dataclass(frozen=True)
class AddResult:
    """What `add_document` did: `added` is False when the text was already stored."""

    document_id: int
    content_hash: str
    added: bool
    n_examples: int


@dataclass(frozen=True)
class SourceStats:
    name: str
    kind: str
    documents: int
    examples: int
    chars: int


@dataclass(frozen=True)
class DataCounts:
    """How much data the store holds: what `status` shows."""

    documents: int
    examples: int
    untrained_examples: int  # training-split examples no step has used yet


@dataclass(frozen=True)
class Stats:
    documents: int
    examples: int
    chars: int
    train_examples: int
    validation_examples: int
    untrained_examples: int
    sources: list[SourceStats] = field(default_factory=list)


class Documents:
    """Documents and examples. Every write is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes ---------------------------------------------------------------

    def add_document(
        self,
        text: str,
        examples: Sequence[str],
        *,
        source: str,
        source_kind: str,
        origin: str | None = None,
        created_at: str | None = None,
        meta: dict[str, Any] | None = None,
        validation_percent: int = 10,
    ) -> AddResult:
        """Store one normalized document with its examples, atomically; a no-op if its hash is known."""
        if not examples:
            raise ValueError("a document needs at least one example")
        digest = content_hash(text)
        existing = self.db.execute(
            "select id, (select count(*) from examples where document_id = documents.id) "
            "from documents where content_hash = ?",
            [digest],
        ).fetchone()
        if existing:
            return AddResult(existing[0], digest, False, existing[1])
        split = split_for(digest, validation_percent)
        try:
            return self._insert(text, examples, digest, split, source, source_kind, origin, created_at, meta)
        except sqlite3.IntegrityError:
            # Another process stored the same text between our lookup and insert.
            row = self.db.execute("select id from documents where content_hash = ?", [digest]).fetchone()
            if row is None:
                raise
            return AddResult(int(row[0]), digest, False, len(examples))

    def _insert(
        self, text: str, examples: Sequence[str], digest: str, split: Split, source: str,
        source_kind: str, origin: str | None, created_at: str | None, meta: dict[str, Any] | None,
    ) -> AddResult:
        with self.db.atomic():
            source_id = self._source_id(source, source_kind)
            doc_id = self.db["documents"].insert(
                {
                    "content_hash": digest,
                    "source_id": source_id,
                    "origin": origin,
                    "created_at": created_at,
                    "ingested_at": utcnow(),
                    "n_bytes": len(text.encode("utf-8")),
                    "n_chars": len(text),
                    "split": split,
                    "meta": json.dumps(meta or {}, ensure_ascii=False, sort_keys=True),
                }
            ).last_pk
            self.db["examples"].insert_all(
                {
                    "document_id": doc_id,
                    "ordinal": i,
                    "text": ex,
                    "n_chars": len(ex),
                    "split": split,
                    "trained_count": 0,
                }
                for i, ex in enumerate(examples)
            )
        return AddResult(int(doc_id), digest, True, len(examples))

    def _source_id(self, name: str, kind: str) -> int:
        row = self.db.execute("select id from sources where name = ?", [name]).fetchone()
        if row:
            return int(row[0])
        return int(
            self.db["sources"].insert({"name": name, "kind": kind, "created_at": utcnow()}).last_pk
        )

    def delete_documents(self, document_ids: Sequence[int]) -> int:
        """Delete documents and their examples (and cached tokens) in one transaction; return how many.

        DocumentsInTraining (nothing deleted) while steps of the training log name any of them: the
        forget use case (pocketd.daemon.forgetting) drops those steps first, in the same transaction.
        """
        ids = list(document_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self.db.atomic():
            used = sorted(d for (d,) in self.db.execute(
                f"select distinct document_id from step_documents where document_id in ({marks})", ids))
            if used:
                raise DocumentsInTraining(
                    f"document {', '.join(map(str, used[:10]))}{', ...' if len(used) > 10 else ''}: training "
                    "steps still use it; `pocketd forget` drops those steps together with the documents")
            self.db.execute(
                f"delete from token_cache where example_id in "
                f"(select id from examples where document_id in ({marks}))",
                ids,
            )
            self.db.execute(f"delete from examples where document_id in ({marks})", ids)
            n = self.db.execute(f"delete from documents where id in ({marks})", ids).rowcount
        return int(n)

    def mark_trained(self, example_ids: Sequence[int]) -> None:
        """Count one more training use of each example."""
        with self.db.atomic():
            self.db.conn.executemany(
                "update examples set trained_count = trained_count + 1 where id = ?",
                [(i,) for i in example_ids],
            )

    def mark_untrained(self, document_ids: Sequence[int]) -> int:
        """Reset the training count of every example of these documents (their training was dropped);
        returns how many examples were reset."""
        ids = sorted(set(document_ids))
        n = 0
        with self.db.atomic():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                cur = self.db.execute(
                    f"update examples set trained_count = 0 where trained_count > 0 and document_id in "
                    f"({','.join('?' * len(chunk))})", chunk)
                n += cur.rowcount
        return n

    # -- reads ----------------------------------------------------------------

    def find(self, ref: str | int) -> Document:
        """A document by integer id or by a unique prefix (>= 6 hex digits) of its content hash."""
        text = str(ref).strip()
        if text.isdigit():
            rows = self._documents("d.id = ?", [int(text)])
        elif len(text) >= 6 and all(c in "0123456789abcdef" for c in text.lower()):
            rows = self._documents("d.content_hash like ?", [text.lower() + "%"])
            if len(rows) > 1:
                raise DocumentNotFound(f"document {text!r}: hash prefix matches {len(rows)} documents")
        else:
            raise DocumentNotFound(f"document {text!r}: give an integer id or a hash prefix of 6+ hex digits")
        if not rows:
            raise DocumentNotFound(f"document {text!r}: no such document")
        return rows[0]

    def by_source(self, name: str) -> list[Document]:
        """Every document of a source; SourceNotFound if the source is unknown."""
        if not self.db.execute("select 1 from sources where name = ?", [name]).fetchone():
            raise SourceNotFound(f"source {name!r}: no such source")
        return self._documents("s.name = ?", [name])

    def list(self, limit: int = 100) -> list[Document]:
        return self._documents("1", [], limit=limit)

    def _documents(self, where: str, params: list[Any], limit: int = -1) -> list[Document]:
        sql = (
            "select d.id, d.content_hash, s.name, d.origin, d.created_at, d.ingested_at, "
            "d.n_bytes, d.n_chars, d.split, d.meta, "
            "(select count(*) from examples e where e.document_id = d.id) "
            "from documents d join sources s on s.id = d.source_id "
            f"where {where} order by d.id limit ?"
        )
        return [
            Document(
                id=r[0], content_hash=r[1], source=r[2], origin=r[3], created_at=r[4],
                ingested_at=r[5], n_bytes=r[6], n_chars=r[7], split=r[8],
                meta=json.loads(r[9] or "{}"), n_examples=r[10],
            )
            for r in self.db.execute(sql, [*params, limit]).fetchall()
        ]

    def examples(self, split: Split | None = None, document_id: int | None = None) -> Iterator[Example]:
        """Examples in id order, optionally of one split or one document."""
        clauses, params = [], []
        if split is not None:
            clauses.append("split = ?")
            params.append(split)
        if document_id is not None:
            clauses.append("document_id = ?")
            params.append(document_id)
        where = " and ".join(clauses) or "1"
        cur = self.db.execute(
            f"select id, document_id, ordinal, text, split, trained_count from examples "
            f"where {where} order by id",
            params,
        )
        for r in cur:
            yield Example(*r)

    def example_ids(self, split: Split) -> list[int]:
        return [r[0] for r in self.db.execute("select id from examples where split = ? order by id", [split])]

    def example_texts(self, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk_start in range(0, len(ids), 500):
            chunk = list(ids[chunk_start : chunk_start + 500])
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"select id, text from examples where id in ({marks})", chunk):
                out[r[0]] = r[1]
        return out

    def document_ids_of_examples(self, ids: Sequence[int]) -> dict[int, int]:
        """example id -> document id."""
        out: dict[int, int] = {}
        for chunk_start in range(0, len(ids), 500):
            chunk = list(ids[chunk_start : chunk_start + 500])
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"select id, document_id from examples where id in ({marks})", chunk):
                out[r[0]] = r[1]
        return out

    def trained_counts(self, split: Split = "train") -> dict[int, int]:
        """example id -> how many training steps used it."""
        return dict(self.db.execute("select id, trained_count from examples where split = ?", [split]).fetchall())

    def count_untrained(self) -> int:
        return int(
            self.db.execute("select count(*) from examples where split = 'train' and trained_count = 0").fetchone()[0]
        )

    def counts(self) -> DataCounts:
        """Documents, examples (both splits) and untrained training examples, in one read transaction."""
        row = self.db.execute(
            "select (select count(*) from documents), (select count(*) from examples), "
            "(select count(*) from examples where split = 'train' and trained_count = 0)"
        ).fetchone()
        return DataCounts(documents=int(row[0]), examples=int(row[1]), untrained_examples=int(row[2]))

    def stats(self) -> Stats:
        q = self.db.execute
        documents, chars = q("select count(*), coalesce(sum(n_chars), 0) from documents").fetchone()
        per_split = dict(q("select split, count(*) from examples group by split").fetchall())
        sources = [
            SourceStats(*r)
            for r in q(
                "select s.name, s.kind, count(distinct d.id), count(e.id), "
                "coalesce((select sum(n_chars) from documents d2 where d2.source_id = s.id), 0) "
                "from sources s left join documents d on d.source_id = s.id "
                "left join examples e on e.document_id = d.id group by s.id order by s.name"
            ).fetchall()
        ]
        return Stats(
            documents=int(documents),
            examples=sum(per_split.values()),
            chars=int(chars),
            train_examples=int(per_split.get("train", 0)),
            validation_examples=int(per_split.get("validation", 0)),
            untrained_examples=self.count_untrained(),
            sources=sources,
        )

    # -- token cache (used by the trainer) --------------------------------------

    def cached_tokens(self, tokenizer: str, example_ids: Sequence[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for chunk_start in range(0, len(example_ids), 500):
            chunk = list(example_ids[chunk_start : chunk_start + 500])
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(
                f"select example_id, ids from token_cache where tokenizer = ? and example_id in ({marks})",
                [tokenizer, *chunk],
            ):
                out[r[0]] = r[1]
        return out

    def cache_tokens(self, tokenizer: str, ids_by_example: dict[int, bytes]) -> None:
        with self.db.atomic():
            self.db["token_cache"].upsert_all(
                ({"example_id": k, "tokenizer": tokenizer, "ids": v} for k, v in ids_by_example.items()),
                pk=("example_id", "tokenizer"),
            )
