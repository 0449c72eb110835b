"""Bounds of ingestion (issue 13, "Low"): memory of a long .jsonl run, the size limit after
normalization, and special files (devices, pipes, sockets) in a folder."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import logging
import tracemalloc
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pocketd.ingest.config import IngestConfig
from pocketd.ingest.pipeline import ingest_paths, ingest_text
from pocketd.ingest.report import REPORT_ENTRY_LIMIT, Added, IngestReport, Rejected
from pocketd.store import AddResult, Store


@pytest.fixture
def store() -> Iterator[Store]:
    with Store.memory() as s:
        yield s


# -- a long .jsonl file takes bounded memory ------------------------------------------------


class _CountingDocs:
    """Stands in for `store.docs` so that 200k documents take seconds, not minutes: the memory under
    test is ingestion's own (sources, pipeline, report), not SQLite's."""

    def __init__(self) -> None:
        self.n = 0

    def add_document(self, text: str, examples: Any, **kwargs: Any) -> AddResult:
        self.n += 1
        return AddResult(document_id=self.n, content_hash=f"{self.n:064x}", added=True, n_examples=len(examples))


class _CountingStore:
    def __init__(self) -> None:
        self.docs = _CountingDocs()


N_LINES = 120_000
BAD_EVERY = 10  # every 10th line is not JSON: rejected


def test_long_jsonl_takes_bounded_memory(tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    with export.open("w", encoding="utf-8") as f:
        for i in range(1, N_LINES + 1):
            f.write("not json\n" if i % BAD_EVERY == 0 else json.dumps({"text": f"note {i}"}) + "\n")
    fake = _CountingStore()
    # pytest keeps every captured log record in memory (a real handler does not): an earlier test may
    # have lowered the log level, so logging is off while the ingest is measured.
    logging.disable(logging.CRITICAL)
    tracemalloc.start()
    try:
        report = ingest_paths(fake, [export], IngestConfig())  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    # Keeping every entry took ~45 MB here; bounded, the whole run peaks at a few hundred kB.
    assert peak < 4_000_000, f"peak traced memory {peak:,} bytes for {N_LINES:,} lines"
    n_bad = N_LINES // BAD_EVERY
    assert fake.docs.n == N_LINES - n_bad
    # Every line is counted...
    assert (report.n_added, report.n_rejected, report.n_examples) == (N_LINES - n_bad, n_bad, N_LINES - n_bad)
    # ...but only the first entries of each kind are kept, and the report says how many are left out.
    assert len(report.added) == len(report.rejected) == REPORT_ENTRY_LIMIT
    assert report.added[0].input == f"{export}:1" and report.rejected[0].input == f"{export}:{BAD_EVERY}"
    assert report.omitted("added") == N_LINES - n_bad - REPORT_ENTRY_LIMIT
    assert report.more_line("rejected") == f"... and {n_bad - REPORT_ENTRY_LIMIT:,} more rejected"
    assert report.summary().startswith(f"{N_LINES - n_bad:,} added ({N_LINES - n_bad:,} examples), 0 duplicates, "
                                       f"{n_bad:,} rejected, 0 skipped (listed: the first 1,000 of each kind; "
                                       f"... and {N_LINES - n_bad - 1000:,} more added, {n_bad - 1000:,} more "
                                       "rejected)")
    assert not report.ok


def test_report_counts_and_bounded_lists() -> None:
    report = IngestReport(limit=2)
    for i in range(5):
        report.add(Added(f"in{i}", i, "h", 2))
    report.add(Rejected("bad", "empty, no text", "EmptyText"))
    assert [a.input for a in report.added] == ["in0", "in1"]
    assert (report.n_added, report.n_examples, report.omitted("added"), report.omitted("rejected")) == (5, 10, 3, 0)
    assert report.more_line("added") == "... and 3 more added" and report.more_line("rejected") is None
    assert report.summary() == ("5 added (10 examples), 0 duplicates, 1 rejected, 0 skipped "
                                "(listed: the first 2 of each kind; ... and 3 more added)")
    d = report.to_dict()
    assert d["counts"] == {"added": 5, "duplicates": 0, "rejected": 1, "skipped": 0, "examples": 10}
    assert d["omitted"] == {"added": 3, "duplicates": 0, "rejected": 0, "skipped": 0}
    assert len(d["added"]) == 2
    other = IngestReport(limit=2)
    other.add(Rejected("worse", "empty, no text", "EmptyText"))
    other.add(Rejected("worst", "empty, no text", "EmptyText"))
    report.extend(other)
    assert [r.input for r in report.rejected] == ["bad", "worse"] and report.n_rejected == 3
    assert report.more_line("rejected") == "... and 1 more rejected"
    # A small run reads as before.
    small = IngestReport()
    small.add(Added("a", 1, "h", 3))
    assert small.summary() == "1 added (3 examples), 0 duplicates, 0 rejected, 0 skipped"


# -- the size limit holds after normalization -------------------------------------------------

# U+1D160 (MUSICAL SYMBOL EIGHTH NOTE, 4 bytes) has no composed form: NFC writes it as three
# characters, 12 bytes. U+FB2C (HEBREW LETTER SHIN WITH DAGESH AND SHIN DOT) grows from 3 to 6 bytes.
NOTE = "\U0001d160"
SHIN = "\ufb2c"


def test_the_expanding_characters_expand() -> None:
    for ch, factor in ((NOTE, 3), (SHIN, 2)):
        assert len(unicodedata.normalize("NFC", ch).encode("utf-8")) == factor * len(ch.encode("utf-8"))


@pytest.mark.parametrize("ch", [NOTE, SHIN], ids=["U+1D160", "U+FB2C"])
def test_text_that_grows_under_nfc_is_checked_after_normalizing(tmp_path: Path, store: Store, ch: str) -> None:
    limit = 1000
    config = IngestConfig(max_document_bytes=limit)
    text = ch * (limit // len(ch.encode("utf-8")))  # at most the limit as given...
    grown = len(unicodedata.normalize("NFC", text).encode("utf-8"))
    assert len(text.encode("utf-8")) <= limit < grown  # ...but over it once normalized
    path = tmp_path / "music.txt"
    path.write_text(text, encoding="utf-8")
    want = (f"too large: {grown:,} bytes once normalized (Unicode NFC; {len(text.encode('utf-8')):,} bytes "
            f"as given), the limit is {limit:,} bytes (ingest.max_document_bytes)")
    for report in (
        ingest_paths(store, [path], config),
        ingest_paths(store, [tmp_path / "lines.jsonl"], config) if _write_jsonl(tmp_path / "lines.jsonl", text)
        else None,
        ingest_text(store, text, "phone", config, name="socket request"),
    ):
        assert report is not None
        assert [(r.kind, r.reason) for r in report.rejected] == [("TooLarge", want)]
    assert [r.input for r in ingest_paths(store, [path], config).rejected] == [str(path)]
    assert store.docs.stats().documents == 0
    # Just under the limit once normalized: stored.
    fits = ch * (limit // len(unicodedata.normalize("NFC", ch).encode("utf-8")))
    assert ingest_text(store, fits, "phone", config).n_added == 1


def _write_jsonl(path: Path, text: str) -> bool:
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


# -- devices, pipes and sockets in a folder are named, never opened ---------------------------


def _skipped(report: IngestReport) -> dict[str, str]:
    return {Path(s.input).name: s.reason for s in report.skipped}


def _run_with_deadline(fn: Any, seconds: float = 10.0) -> Any:
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks, as opening a FIFO would."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"ingest blocked for {seconds} s (it opened a FIFO or device?)")
    return out[0]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_symlink_to_a_device_is_not_a_broken_link(tmp_path: Path, store: Store, device: str) -> None:
    if not os.path.exists(device) or not stat.S_ISCHR(os.stat(device).st_mode):
        pytest.skip(f"no character device {device}")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "note.md").write_text("a note", encoding="utf-8")
    (folder / "dev.txt").symlink_to(device)
    (folder / "dev").symlink_to(device)  # no accepted extension: still named for what it is
    report = _run_with_deadline(lambda: ingest_paths(store, [folder], IngestConfig()))
    assert report.ok and report.n_added == 1
    want = f"not a regular file (a character device; a symbolic link to {device})"
    assert _skipped(report) == {"dev.txt": want, "dev": want}
    # Named on the command line, it is rejected the same way (not read: /dev/zero never ends).
    named = _run_with_deadline(lambda: ingest_paths(store, [folder / "dev.txt"], IngestConfig()))
    assert [(r.input, r.kind, r.reason) for r in named.rejected] == [
        (str(folder / "dev.txt"), "NotAFile", "not a regular file (a character device)")]


def test_a_device_is_never_opened(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    report = _run_with_deadline(lambda: ingest_paths(store, [tmp_path], IngestConfig()))
    assert not [p for p in opened if "zero" in p], opened
    assert set(_skipped(report)) == {"zero.txt", "zero.jsonl"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifos_in_a_folder_never_block(tmp_path: Path, store: Store) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    os.mkfifo(folder / "pipe.txt")
    os.mkfifo(folder / "pipe.jsonl")
    os.mkfifo(tmp_path / "elsewhere.fifo")
    (folder / "link.md").symlink_to(tmp_path / "elsewhere.fifo")
    report = _run_with_deadline(lambda: ingest_paths(store, [folder], IngestConfig()))
    assert report.ok
    assert _skipped(report) == {
        "pipe.txt": "not a regular file (a named pipe)",
        "pipe.jsonl": "not a regular file (a named pipe)",
        "link.md": f"not a regular file (a named pipe; a symbolic link to {tmp_path / 'elsewhere.fifo'})",
    }


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_sockets_in_a_folder_are_named(tmp_path: Path, store: Store) -> None:
    folder = tmp_path / "s"  # short: socket paths are limited to ~100 bytes
    folder.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(folder / "daemon.sock"))
        (folder / "link.txt").symlink_to(folder / "daemon.sock")
        report = _run_with_deadline(lambda: ingest_paths(store, [folder], IngestConfig()))
        named = _run_with_deadline(lambda: ingest_paths(store, [folder / "link.txt"], IngestConfig()))
    finally:
        sock.close()
    assert report.ok
    assert _skipped(report) == {
        "daemon.sock": "not a regular file (a socket)",
        "link.txt": f"not a regular file (a socket; a symbolic link to {folder / 'daemon.sock'})",
    }
    assert [r.reason for r in named.rejected] == ["not a regular file (a socket)"]


def test_dangling_symlink_is_still_a_broken_link(tmp_path: Path, store: Store) -> None:
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "self.txt").symlink_to(tmp_path / "self.txt")  # a link to itself: ELOOP
    report = ingest_paths(store, [tmp_path], IngestConfig())
    skipped = _skipped(report)
    assert skipped["gone.txt"] == "broken symbolic link"
    assert skipped["self.txt"].startswith("broken symbolic link")
