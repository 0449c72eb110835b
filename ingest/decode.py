"""Strict decoding: bytes to text, or a named error saying what is wrong and where.

Nothing here guesses or repairs: invalid UTF-8 is reported with its byte offset,
NUL bytes mean binary, and sizes are checked before the whole input is read.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import BinaryInput, InvalidUnicode, InvalidUtf8, NotAFile, PathNotFound, TooLarge, Unreadable

log = logging.getLogger(__name__)

# C0 controls other than \t \n \v \f \r and ESC, plus DEL: rare in text, common in binary.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Valid UTF-8 with more control characters than this share is treated as binary.
CONTROL_SHARE_LIMIT = 0.10
_READ_CHUNK = 1 << 20


def check_size(size: int, input_name: str, limit: int) -> None:
    """TooLarge if `size` bytes is over `limit`."""
    if size > limit:
        raise TooLarge(input_name, size, limit)


def read_stream(stream: BinaryIO, input_name: str, limit: int) -> bytes:
    """Read a whole stream, but never more than `limit` + 1 bytes: TooLarge past the limit."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > limit:
        raise TooLarge(input_name, None, limit)
    return b"".join(chunks)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a folder", "a named pipe", "a character device", ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def stat_regular_file(path: Path, input_name: str) -> os.stat_result:
    """The stat of a regular file (following symlinks); PathNotFound, NotAFile or Unreadable otherwise."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise Unreadable(input_name, "broken symbolic link") from None
        raise PathNotFound(input_name) from None
    except OSError as e:
        raise Unreadable(input_name, f"cannot read: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(input_name, file_kind(st.st_mode))
    return st


# Opening never blocks: not on a FIFO (which waits for a writer), not on a device or terminal.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular_file(path: Path, input_name: str) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading (following symlinks); PathNotFound, NotAFile or Unreadable otherwise.

    The path is checked with stat first, so a device, FIFO or socket is never opened; and the file is
    opened non-blocking and checked again with fstat, so one swapped in after the stat (a FIFO
    replacing the file) is refused instead of blocking the run.
    """
    stat_regular_file(path, input_name)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise PathNotFound(input_name) from None
    except OSError as e:
        raise Unreadable(input_name, f"cannot read: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(input_name, file_kind(st.st_mode))
        if _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # reads of the regular file then wait as usual
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def read_file(path: Path, input_name: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, checked by size before reading."""
    return read_file_stat(path, input_name, limit)[0]


def read_file_stat(path: Path, input_name: str, limit: int) -> tuple[bytes, os.stat_result]:
    """`read_file`, and the file's stat (taken on the open file)."""
    f, st = open_regular_file(path, input_name)
    with f:
        check_size(st.st_size, input_name, limit)
        try:
            return read_stream(f, input_name, limit), st  # the file may have grown since stat
        except OSError as e:
            raise Unreadable(input_name, f"cannot read: {e.strerror or e}") from e


def decode(data: bytes, input_name: str, *, base_offset: int = 0) -> str:
    """Strict UTF-8 decoding (a leading BOM is dropped); BinaryInput or InvalidUtf8 naming the byte offset.

    `base_offset` is added to reported offsets when `data` is a slice of a larger input.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not data.startswith(codecs.BOM_UTF8):
        raise BinaryInput(input_name, "starts with a UTF-16 byte order mark; convert it to UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise BinaryInput(input_name, f"NUL byte at offset {base_offset + nul}")
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = skip + e.start
        raise InvalidUtf8(input_name, base_offset + start, data[start : skip + e.end][:4]) from None
    _check_controls(text, input_name)
    return text


def check_text(text: str, input_name: str) -> None:
    """Checks for text that did not come through `decode` (JSON strings, the socket): NUL, surrogates, binary."""
    nul = text.find("\x00")
    if nul >= 0:
        raise BinaryInput(input_name, f"NUL character at index {nul}")
    bad = _SURROGATE.search(text)
    if bad:
        raise InvalidUnicode(input_name, bad.start(), bad.group())
    _check_controls(text, input_name)


def _check_controls(text: str, input_name: str) -> None:
    if not text:
        return
    n = len(_CONTROL.findall(text))
    if n and n / len(text) > CONTROL_SHARE_LIMIT:
        raise BinaryInput(input_name, f"{n} of {len(text)} characters are control characters")
