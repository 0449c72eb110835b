"""Splitting a document into training examples of at most `max_chars` characters.

Paragraphs (separated by blank lines) are packed greedily into examples. A paragraph
longer than the limit is cut at line breaks, a line longer than the limit at sentence
ends, a sentence at spaces, and a single word longer than the limit into fixed-size
pieces (never before a combining mark). Only whitespace is ever dropped at a cut; no
example is empty or longer than the limit; the result depends only on the input.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

PARAGRAPH_SEP = "\n\n"
_PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")  # one or more blank (or whitespace-only) lines
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])\s+")


def split_examples(text: str, max_chars: int) -> list[str]:
    """Cut `text` (normally already normalized) into examples of at most `max_chars` characters."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    examples: list[str] = []
    parts: list[str] = []
    length = 0
    for sep, atom in _atoms(text, max_chars):
        if parts and length + len(sep) + len(atom) <= max_chars:
            parts += (sep, atom)
            length += len(sep) + len(atom)
            continue
        if parts:
            examples.append("".join(parts))
        parts, length = [atom], len(atom)
    if parts:
        examples.append("".join(parts))
    return examples


def _atoms(text: str, max_chars: int) -> Iterator[tuple[str, str]]:
    """(separator, piece) pairs: pieces of at most max_chars, each with the separator that precedes it."""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        if paragraph.strip():
            yield from _fit(paragraph, PARAGRAPH_SEP, max_chars, 0)


def _lines(piece: str) -> list[str]:
    return piece.split("\n")


def _sentences(piece: str) -> list[str]:
    return _SENTENCE_END.split(piece)


def _words(piece: str) -> list[str]:
    return piece.split()


def _hard(piece: str, max_chars: int) -> list[str]:
    out = []
    start = 0
    while start < len(piece):
        end = min(start + max_chars, len(piece))
        # Do not start the next piece with a combining mark, unless the whole piece would be marks.
        cut = end
        while start + 1 < cut < len(piece) and unicodedata.combining(piece[cut]):
            cut -= 1
        if cut <= start + 1 and end < len(piece):
            cut = end
        out.append(piece[start:cut])
        start = cut
    return out


# Each level: how to cut a piece that is too long, and what joins its parts back.
_LEVELS: list[tuple[Callable[[str], list[str]], str]] = [
    (_lines, "\n"),
    (_sentences, " "),
    (_words, " "),
]


def _fit(piece: str, sep: str, max_chars: int, level: int) -> Iterator[tuple[str, str]]:
    if len(piece) <= max_chars:
        yield sep, piece
        return
    if level >= len(_LEVELS):
        first = True
        for part in _hard(piece, max_chars):
            yield (sep if first else ""), part
            first = False
        return
    cut, joiner = _LEVELS[level]
    first = True
    for part in cut(piece):
        if not part.strip():
            continue
        yield from _fit(part, sep if first else joiner, max_chars, level + 1)
        first = False
