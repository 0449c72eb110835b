"""Sources (files, folders, stdin, JSONL, JSON), naming, dedup and the one-document-one-transaction rule."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils.db

from pocketd.ingest.config import IngestConfig
from pocketd.ingest.pipeline import ingest_paths, ingest_text
from pocketd.ingest.report import IngestReport
from pocketd.store import Store


@pytest.fixture
def store() -> Iterator[Store]:
    with Store.memory() as s:
        yield s


@pytest.fixture
def config() -> IngestConfig:
    return IngestConfig(example_max_chars=200)


def texts(store: Store) -> list[str]:
    """Every stored document's text, rebuilt from its examples (joined as the splitter joined them)."""
    out = []
    for doc in store.docs.list(limit=1000):
        out.append("\n\n".join(e.text for e in store.docs.examples(document_id=doc.id)))
    return sorted(out)


def reasons(report: IngestReport) -> dict[str, str]:
    return {r.input: r.reason for r in report.rejected}


def kinds(report: IngestReport) -> dict[str, str]:
    return {r.input: r.kind for r in report.rejected}


def jsonl(*records: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# -- the acceptance case ---------------------------------------------------


def test_mixed_folder_stores_exactly_the_good_documents(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    notes = tmp_path / "notes"
    (notes / "trips").mkdir(parents=True)
    (notes / "garden.md").write_text("# Garden\n\nTomatoes in March.\n", encoding="utf-8")
    (notes / "trips" / "hut.txt").write_text("Pack the head torch.\r\n", encoding="utf-8")
    (notes / "copy-of-garden.txt").write_text("# Garden\r\n\r\nTomatoes in March.   \r\n", encoding="utf-8")
    (notes / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (notes / "latin1.txt").write_bytes("Caf\u00e9 notes".encode("latin-1"))
    (notes / "empty.md").write_bytes(b"")
    (notes / "journal.jsonl").write_text(
        jsonl({"text": "Rode to work."}, '{"text": "missing brace"', {"text": "Long run, 10 km.", "time": 1700000000}),
        encoding="utf-8",
    )
    (notes / "picture.jpg").write_bytes(b"\xff\xd8\xff")
    (notes / ".secret.txt").write_text("hidden", encoding="utf-8")

    report = ingest_paths(store, [notes], config)

    assert texts(store) == sorted(
        ["# Garden\n\nTomatoes in March.", "Pack the head torch.", "Rode to work.", "Long run, 10 km."]
    )
    assert len(report.added) == 4
    assert [d.input for d in report.duplicates] == [str(notes / "garden.md")]  # garden.md comes after copy-of
    assert kinds(report) == {
        str(notes / "photo.txt"): "BinaryInput",
        str(notes / "latin1.txt"): "InvalidUtf8",
        str(notes / "empty.md"): "EmptyText",
        f"{notes / 'journal.jsonl'}:2": "BadJsonlLine",
    }
    assert reasons(report)[str(notes / "latin1.txt")] == "invalid UTF-8 at byte offset 3 (e9)"
    assert reasons(report)[str(notes / "photo.txt")].startswith("binary data, not text (NUL byte at offset 8")
    assert reasons(report)[str(notes / "empty.md")] == "empty, no text"
    assert "not valid JSON" in reasons(report)[f"{notes / 'journal.jsonl'}:2"]
    assert {s.input: s.reason for s in report.skipped} == {
        str(notes / ".secret.txt"): "hidden",
        str(notes / "picture.jpg"): "extension .jpg is not in ingest.extensions",
    }

    again = ingest_paths(store, [notes], config)
    assert again.added == []
    assert len(again.duplicates) == 5
    assert store.docs.stats().documents == 4


# -- files and folders --------------------------------------------------------------


def test_folder_naming_origin_and_mtime(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    f = folder / "a.txt"
    f.write_text("alpha", encoding="utf-8")
    os.utime(f, (1_600_000_000, 1_600_000_000))
    ingest_paths(store, [folder], config)
    (doc,) = store.docs.list()
    assert doc.source == str(folder.absolute())
    assert doc.origin == str(f.absolute())
    assert doc.created_at == datetime.fromtimestamp(1_600_000_000, tz=timezone.utc).isoformat(timespec="milliseconds")
    assert store.docs.stats().sources[0].kind == "folder"


def test_file_source_is_its_path_and_source_option_overrides(
    tmp_path: Path, store: Store, config: IngestConfig
) -> None:
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text("alpha", encoding="utf-8")
    b.write_text("beta", encoding="utf-8")
    ingest_paths(store, [a], config)
    ingest_paths(store, [b], config, source="phone notes")
    by_origin = {d.origin: d.source for d in store.docs.list()}
    assert by_origin == {str(a.absolute()): str(a.absolute()), str(b.absolute()): "phone notes"}


def test_relative_paths_are_named_as_given(tmp_path: Path, store: Store, config: IngestConfig,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "bad.txt").write_bytes(b"\xc3")
    monkeypatch.chdir(tmp_path)
    report = ingest_paths(store, ["n"], config)
    assert reasons(report) == {os.path.join("n", "bad.txt"): "invalid UTF-8 at byte offset 0 (c3)"}


def test_nested_folders_in_name_order(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    for rel in ["b/2.txt", "a/z.txt", "a/deeper/1.md", "c.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel, encoding="utf-8")
    report = ingest_paths(store, [tmp_path], config)
    names = [Path(a.input).relative_to(tmp_path).as_posix() for a in report.added]
    assert names == ["c.txt", "a/z.txt", "a/deeper/1.md", "b/2.txt"]


def test_oversize_file_is_rejected_whole(tmp_path: Path, store: Store) -> None:
    config = IngestConfig(max_document_bytes=100)
    (tmp_path / "big.txt").write_text("word " * 100, encoding="utf-8")
    (tmp_path / "small.txt").write_text("small", encoding="utf-8")
    report = ingest_paths(store, [tmp_path], config)
    assert kinds(report) == {str(tmp_path / "big.txt"): "TooLarge"}
    assert "500 bytes, the limit is 100 bytes (ingest.max_document_bytes)" in reasons(report)[str(tmp_path / "big.txt")]
    assert texts(store) == ["small"]


def test_whitespace_only_file(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    (tmp_path / "blank.txt").write_text(" \r\n\t\n   \n", encoding="utf-8")
    report = ingest_paths(store, [tmp_path / "blank.txt"], config)
    assert reasons(report) == {str(tmp_path / "blank.txt"): "only whitespace, no text"}
    assert store.docs.stats().documents == 0


def test_missing_path_and_unsupported_file_given_by_name(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    (tmp_path / "slides.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    report = ingest_paths(store, [tmp_path / "nope.txt", tmp_path / "slides.pdf", tmp_path / "ok.txt"], config)
    assert kinds(report) == {str(tmp_path / "nope.txt"): "PathNotFound", str(tmp_path / "slides.pdf"): "UnsupportedFile"}
    assert reasons(report)[str(tmp_path / "nope.txt")] == "no such file or folder"
    assert "unsupported file type .pdf" in reasons(report)[str(tmp_path / "slides.pdf")]
    assert texts(store) == ["fine"]


def test_configured_extensions_are_read_as_text(tmp_path: Path, store: Store) -> None:
    (tmp_path / "todo.org").write_text("* TODO plant garlic", encoding="utf-8")
    (tmp_path / "a.md").write_text("markdown", encoding="utf-8")
    report = ingest_paths(store, [tmp_path], IngestConfig(extensions=["org"]))
    assert texts(store) == ["* TODO plant garlic"]
    assert [s.input for s in report.skipped] == [str(tmp_path / "a.md")]


def test_a_folder_named_like_a_file_is_walked_not_read(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    odd = tmp_path / "notes.txt"
    odd.mkdir()
    (odd / "inside.md").write_text("inside", encoding="utf-8")
    report = ingest_paths(store, [odd], config)
    assert report.ok
    assert texts(store) == ["inside"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_not_read(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # reading it would block forever
    report = ingest_paths(store, [fifo], config)
    assert kinds(report) == {str(fifo): "NotAFile"}
    assert reasons(report)[str(fifo)] == "not a regular file (a named pipe)"
    report = ingest_paths(store, [tmp_path], config)
    assert report.ok
    assert [s.reason for s in report.skipped] == ["not a regular file (a named pipe)"]


def test_hidden_entries_are_skipped(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("git internals", encoding="utf-8")
    (tmp_path / ".draft.md").write_text("draft", encoding="utf-8")
    (tmp_path / "visible.md").write_text("visible", encoding="utf-8")
    report = ingest_paths(store, [tmp_path], config)
    assert texts(store) == ["visible"]
    assert sorted(s.input for s in report.skipped) == [str(tmp_path / ".draft.md"), str(tmp_path / ".git")]


def test_symlink_loops_are_safe_and_linked_files_read(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "note.txt").write_text("note", encoding="utf-8")
    (root / "sub" / "up").symlink_to(root)  # a loop
    (root / "alias").symlink_to(root / "sub")  # the same folder twice
    (root / "link.md").symlink_to(tmp_path / "elsewhere.md")
    (tmp_path / "elsewhere.md").write_text("linked", encoding="utf-8")
    (root / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    report = ingest_paths(store, [root], config)
    assert texts(store) == ["linked", "note"]
    skipped = {Path(s.input).name: s.reason for s in report.skipped}
    assert skipped["dangling.txt"] == "broken symbolic link"
    assert "already visited" in skipped["up"]
    # "alias" comes first in name order, so the real "sub" is the repeat.
    assert "already visited" in skipped["sub"] and "alias" not in skipped
    assert report.ok


def test_duplicates_after_normalization(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    (tmp_path / "a.txt").write_text("Caf\u00e9\nline  \n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("\r\nCafe\u0301\r\nline\r\n\r\n".encode())
    report = ingest_paths(store, [tmp_path], config)
    assert len(report.added) == 1 and len(report.duplicates) == 1
    assert report.duplicates[0].document_id == report.added[0].document_id


def test_long_document_becomes_several_examples(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    paragraphs = [f"Paragraph {i}: " + "some words here " * 5 for i in range(20)]
    (tmp_path / "long.md").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (added,) = ingest_paths(store, [tmp_path / "long.md"], config).added
    examples = list(store.docs.examples(document_id=added.document_id))
    assert added.n_examples == len(examples) > 1
    assert [e.ordinal for e in examples] == list(range(len(examples)))
    assert all(len(e.text) <= 200 for e in examples)


# -- JSONL and JSON records -------------------------------------------------------


def test_jsonl_bad_lines_report_line_numbers_and_do_not_stop_good_ones(
    tmp_path: Path, store: Store, config: IngestConfig
) -> None:
    f = tmp_path / "export.jsonl"
    lines = [
        json.dumps({"text": "one"}),
        "{not json",
        "",
        json.dumps({"text": "four"}),
        json.dumps(["text", "a list"]),
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 5}),
        json.dumps({"text": "bad time", "time": "next tuesday"}),
        json.dumps({"text": "bad meta", "meta": [1]}),
        json.dumps({"text": "bad source", "source": ""}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "nul \u0000 inside"}),
        '{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "fourteen"}),
    ]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = ingest_paths(store, [f], config)
    assert texts(store) == ["four", "fourteen", "one"]
    got = reasons(report)
    name = str(f)
    assert got == {
        f"{name}:2": got[f"{name}:2"],
        f"{name}:5": 'bad JSONL line: expected a JSON object with a "text" field, got a list',
        f"{name}:6": 'bad JSONL line: the record has no "text" field',
        f"{name}:7": 'bad JSONL line: "text" must be a string, got a number',
        f"{name}:8": "bad JSONL line: \"time\" 'next tuesday' is not an ISO 8601 date or time",
        f"{name}:9": 'bad JSONL line: "meta" must be an object, got a list',
        f"{name}:10": 'bad JSONL line: "source" is empty',
        f"{name}:11": "only whitespace, no text",
        f"{name}:12": "binary data, not text (NUL character at index 4)",
        f"{name}:13": "invalid Unicode: lone surrogate U+D800 at character 5",
    }
    assert got[f"{name}:2"].startswith("bad JSONL line: not valid JSON: ")
    assert kinds(report)[f"{name}:2"] == "BadJsonlLine"


def test_jsonl_invalid_utf8_names_the_line_and_the_file_offset(
    tmp_path: Path, store: Store, config: IngestConfig
) -> None:
    f = tmp_path / "x.jsonl"
    first = b'{"text": "ok"}\n'
    f.write_bytes(first + b'{"text": "caf\xe9"}\n' + b'{"text": "after"}\n')
    report = ingest_paths(store, [f], config)
    assert reasons(report) == {f"{f}:2": f"invalid UTF-8 at byte offset {len(first) + 13} (e9)"}
    assert texts(store) == ["after", "ok"]


def test_jsonl_record_fields(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    f = tmp_path / "j.jsonl"
    f.write_text(
        jsonl(
            {"text": "a", "source": "journal", "time": "2024-03-24T18:30:00+01:00", "meta": {"mood": "ok"}},
            {"text": "b", "time": 0, "id": 7, "meta": {"id": 8}},
            {"text": "c", "time": "2024-03-24"},
        ),
        encoding="utf-8",
    )
    ingest_paths(store, [f], config)
    docs = {d.origin.rsplit(":", 1)[1]: d for d in store.docs.list()}
    assert docs["1"].source == "journal"
    assert docs["1"].created_at == "2024-03-24T17:30:00.000+00:00"
    assert docs["1"].meta == {"mood": "ok"}
    assert docs["2"].source == str(f.absolute())
    assert docs["2"].created_at == "1970-01-01T00:00:00.000+00:00"
    assert docs["2"].meta == {"id": 8}  # an explicit meta wins over an extra key of the same name
    assert docs["3"].created_at == "2024-03-24T00:00:00"
    assert {s.name: s.kind for s in store.docs.stats().sources} == {"journal": "jsonl", str(f.absolute()): "file"}


def test_source_option_beats_the_records_source(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    f = tmp_path / "j.jsonl"
    f.write_text(jsonl({"text": "a", "source": "journal"}), encoding="utf-8")
    ingest_paths(store, [f], config, source="mine")
    assert [d.source for d in store.docs.list()] == ["mine"]


def test_jsonl_record_over_the_limit_and_overlong_line(tmp_path: Path, store: Store) -> None:
    config = IngestConfig(max_document_bytes=50)
    f = tmp_path / "j.jsonl"
    overlong = json.dumps({"text": "y" * 400_000})  # longer than the line limit (6 x 50 + 64 KiB)
    f.write_text(jsonl({"text": "x" * 60}, overlong, {"text": "fits"}), encoding="utf-8")
    report = ingest_paths(store, [f], config)
    assert kinds(report) == {f"{f}:1": "TooLarge", f"{f}:2": "TooLarge"}
    assert "60 bytes" in reasons(report)[f"{f}:1"]
    assert "the limit is 50 bytes (ingest.max_document_bytes)" in reasons(report)[f"{f}:2"]
    assert texts(store) == ["fits"]


def test_jsonl_file_itself_has_no_size_limit(tmp_path: Path, store: Store) -> None:
    config = IngestConfig(max_document_bytes=100)
    f = tmp_path / "j.jsonl"
    f.write_text(jsonl(*({"text": f"record number {i}"} for i in range(50))), encoding="utf-8")
    assert f.stat().st_size > 100
    report = ingest_paths(store, [f], config)
    assert len(report.added) == 50 and report.ok


def test_json_single_record_and_list(tmp_path: Path, store: Store, config: IngestConfig) -> None:
    (tmp_path / "one.json").write_text(json.dumps({"text": "single", "source": "s"}), encoding="utf-8")
    (tmp_path / "many.json").write_text(
        json.dumps([{"text": "first"}, {"nope": 1}, {"text": "third", "time": "2020-01-01T00:00:00Z"}]),
        encoding="utf-8",
    )
    report = ingest_paths(store, [tmp_path], config)
    assert texts(store) == ["first", "single", "third"]
    assert reasons(report) == {f"{tmp_path / 'many.json'}#2": 'the record has no "text" field'}
    assert {d.origin for d in store.docs.list()} == {
        str(tmp_path / "one.json"), f"{tmp_path / 'many.json'}#1", f"{tmp_path / 'many.json'}#3"
    }


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"text": ', "not valid JSON: Expecting value (line 1, column 10)"),
        ('"just a string"', "expected a record object or a list of records"),
        ("[]", "an empty list: no records"),
    ],
)
def test_bad_json_files(tmp_path: Path, store: Store, config: IngestConfig, content: str, reason: str) -> None:
    f = tmp_path / "x.json"
    f.write_text(content, encoding="utf-8")
    report = ingest_paths(store, [f], config)
    assert reasons(report) == {str(f): reason}
    assert kinds(report) == {str(f): "BadJson"}


# -- stdin and strings ------------------------------------------------------------


def test_stdin_text(store: Store, config: IngestConfig) -> None:
    report = ingest_paths(store, ["-"], config, stdin=io.BytesIO("from a pipe\r\n".encode()))
    assert [a.input for a in report.added] == ["<stdin>"]
    (doc,) = store.docs.list()
    assert (doc.source, doc.origin) == ("stdin", "<stdin>")


def test_stdin_jsonl_and_oversize(store: Store) -> None:
    config = IngestConfig(max_document_bytes=20)
    report = ingest_paths(store, ["-"], config, stdin=io.BytesIO(jsonl({"text": "a"}, "{", {"text": "b"}).encode()),
                          stdin_format="jsonl")
    assert len(report.added) == 2 and list(reasons(report)) == ["<stdin>:2"]
    report = ingest_paths(store, ["-"], config, stdin=io.BytesIO(b"x" * 21))
    assert kinds(report) == {"<stdin>": "TooLarge"}


def test_stdin_binary_and_invalid(store: Store, config: IngestConfig) -> None:
    report = ingest_paths(store, ["-"], config, stdin=io.BytesIO(b"\x00\x01"))
    assert kinds(report) == {"<stdin>": "BinaryInput"}
    report = ingest_paths(store, ["-"], config, stdin=io.BytesIO(b"ok\x80"))
    assert reasons(report) == {"<stdin>": "invalid UTF-8 at byte offset 2 (80)"}
    assert store.docs.stats().documents == 0


def test_ingest_text(store: Store, config: IngestConfig) -> None:
    first = ingest_text(store, "Sent from the phone.\r\n", "phone", config, meta={"app": "share"})
    assert len(first.added) == 1
    again = ingest_text(store, "Sent from the phone.", "phone", config)
    assert again.duplicates[0].document_id == first.added[0].document_id
    bad = ingest_text(store, "  \n ", "phone", config, name="socket request 3")
    assert reasons(bad) == {"socket request 3": "only whitespace, no text"}
    (doc,) = store.docs.list()
    assert (doc.source, doc.meta) == ("phone", {"app": "share"})
    assert store.docs.stats().sources[0].kind == "text"


# -- one document, one transaction ---------------------------------------------------


def test_failure_mid_document_stores_nothing_of_it(
    tmp_path: Path, config: IngestConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "1.md").write_text("first document", encoding="utf-8")
    (folder / "2.md").write_text("\n\n".join(f"para {i} " + "w " * 40 for i in range(10)), encoding="utf-8")
    (folder / "3.md").write_text("third document", encoding="utf-8")

    real_insert_all = sqlite_utils.db.Table.insert_all
    calls = {"n": 0}

    def crash_during_second_document(self: sqlite_utils.db.Table, records: Any, *args: Any, **kwargs: Any) -> Any:
        if self.name == "examples":
            calls["n"] += 1
            if calls["n"] == 2:

                def some_then_crash() -> Iterator[dict[str, Any]]:
                    it = iter(records)
                    yield next(it)
                    yield next(it)
                    raise OSError("simulated crash while writing examples")

                return real_insert_all(self, some_then_crash(), *args, batch_size=1, **kwargs)
        return real_insert_all(self, records, *args, **kwargs)

    monkeypatch.setattr(sqlite_utils.db.Table, "insert_all", crash_during_second_document)
    db_path = tmp_path / "data" / "pocketd.sqlite3"
    with Store.open(db_path) as store:
        with pytest.raises(OSError, match="simulated crash"):
            ingest_paths(store, [folder], config)
    monkeypatch.undo()

    with Store.open(db_path) as store:  # what is on disk after the "crash"
        docs = store.docs.list()
        assert [Path(d.origin).name for d in docs] == ["1.md"]
        assert [e.text for e in store.docs.examples()] == ["first document"]
        orphans = store.db.execute(
            "select count(*) from examples where document_id not in (select id from documents)"
        ).fetchone()[0]
        assert orphans == 0
        assert store.integrity_check() == []
        # Running again stores the rest, and the first one is a duplicate.
        report = ingest_paths(store, [folder], config)
        assert [Path(a.input).name for a in report.added] == ["2.md", "3.md"]
        assert [Path(d.input).name for d in report.duplicates] == ["1.md"]


def test_unreadable_file(tmp_path: Path, store: Store, config: IngestConfig,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("secret", encoding="utf-8")
    (tmp_path / "open.txt").write_text("readable", encoding="utf-8")
    real_open = os.open

    def refuse(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)  # chmod 0 does not stop root; files are opened with os.open
    report = ingest_paths(store, [tmp_path], config)
    assert reasons(report) == {str(locked): "cannot read: Permission denied"}
    assert kinds(report) == {str(locked): "Unreadable"}
    assert texts(store) == ["readable"]
