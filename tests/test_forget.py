"""Forgetting documents through the library: by id, hash prefix or source; nothing deleted on a bad name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pocketd.ingest.config import IngestConfig
from pocketd.ingest.forget import forget
from pocketd.ingest.pipeline import ingest_text
from pocketd.store import DocumentNotFound, SourceNotFound, Store


@pytest.fixture
def store() -> Iterator[Store]:
    with Store.memory() as s:
        config = IngestConfig()
        for i, source in enumerate(["phone", "phone", "laptop", "journal"]):
            ingest_text(s, f"note number {i}", source, config)
        yield s


def remaining(store: Store) -> list[str]:
    return [e.text for e in store.docs.examples()]


def test_forget_by_id(store: Store) -> None:
    result = forget(store, documents=["2"])
    assert result.document_ids == [2]
    assert remaining(store) == ["note number 0", "note number 2", "note number 3"]


def test_forget_by_hash_prefix(store: Store) -> None:
    doc = store.docs.find(3)
    result = forget(store, documents=[doc.content_hash[:10]])
    assert result.document_ids == [3]
    assert result.documents[0].source == "laptop"


def test_forget_by_source_and_mixed(store: Store) -> None:
    result = forget(store, documents=[4], sources=["phone"])
    assert result.document_ids == [1, 2, 4]
    assert remaining(store) == ["note number 2"]
    assert store.docs.stats().documents == 1


def test_forget_resolves_everything_before_deleting(store: Store) -> None:
    with pytest.raises(DocumentNotFound):
        forget(store, documents=["1", "99"])
    with pytest.raises(SourceNotFound):
        forget(store, documents=["1"], sources=["nowhere"])
    assert store.docs.stats().documents == 4


def test_forget_needs_a_target(store: Store) -> None:
    with pytest.raises(ValueError):
        forget(store)


def test_forget_twice_deletes_nothing_the_second_time(store: Store) -> None:
    assert forget(store, sources=["phone"]).document_ids == [1, 2]
    assert forget(store, sources=["phone"]).document_ids == []
