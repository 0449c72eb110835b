"""Named exceptions of ingestion. Each names the input it is about; the CLI prints them as they are.

Every error carries `input_name` (a path, "path:line", "<stdin>", ...) and `reason`
(the message without the name), so a report can list them side by side.
"""

from __future__ import annotations


class IngestError(Exception):
    """Base class for every error ingestion raises: one input could not be stored."""

    def __init__(self, input_name: str, reason: str) -> None:
        super().__init__(f"{input_name}: {reason}")
        self.input_name = input_name
        self.reason = reason


class PathNotFound(IngestError):
    """The given path does not exist."""

    def __init__(self, input_name: str) -> None:
        super().__init__(input_name, "no such file or folder")


class NotAFile(IngestError):
    """The path is not a regular file (a folder, a device, a pipe, a socket...) where a file was needed."""

    def __init__(self, input_name: str, what: str) -> None:
        super().__init__(input_name, f"not a regular file ({what})")
        self.what = what


class Unreadable(IngestError):
    """The operating system refused to read the input (permissions, I/O error)."""


class UnsupportedFile(IngestError):
    """A file given by name has an extension that `ingest.extensions` does not list."""

    def __init__(self, input_name: str, extension: str, allowed: list[str]) -> None:
        shown = extension or "(none)"
        super().__init__(
            input_name,
            f"unsupported file type {shown} (accepted: {' '.join(allowed)}; see ingest.extensions)",
        )
        self.extension = extension


class TooLarge(IngestError):
    """The input is over `ingest.max_document_bytes`; it is rejected whole, never truncated.

    `size_as_given`: set when `size` is the normalized text's size (Unicode NFC can make a text up to
    three times longer in UTF-8), the size before normalization.
    """

    def __init__(self, input_name: str, size: int | None, limit: int, *, size_as_given: int | None = None) -> None:
        got = f"{size:,} bytes" if size is not None else "more than that"
        if size_as_given is not None:
            got += f" once normalized (Unicode NFC; {size_as_given:,} bytes as given)"
        super().__init__(input_name, f"too large: {got}, the limit is {limit:,} bytes (ingest.max_document_bytes)")
        self.size = size
        self.limit = limit
        self.size_as_given = size_as_given


class BinaryInput(IngestError):
    """The input looks binary: it holds NUL bytes or mostly control characters."""

    def __init__(self, input_name: str, detail: str) -> None:
        super().__init__(input_name, f"binary data, not text ({detail})")


class InvalidUtf8(IngestError):
    """The input is not valid UTF-8; `offset` is the byte offset of the first bad byte."""

    def __init__(self, input_name: str, offset: int, bad: bytes = b"") -> None:
        shown = f" ({bad.hex(' ')})" if bad else ""
        super().__init__(input_name, f"invalid UTF-8 at byte offset {offset}{shown}")
        self.offset = offset


class EmptyText(IngestError):
    """The input holds no text, or only whitespace, once normalized."""

    def __init__(self, input_name: str, whitespace_only: bool = False) -> None:
        super().__init__(input_name, "only whitespace, no text" if whitespace_only else "empty, no text")


class BadJsonlLine(IngestError):
    """One line of a .jsonl file is not a valid record; named "path:LINE", the other lines are still read."""

    def __init__(self, input_name: str, line: int, detail: str) -> None:
        super().__init__(f"{input_name}:{line}", f"bad JSONL line: {detail}")
        self.line = line
        self.detail = detail


class BadJson(IngestError):
    """A .json file is not valid JSON, or not a record or a list of records."""


class InvalidUnicode(IngestError):
    """Text handed over as a string (JSON, socket) holds a lone surrogate, which no UTF-8 can encode."""

    def __init__(self, input_name: str, index: int, char: str, where: str | None = None) -> None:
        place = f"in {where}" if where else f"at character {index}"
        super().__init__(input_name, f"invalid Unicode: lone surrogate U+{ord(char):04X} {place}")
        self.index = index
