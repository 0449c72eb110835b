"""Normalization: one canonical form per text, so equal texts hash equal.

Unicode NFC; CRLF and lone CR become LF; trailing whitespace is stripped from every
line; leading and trailing blank lines are dropped. Indentation and blank lines
inside the text are kept. `normalize` is idempotent.
"""

from __future__ import annotations

import logging
import unicodedata

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    """The canonical form of `text` (see the module docstring); "" if it holds only whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    start = 0
    while start < len(lines) and not lines[start]:
        start += 1
    end = len(lines)
    while end > start and not lines[end - 1]:
        end -= 1
    return "\n".join(lines[start:end])
