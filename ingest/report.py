"""What an ingest run did: counts of added, duplicate, rejected (with the reason) and skipped inputs, and
the first entries of each kind (bounded, so a run over any number of inputs takes bounded memory)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Union

from .errors import IngestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Added:
    """A new document was stored."""

    input: str
    document_id: int
    content_hash: str
    n_examples: int


@dataclass(frozen=True)
class Duplicate:
    """The text was already stored (same content hash); nothing changed."""

    input: str
    document_id: int
    content_hash: str


@dataclass(frozen=True)
class Rejected:
    """The input is not acceptable text; nothing of it was stored. `kind` is the error's class name."""

    input: str
    reason: str
    kind: str

    @classmethod
    def from_error(cls, error: IngestError) -> "Rejected":
        return cls(error.input_name, error.reason, type(error).__name__)


@dataclass(frozen=True)
class Skipped:
    """The input was passed over on purpose (a hidden file, an extension not in ingest.extensions, ...)."""

    input: str
    reason: str


Entry = Union[Added, Duplicate, Rejected, Skipped]


def plural(n: int, word: str) -> str:
    """`plural(1, "example")` is "1 example", `plural(2, "example")` is "2 examples"."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


# Entries kept per kind (added, duplicates, rejected, skipped): a report's memory is bounded however many
# inputs a run meets (a JSONL export of a million lines); past this only the counts go on.
REPORT_ENTRY_LIMIT = 1000

_KINDS = ("added", "duplicates", "rejected", "skipped")
_LABELS = {"added": "added", "duplicates": "duplicate", "rejected": "rejected", "skipped": "skipped"}


@dataclass
class IngestReport:
    """What one run did: the count of each kind of entry, and the first `limit` entries of each kind in the
    order they were met (`added`, `duplicates`, `rejected`, `skipped`).

    The lists are bounded so that ingesting any number of inputs takes bounded memory; use the counts
    (`n_added`, ...) for totals and `omitted(kind)` for how many entries of a kind were not kept.
    """

    added: list[Added] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    n_added: int = 0
    n_duplicates: int = 0
    n_rejected: int = 0
    n_skipped: int = 0
    n_examples: int = 0  # examples of every added document, listed or not
    limit: int = REPORT_ENTRY_LIMIT

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"report entry limit must be >= 0, got {self.limit}")
        # Entries handed to the constructor count too.
        self.n_added = max(self.n_added, len(self.added))
        self.n_duplicates = max(self.n_duplicates, len(self.duplicates))
        self.n_rejected = max(self.n_rejected, len(self.rejected))
        self.n_skipped = max(self.n_skipped, len(self.skipped))
        self.n_examples = max(self.n_examples, sum(a.n_examples for a in self.added))

    def add(self, entry: Entry) -> None:
        """Count `entry`, and keep it if fewer than `limit` entries of its kind are kept."""
        if isinstance(entry, Added):
            self.n_added += 1
            self.n_examples += entry.n_examples
            self._keep(self.added, entry)
        elif isinstance(entry, Duplicate):
            self.n_duplicates += 1
            self._keep(self.duplicates, entry)
        elif isinstance(entry, Rejected):
            self.n_rejected += 1
            self._keep(self.rejected, entry)
        elif isinstance(entry, Skipped):
            self.n_skipped += 1
            self._keep(self.skipped, entry)
        else:
            raise TypeError(f"not a report entry: {entry!r}")

    def _keep(self, entries: list[Any], entry: Entry) -> None:
        if len(entries) < self.limit:
            entries.append(entry)

    def extend(self, other: "IngestReport") -> None:
        """Add `other`'s counts and as many of its kept entries as fit."""
        for kind in _KINDS:
            mine: list[Any] = getattr(self, kind)
            mine.extend(getattr(other, kind)[: max(0, self.limit - len(mine))])
        self.n_added += other.n_added
        self.n_duplicates += other.n_duplicates
        self.n_rejected += other.n_rejected
        self.n_skipped += other.n_skipped
        self.n_examples += other.n_examples

    def count(self, kind: str) -> int:
        """How many entries of `kind` ("added", "duplicates", "rejected", "skipped") the run met."""
        if kind not in _KINDS:
            raise ValueError(f"unknown report entry kind {kind!r} (one of {', '.join(_KINDS)})")
        return int(getattr(self, f"n_{kind}"))

    def omitted(self, kind: str) -> int:
        """How many entries of `kind` were counted but not kept (past `limit`)."""
        return self.count(kind) - len(getattr(self, kind))

    def more_line(self, kind: str) -> str | None:
        """"... and K more rejected" when entries of `kind` were not kept, else None (for listings)."""
        k = self.omitted(kind)
        return f"... and {k:,} more {_LABELS[kind]}" if k else None

    @property
    def ok(self) -> bool:
        """True when nothing was rejected (skips are fine)."""
        return self.n_rejected == 0

    def summary(self) -> str:
        """One line, e.g. "3 added (7 examples), 1 duplicate, 2 rejected, 1 skipped".

        When entries were not kept, it ends with what the listing leaves out, e.g.
        "(listed: the first 1,000 of each kind; ... and 4,000 more rejected)".
        """
        parts = [f"{self.n_added:,} added ({plural(self.n_examples, 'example')})"]
        parts.append(plural(self.n_duplicates, "duplicate"))
        parts.append(f"{self.n_rejected:,} rejected")
        parts.append(f"{self.n_skipped:,} skipped")
        line = ", ".join(parts)
        more = [f"{self.omitted(kind):,} more {_LABELS[kind]}" for kind in _KINDS if self.omitted(kind)]
        if more:
            line += f" (listed: the first {self.limit:,} of each kind; ... and {', '.join(more)})"
        return line

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for the control socket and `--json`): the kept entries, the counts, and how
        many entries of each kind were not kept."""
        return {
            "added": [asdict(a) for a in self.added],
            "duplicates": [asdict(d) for d in self.duplicates],
            "rejected": [asdict(r) for r in self.rejected],
            "skipped": [asdict(s) for s in self.skipped],
            "counts": {**{kind: self.count(kind) for kind in _KINDS}, "examples": self.n_examples},
            "omitted": {kind: self.omitted(kind) for kind in _KINDS},
        }
