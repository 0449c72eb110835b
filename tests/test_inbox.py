"""The inbox folder: new and changed files are ingested once; unchanged ones are not read again."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketd.daemon.inbox import InboxWatcher
from pocketd.ingest.config import IngestConfig
from pocketd.store import Store

from .daemon_helpers import DaemonFactory, wait_for


def old(path: Path, text: str) -> Path:
    path.write_text(text)
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


def test_poll_ingests_once_and_again_on_change(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old(inbox / "a.txt", "First note about the garden.")
    old(inbox / "b.md", "Second note, about bread.")
    old(inbox / ".hidden.txt", "secret draft")
    old(inbox / "photo.jpg", "not text")
    fresh = inbox / "writing.txt"
    fresh.write_text("still being written")  # modified just now: left for a later poll
    w = InboxWatcher(inbox, IngestConfig())
    with Store.memory() as store:
        r = w.poll(store)
        assert (r.files, r.added, r.rejected) == (2, 2, 0)
        assert w.poll(store) is None  # unchanged: not even read
        old(inbox / "a.txt", "First note about the garden, revised.")
        r = w.poll(store)
        assert (r.files, r.added) == (1, 1)
        old(inbox / "a.txt", "First note about the garden, revised.")  # same text, new mtime
        r = w.poll(store)
        assert (r.files, r.added, r.duplicates) == (1, 0, 1)
        os.utime(fresh, (time.time() - 60, time.time() - 60))
        assert w.poll(store).added == 1
        assert store.db["documents"].count == 4
        sources = {d.source for d in store.docs.list()}
        assert sources == {str(inbox.resolve())}


def test_bad_file_is_rejected_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bad = inbox / "bad.txt"
    bad.write_bytes(b"\xff\xfe binary \x00 junk")
    os.utime(bad, (time.time() - 60, time.time() - 60))
    w = InboxWatcher(inbox, IngestConfig())
    with Store.memory() as store:
        assert w.poll(store).rejected == 1
        assert w.poll(store) is None


def test_missing_inbox_is_fine(tmp_path: Path) -> None:
    with Store.memory() as store:
        assert InboxWatcher(tmp_path / "nope", IngestConfig()).poll(store) is None


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


def test_daemon_polls_the_inbox(daemons: DaemonFactory, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old(inbox / "n.txt", "A note dropped into the inbox.")
    d = daemons(daemon={"inbox": inbox, "inbox_poll_s": 1})
    def documents() -> int:
        with d.guarded_store() as s:
            return s.db["documents"].count

    wait_for(lambda: documents() == 1, what="the inbox file to be ingested")
    time.sleep(1.5)  # another poll: nothing new
    assert documents() == 1
    with d.guarded_store() as s:
        assert [e.message for e in s.history.events(kind="inbox")] == ["1 file(s): 1 added, 0 duplicate, 0 rejected"]
