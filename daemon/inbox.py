"""The inbox folder: files dropped into it are ingested once (again only if they change).

Files are remembered by (mtime, size), so an unchanged file is not read again; the
store's content-hash dedup makes a re-ingest a no-op anyway. A file modified within
the last `settle_s` seconds is left for the next poll (it may still be being written).
Hidden files and extensions outside `ingest.extensions` are ignored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketd.ingest.config import IngestConfig

log = logging.getLogger(__name__)

Fingerprint = tuple[int, int]  # (mtime_ns, size)


@dataclass(frozen=True)
class InboxResult:
    files: int  # files handed to ingest this poll
    added: int
    duplicates: int
    rejected: int

    def summary(self) -> str:
        return f"{self.files} file(s): {self.added} added, {self.duplicates} duplicate, {self.rejected} rejected"


class InboxWatcher:
    """Poll one folder. Not thread-safe: call from one job at a time (max_instances=1)."""

    def __init__(self, folder: Path, config: IngestConfig, *, settle_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.config = config
        self.settle_s = settle_s
        self.clock = clock
        self._seen: dict[Path, Fingerprint] = {}

    def changed_files(self) -> list[tuple[Path, Fingerprint]]:
        """Files new or changed since they were last ingested, settled, with a known extension."""
        out: list[tuple[Path, Fingerprint]] = []
        now = self.clock()
        try:
            walker = list(os.walk(self.folder))
        except OSError as e:
            log.warning("cannot read the inbox %s: %s", self.folder, e)
            return out
        for root, dirs, names in walker:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith(".") or Path(name).suffix.lower() not in self.config.extensions:
                    continue
                path = Path(root) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                fp = (st.st_mtime_ns, st.st_size)
                if self._seen.get(path) == fp or now - st.st_mtime < self.settle_s:
                    continue
                out.append((path, fp))
        return out

    def poll(self, store: Any) -> InboxResult | None:
        """Ingest what changed into `store`; None when nothing did. Store errors propagate (retried next poll)."""
        if not self.folder.is_dir():
            return None
        changed = self.changed_files()
        if not changed:
            return None
        from pocketd.ingest.pipeline import ingest_paths

        report = ingest_paths(store, [p for p, _ in changed], self.config, source=str(self.folder.resolve()))
        for path, fp in changed:  # rejected files too: they are retried only when they change
            self._seen[path] = fp
        for rejected in report.rejected:  # the first REPORT_ENTRY_LIMIT; the count below is exact
            log.warning("inbox: rejected %s: %s", rejected.input, rejected.reason)
        result = InboxResult(len(changed), report.n_added, report.n_duplicates, report.n_rejected)
        log.info("inbox %s: %s", self.folder, result.summary())
        return result
