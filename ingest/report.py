"""What an ingest run did, input by input: added, duplicate, rejected (with the reason), skipped."""

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


@dataclass
class IngestReport:
    """Every input of one run, in the order they were met."""

    added: list[Added] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def add(self, entry: Entry) -> None:
        if isinstance(entry, Added):
            self.added.append(entry)
        elif isinstance(entry, Duplicate):
            self.duplicates.append(entry)
        elif isinstance(entry, Rejected):
            self.rejected.append(entry)
        elif isinstance(entry, Skipped):
            self.skipped.append(entry)
        else:
            raise TypeError(f"not a report entry: {entry!r}")

    def extend(self, other: "IngestReport") -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.skipped += other.skipped

    @property
    def ok(self) -> bool:
        """True when nothing was rejected (skips are fine)."""
        return not self.rejected

    @property
    def n_examples(self) -> int:
        return sum(a.n_examples for a in self.added)

    def summary(self) -> str:
        """One line, e.g. "3 added (7 examples), 1 duplicate, 2 rejected, 1 skipped"."""
        parts = [f"{len(self.added)} added ({plural(self.n_examples, 'example')})"]
        parts.append(plural(len(self.duplicates), "duplicate"))
        parts.append(f"{len(self.rejected)} rejected")
        parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for the control socket and `--json`)."""
        return {
            "added": [asdict(a) for a in self.added],
            "duplicates": [asdict(d) for d in self.duplicates],
            "rejected": [asdict(r) for r in self.rejected],
            "skipped": [asdict(s) for s in self.skipped],
        }
