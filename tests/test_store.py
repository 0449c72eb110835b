"""The SQLite store: private files, migrations, corrupt files, documents and the transaction guarantee."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils.db

from pocketd.store import DatabaseUnreadable, DocumentNotFound, SourceNotFound, Store, content_hash


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def add(store: Store, text: str, examples: list[str] | None = None, source: str = "s") -> Any:
    return store.docs.add_document(text, examples or [text], source=source, source_kind="file")


def test_files_are_private(tmp_path: Path) -> None:
    db_path = tmp_path / "data" / "pocketd" / "pocketd.sqlite3"
    with Store.open(db_path) as store:
        add(store, "hello")
    assert mode(db_path.parent) == 0o700
    assert mode(db_path) == 0o600
    for side in db_path.parent.iterdir():  # -wal and -shm too, while they exist
        assert mode(side) & 0o077 == 0, side


def test_existing_loose_permissions_are_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir(mode=0o755)
    db_path = folder / "p.sqlite3"
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    folder.chmod(0o755)
    Store.open(db_path).close()
    assert (mode(folder), mode(db_path)) == (0o700, 0o600)


def test_wal_mode_and_migrations(tmp_path: Path) -> None:
    with Store.open(tmp_path / "p.sqlite3") as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = store.schema_version()
        assert versions and versions[0].startswith("m001")
    with Store.open(tmp_path / "p.sqlite3") as store:  # reopening applies nothing twice
        assert store.schema_version() == versions


def test_corrupt_file_is_unreadable_and_named(tmp_path: Path) -> None:
    bad = tmp_path / "pocketd.sqlite3"
    bad.write_bytes(b"this is not an SQLite database, just some bytes " * 20)
    with pytest.raises(DatabaseUnreadable) as info:
        Store.open(bad)
    assert str(bad) in str(info.value)
    assert "cannot open the database" in str(info.value)


def test_add_is_idempotent_by_content_hash() -> None:
    with Store.memory() as store:
        first = add(store, "same text", ["same text"])
        again = add(store, "same text", ["other split"])
        assert first.added and not again.added
        assert again.document_id == first.document_id
        assert first.content_hash == content_hash("same text")
        assert store.docs.stats().documents == 1
        assert [e.text for e in store.docs.examples()] == ["same text"]


def test_a_document_needs_examples() -> None:
    with Store.memory() as store, pytest.raises(ValueError):
        store.docs.add_document("x", [], source="s", source_kind="file")


def test_split_is_by_document_and_deterministic() -> None:
    with Store.memory() as store:
        for i in range(60):
            add(store, f"document {i}", [f"document {i} part a", f"document {i} part b"])
        for doc in store.docs.list(limit=100):
            assert {e.split for e in store.docs.examples(document_id=doc.id)} == {doc.split}
        stats = store.docs.stats()
        assert stats.train_examples + stats.validation_examples == stats.examples == 120
        assert 0 < stats.validation_examples < stats.train_examples


def test_failed_examples_insert_rolls_back_the_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db_path = tmp_path / "p.sqlite3"
    with Store.open(db_path) as store:
        add(store, "kept", ["kept"])
    real = sqlite_utils.db.Table.insert_all

    def crash(self: sqlite_utils.db.Table, records: Any, *args: Any, **kwargs: Any) -> Any:
        if self.name != "examples":
            return real(self, records, *args, **kwargs)

        def first_then_crash() -> Iterator[dict[str, Any]]:
            it = iter(records)
            yield next(it)
            raise RuntimeError("disk on fire")

        return real(self, first_then_crash(), *args, batch_size=1, **kwargs)

    monkeypatch.setattr(sqlite_utils.db.Table, "insert_all", crash)
    with Store.open(db_path) as store, pytest.raises(RuntimeError, match="disk on fire"):
        add(store, "lost", ["lost part 1", "lost part 2", "lost part 3"], source="new source")
    monkeypatch.undo()
    with Store.open(db_path) as store:
        assert [d.origin for d in store.docs.list()] == [None]
        assert [e.text for e in store.docs.examples()] == ["kept"]
        assert [s.name for s in store.docs.stats().sources] == ["s"]  # the new source row rolled back too


def test_find_by_id_and_hash_prefix() -> None:
    with Store.memory() as store:
        r = add(store, "findable")
        assert store.docs.find(r.document_id).id == r.document_id
        assert store.docs.find(r.content_hash[:8]).id == r.document_id
        with pytest.raises(DocumentNotFound, match="no such document"):
            store.docs.find(999)
        with pytest.raises(DocumentNotFound, match="hash prefix of 6"):
            store.docs.find("abc")


def test_by_source_and_delete() -> None:
    with Store.memory() as store:
        a = add(store, "a", source="one")
        add(store, "b", ["b1", "b2"], source="two")
        with pytest.raises(SourceNotFound, match="'three'"):
            store.docs.by_source("three")
        assert [d.id for d in store.docs.by_source("one")] == [a.document_id]
        assert store.docs.delete_documents([d.id for d in store.docs.by_source("two")]) == 1
        assert [e.text for e in store.docs.examples()] == ["a"]
