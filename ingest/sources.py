"""Where text comes from: files, folders, stdin, JSONL and JSON records.

Each source yields raw documents (decoded, not yet normalized) and, for inputs that
cannot be used, Rejected or Skipped entries; one bad input never stops the others.

Formats, by extension:
- `.jsonl`: one record per line (see ingest.records); each record is a document;
  a bad line is rejected as "path:LINE" and the other lines are still read.
  Blank lines are ignored. The file as a whole has no size limit (it is streamed);
  each line is limited (see `jsonl_line_limit`) and each record's text to
  `ingest.max_document_bytes`.
- `.json`: one record object, or a list of record objects (each one a document,
  named "path#N", N from 1). The file is read whole, so it must fit in
  `ingest.max_document_bytes`; use .jsonl for large exports. A record's
  created_at is its own "time" (none if absent).
- any other extension in `ingest.extensions` (.txt, .md by default): the whole
  file is one document, created_at = the file's modification time.

Only regular files are opened (and opened non-blocking, checked again once open): a
device, named pipe or socket in a folder, or a symbolic link to one, is skipped as
"not a regular file (a character device; a symbolic link to /dev/zero)"; named on the
command line it is rejected as "not a regular file (a named pipe)".

Source names: `--source NAME` (the `source` argument) wins; then a record's own
"source"; then the folder path (absolute) for everything found in a folder, the
file path (absolute) for a file given by name, and "stdin" for `-`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Union

from .config import IngestConfig
from .decode import decode, file_kind, open_regular_file, read_file_stat, read_stream
from .errors import BadJson, BadJsonlLine, IngestError, PathNotFound, TooLarge, Unreadable, UnsupportedFile
from .records import parse_record
from .report import Rejected, Skipped

log = logging.getLogger(__name__)

STDIN = "-"
STDIN_NAME = "<stdin>"
STDIN_SOURCE = "stdin"
# JSON escapes take up to 6 bytes per character ("\u00e9"), so a line may be that much larger than its text.
JSON_ESCAPE_FACTOR = 6
JSON_LINE_SLACK = 1 << 16


@dataclass(frozen=True)
class RawDocument:
    """One document's text as it came in (decoded, not yet checked or normalized) and where from."""

    name: str  # the input's name in messages: a path as given, "path:LINE", "path#N", "<stdin>"
    text: str
    source: str
    source_kind: str  # file | folder | stdin | jsonl | json | text
    origin: str  # stored with the document: an absolute path, "path:LINE", "<stdin>"
    created_at: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    decoded: bool = False  # True when `text` came through decode(): NUL and binary checks already done


Item = Union[RawDocument, Rejected, Skipped]


def jsonl_line_limit(config: IngestConfig) -> int:
    """The longest JSONL line read: enough for a record whose text is at the size limit, fully escaped."""
    return JSON_ESCAPE_FACTOR * config.max_document_bytes + JSON_LINE_SLACK


def display_path(path: str | Path) -> str:
    """A path as text that can be printed and stored: bytes of a file name that are not UTF-8
    (which Python keeps as lone surrogates) are shown as \\xNN escapes."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def loads_json(text: str, *, one_line: bool = False) -> tuple[Any, str | None]:
    """`json.loads`, or (None, the reason) when `text` is not JSON that Python can read."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if one_line else f"line {e.lineno}, column {e.colno}"
        return None, f"not valid JSON: {e.msg} ({where})"
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        return None, f"unreadable JSON value: {str(e).split(';')[0]}"


def _mtime_iso(st: os.stat_result) -> str:
    return datetime.fromtimestamp(st.st_mtime, tz=timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class _Naming:
    """How documents of one input are named: the source unless a record says otherwise."""

    source: str
    kind: str
    forced: bool  # --source given: records' own "source" fields do not apply


def iter_inputs(
    paths: Sequence[str | Path],
    config: IngestConfig,
    *,
    source: str | None = None,
    stdin: BinaryIO | None = None,
    stdin_format: str = "text",
) -> Iterator[Item]:
    """Every document (or problem) from `paths`, in order; "-" reads `stdin` (text, or "jsonl")."""
    for raw in paths:
        if str(raw) == STDIN:
            naming = _Naming(source or STDIN_SOURCE, "stdin", source is not None)
            yield from _read_stdin(stdin, config, naming, stdin_format)
            continue
        path = Path(raw)
        given = display_path(raw)  # the input's name in messages
        if path.is_dir():
            naming = _Naming(source or display_path(os.path.abspath(path)), "folder", source is not None)
            yield from _read_folder(path, config, naming)
        elif not path.exists() and not path.is_symlink():
            yield Rejected.from_error(PathNotFound(given))
        else:
            ext = path.suffix.lower()
            if ext not in config.extensions:
                yield Rejected.from_error(UnsupportedFile(given, display_path(ext), config.extensions))
                continue
            naming = _Naming(source or display_path(os.path.abspath(path)), "file", source is not None)
            yield from _read_path(path, given, config, naming)


def _read_stdin(stdin: BinaryIO | None, config: IngestConfig, naming: _Naming, fmt: str) -> Iterator[Item]:
    if stdin is None:
        yield Rejected.from_error(Unreadable(STDIN_NAME, "no standard input available"))
        return
    if fmt == "jsonl":
        yield from _jsonl_lines(stdin, STDIN_NAME, STDIN_NAME, config, naming)
        return
    if fmt != "text":
        raise ValueError(f"unknown stdin format {fmt!r} (text or jsonl)")
    try:
        text = decode(read_stream(stdin, STDIN_NAME, config.max_document_bytes), STDIN_NAME)
    except IngestError as e:
        yield Rejected.from_error(e)
        return
    yield RawDocument(STDIN_NAME, text, naming.source, naming.kind, STDIN_NAME, decoded=True)


def _read_folder(root: Path, config: IngestConfig, naming: _Naming) -> Iterator[Item]:
    """Files under `root` by extension, in name order; hidden entries and symlink loops are skipped."""
    try:
        st = root.stat()
    except OSError as e:
        yield Rejected.from_error(Unreadable(display_path(root), f"cannot read folder: {e.strerror or e}"))
        return
    seen: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    stack: list[Path] = [root]
    # Depth-first, in name order, without recursion (deep trees cannot overflow the stack).
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Rejected.from_error(Unreadable(display_path(folder), f"cannot read folder: {e.strerror or e}"))
            continue
        subfolders: list[Path] = []
        for entry in entries:
            path = folder / entry.name
            name = display_path(path)
            if entry.name.startswith("."):
                yield Skipped(name, "hidden")
                continue
            try:
                est = entry.stat()  # follows symlinks; nothing is opened
            except OSError as e:
                yield _unstattable(entry, name, e)
                continue
            if stat.S_ISDIR(est.st_mode):
                key = (est.st_dev, est.st_ino)
                if key in seen:
                    yield Skipped(name, "folder already visited (a symbolic link loop or repeat)")
                    continue
                seen.add(key)
                subfolders.append(path)
            elif stat.S_ISREG(est.st_mode):
                ext = path.suffix.lower()
                if ext not in config.extensions:
                    shown = display_path(ext) or "(none)"
                    yield Skipped(name, f"extension {shown} is not in ingest.extensions")
                    continue
                yield from _read_path(path, name, config, naming)
            else:
                # A device, FIFO or socket (or a link to one): named for what it is, never opened.
                what = file_kind(est.st_mode)
                if entry.is_symlink():
                    what += f"; a symbolic link to {_link_target(path)}"
                yield Skipped(name, f"not a regular file ({what})")
        # Visit subfolders in name order after this folder's own files.
        stack.extend(reversed(subfolders))


def _link_target(path: Path) -> str:
    try:
        return display_path(os.readlink(path))
    except OSError:
        return "(unreadable)"


def _unstattable(entry: os.DirEntry[str], name: str, error: OSError) -> Item:
    """The entry for a folder entry whose stat (following symlinks) failed."""
    try:
        is_link = entry.is_symlink()
    except OSError:
        is_link = False
    if is_link and isinstance(error, FileNotFoundError):
        return Skipped(name, "broken symbolic link")
    if is_link and error.errno == errno.ELOOP:
        return Skipped(name, "broken symbolic link (a loop of symbolic links)")
    if isinstance(error, FileNotFoundError):
        return Skipped(name, "removed while the folder was read")
    return Rejected.from_error(Unreadable(name, f"cannot read: {error.strerror or error}"))


def _read_path(path: Path, name: str, config: IngestConfig, naming: _Naming) -> Iterator[Item]:
    """The documents of one file, chosen by its extension (.jsonl, .json, anything else: plain text)."""
    ext = path.suffix.lower()
    origin = display_path(os.path.abspath(path))
    if ext == ".jsonl":
        try:
            f, _ = open_regular_file(path, name)
        except IngestError as e:
            yield Rejected.from_error(e)
            return
        with f:
            yield from _jsonl_lines(f, name, origin, config, naming)
        return
    try:
        data, st = read_file_stat(path, name, config.max_document_bytes)
        text = decode(data, name)
    except IngestError as e:
        yield Rejected.from_error(e)
        return
    if ext == ".json":
        yield from _json_records(text, name, origin, naming)
        return
    yield RawDocument(name, text, naming.source, naming.kind, origin, _mtime_iso(st), decoded=True)


def _record_document(
    obj: Any, name: str, origin: str, naming: _Naming, kind: str, error: Callable[[str], IngestError]
) -> Item:
    try:
        record = parse_record(obj, error)
    except IngestError as e:
        return Rejected.from_error(e)
    if record.source is not None and not naming.forced:
        source, source_kind = record.source, kind
    else:
        source, source_kind = naming.source, naming.kind
    return RawDocument(name, record.text, source, source_kind, origin, record.created_at, record.meta)


def _jsonl_lines(stream: BinaryIO, name: str, origin: str, config: IngestConfig, naming: _Naming) -> Iterator[Item]:
    """One document per non-blank line; a bad line is rejected as "name:LINE" and reading goes on."""
    limit = jsonl_line_limit(config)
    offset = 0
    lineno = 0
    while True:
        try:
            line = stream.readline(limit + 1)
        except OSError as e:
            yield Rejected.from_error(Unreadable(name, f"cannot read: {e.strerror or e}"))
            return
        if not line:
            return
        lineno += 1
        line_name = f"{name}:{lineno}"
        start = offset
        offset += len(line)
        if len(line) > limit and not line.endswith(b"\n"):
            # Too long: skip to the end of this line, keep the line count right.
            while True:
                more = stream.readline(1 << 20)
                offset += len(more)
                if not more or more.endswith(b"\n"):
                    break
            # Even fully escaped, its text would be over the document limit.
            yield Rejected.from_error(TooLarge(line_name, offset - start, config.max_document_bytes))
            continue
        if not line.strip():
            continue
        try:
            text = decode(line, line_name, base_offset=start)
        except IngestError as e:
            yield Rejected.from_error(e)
            continue
        obj, problem = loads_json(text, one_line=True)
        if problem is not None:
            yield Rejected.from_error(BadJsonlLine(name, lineno, problem))
            continue
        yield _record_document(
            obj, line_name, f"{origin}:{lineno}", naming, "jsonl",
            lambda reason, n=lineno: BadJsonlLine(name, n, reason),
        )


def _json_records(text: str, name: str, origin: str, naming: _Naming) -> Iterator[Item]:
    """A .json file: one record object, or a list of them (named "name#N", N from 1)."""
    obj, problem = loads_json(text)
    if problem is not None:
        yield Rejected.from_error(BadJson(name, problem))
        return
    if isinstance(obj, dict):
        yield _record_document(obj, name, origin, naming, "json", lambda reason: BadJson(name, reason))
        return
    if not isinstance(obj, list):
        yield Rejected.from_error(BadJson(name, "expected a record object or a list of records"))
        return
    if not obj:
        yield Rejected.from_error(BadJson(name, "an empty list: no records"))
        return
    for i, item in enumerate(obj, 1):
        item_name = f"{name}#{i}"
        yield _record_document(
            item, item_name, f"{origin}#{i}", naming, "json",
            lambda reason, n=item_name: BadJson(n, reason),
        )
