"""Strict decoding, normalization and splitting into examples."""

from __future__ import annotations

import io
import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketd.ingest.config import IngestConfig
from pocketd.ingest.decode import check_text, decode, read_file, read_stream
from pocketd.ingest.errors import (
    BinaryInput,
    EmptyText,
    IngestError,
    InvalidUnicode,
    InvalidUtf8,
    NotAFile,
    PathNotFound,
    TooLarge,
)
from pocketd.ingest.normalize import normalize
from pocketd.ingest.pipeline import prepare
from pocketd.ingest.split import split_examples

# -- decoding -------------------------------------------------------------------


def test_decode_plain_utf8() -> None:
    assert decode("héllo wörld ✓".encode(), "x.txt") == "héllo wörld ✓"


def test_decode_drops_utf8_bom() -> None:
    assert decode(b"\xef\xbb\xbfhi", "x.txt") == "hi"


@pytest.mark.parametrize(
    "data, offset",
    [
        (b"\xff", 0),
        (b"abc\xffdef", 3),
        ("caf\u00e9 ".encode() + b"\xc3", 6),  # truncated two-byte sequence at the end
        (b"ok \xed\xa0\x80 surrogate", 3),  # an encoded surrogate is not UTF-8
        (b"latin-1 caf\xe9!", 11),
        (b"\xef\xbb\xbf12\x80", 5),  # the offset counts the BOM: it is the file's byte offset
    ],
)
def test_invalid_utf8_reports_name_and_byte_offset(data: bytes, offset: int) -> None:
    with pytest.raises(InvalidUtf8) as info:
        decode(data, "notes/bad.txt")
    assert info.value.offset == offset
    assert info.value.input_name == "notes/bad.txt"
    assert str(info.value).startswith("notes/bad.txt: invalid UTF-8 at byte offset ")
    assert f"offset {offset}" in str(info.value)


def test_invalid_utf8_offset_is_relative_to_the_whole_input() -> None:
    with pytest.raises(InvalidUtf8) as info:
        decode(b"ab\xfe", "x.jsonl:3", base_offset=100)
    assert info.value.offset == 102


def test_nul_byte_is_binary() -> None:
    with pytest.raises(BinaryInput, match=r"x\.bin: binary data, not text \(NUL byte at offset 4\)"):
        decode(b"text\x00more", "x.bin")


def test_binary_checked_before_utf8() -> None:
    # A PNG header is both invalid UTF-8 and has NULs: it is reported as binary.
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    with pytest.raises(BinaryInput):
        decode(png, "photo.txt")


def test_utf16_is_named() -> None:
    with pytest.raises(BinaryInput, match="UTF-16"):
        decode("hello".encode("utf-16"), "win.txt")


def test_mostly_control_characters_is_binary() -> None:
    with pytest.raises(BinaryInput, match="control characters"):
        decode(bytes(range(1, 9)) * 20 + b"some text", "x.txt")


def test_a_few_control_characters_are_fine() -> None:
    text = "a form feed \x0c and an escape \x1b[0m and a bell \x07 in a long line of ordinary text"
    assert decode(text.encode(), "x.txt") == text


@pytest.mark.parametrize(
    "text, error",
    [("a\x00b", BinaryInput), ("lone \ud83d surrogate", InvalidUnicode), ("\x01\x02\x03\x04", BinaryInput)],
)
def test_check_text_for_strings(text: str, error: type[IngestError]) -> None:
    with pytest.raises(error):
        check_text(text, "record")


def test_read_stream_stops_past_the_limit() -> None:
    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            b[:] = b"a" * len(b)
            self.served += len(b)
            return len(b)

    stream = Endless()
    with pytest.raises(TooLarge, match=r"<stdin>: too large: .*limit is 1,000 bytes \(ingest.max_document_bytes\)"):
        read_stream(stream, "<stdin>", 1000)  # type: ignore[arg-type]
    assert stream.served <= 1001


def test_read_file_checks_size_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2000)

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was opened")

    monkeypatch.setattr(Path, "open", no_open)
    with pytest.raises(TooLarge) as info:
        read_file(big, "big.txt", 1000)
    assert info.value.size == 2000
    assert "2,000 bytes" in str(info.value)


def test_read_file_at_exactly_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"x" * 1000)
    assert read_file(f, "a.txt", 1000) == b"x" * 1000


def test_read_file_on_a_folder_or_missing(tmp_path: Path) -> None:
    with pytest.raises(NotAFile, match="a folder"):
        read_file(tmp_path, "notes", 100)
    with pytest.raises(PathNotFound, match="no such file"):
        read_file(tmp_path / "nope.txt", "nope.txt", 100)


# -- normalization ----------------------------------------------------------------


def test_normalize_line_endings_and_trailing_space() -> None:
    raw = "\n  \r\n  Title  \r\nline one\t \rline two\r\n\r\n\r\n  indented\n \n\t\n"
    assert normalize(raw) == "  Title\nline one\nline two\n\n\n  indented"


def test_normalize_nfc() -> None:
    decomposed = "cafe\u0301 Ame\u0301lie"
    assert normalize(decomposed) == "caf\u00e9 Am\u00e9lie"
    assert normalize(decomposed) == normalize("caf\u00e9 Am\u00e9lie")


def test_normalize_whitespace_only_is_empty() -> None:
    assert normalize(" \n\t\r\n \u3000 ") == ""


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert "\r" not in once
    assert once == unicodedata.normalize("NFC", once)
    assert all(line == line.rstrip() for line in once.split("\n"))


# -- splitting --------------------------------------------------------------------


def _non_ws(s: str) -> str:
    return re.sub(r"\s+", "", s)


def test_short_text_is_one_example() -> None:
    assert split_examples("One paragraph.\n\nAnother one.", 100) == ["One paragraph.\n\nAnother one."]


def test_paragraphs_are_packed_up_to_the_limit() -> None:
    paras = [f"Paragraph {i} " + "x" * 30 for i in range(6)]  # 42 chars each
    out = split_examples("\n\n".join(paras), 100)
    assert out == ["\n\n".join(paras[0:2]), "\n\n".join(paras[2:4]), "\n\n".join(paras[4:6])]


def test_long_paragraph_split_at_lines_then_sentences_then_words() -> None:
    lines = ["short line one", "short line two", "A sentence here. Another sentence there! And a third?"]
    out = split_examples("\n".join(lines), 30)
    assert out == [
        "short line one\nshort line two",
        "A sentence here.",
        "Another sentence there!",
        "And a third?",
    ]
    words = "word " * 20
    assert all(len(x) <= 12 for x in split_examples(words.strip(), 12))
    assert split_examples("alpha beta gamma delta", 11) == ["alpha beta", "gamma delta"]


def test_a_word_longer_than_the_limit_is_cut() -> None:
    out = split_examples("a" * 25, 10)
    assert out == ["a" * 10, "a" * 10, "a" * 5]


def test_hard_cut_avoids_starting_with_a_combining_mark() -> None:
    word = ("e\u0301" * 10)  # 20 code points; every second one combining
    out = split_examples(word, 5)
    assert "".join(out) == word
    assert all(not unicodedata.combining(x[0]) for x in out)
    assert all(len(x) <= 5 for x in out)


def test_split_is_deterministic_and_never_empty() -> None:
    text = "\n\n".join(f"Note {i}. " * (i + 1) for i in range(30))
    a, b = split_examples(text, 64), split_examples(text, 64)
    assert a == b
    assert all(x.strip() for x in a)


def test_split_rejects_a_zero_limit() -> None:
    with pytest.raises(ValueError):
        split_examples("x", 0)


_texty = st.lists(
    st.sampled_from([*"abc xyz.!?\n\n\t", "é", "e\u0301", "…", "\u3000", "世", "word ", "Sentence. "]),
    max_size=300,
).map("".join)


@given(_texty, st.integers(min_value=1, max_value=120))
@settings(max_examples=300, deadline=None)
def test_split_keeps_all_text_and_respects_the_limit(text: str, limit: int) -> None:
    out = split_examples(text, limit)
    assert _non_ws("".join(out)) == _non_ws(text)
    assert all(0 < len(x) <= limit for x in out)
    assert all(x.strip() for x in out)


@given(st.text(max_size=400), st.integers(min_value=1, max_value=80))
@settings(max_examples=200, deadline=None)
def test_split_property_on_any_normalized_text(text: str, limit: int) -> None:
    norm = normalize(text)
    out = split_examples(norm, limit)
    assert _non_ws("".join(out)) == _non_ws(norm)
    assert all(0 < len(x) <= limit for x in out)


# -- prepare: the checks every document goes through ----------------------------------


def test_prepare_rejects_empty_and_whitespace_only() -> None:
    config = IngestConfig()
    with pytest.raises(EmptyText, match="a.txt: empty, no text"):
        prepare("", "a.txt", config)
    with pytest.raises(EmptyText, match="b.txt: only whitespace"):
        prepare(" \r\n\t\n  ", "b.txt", config)


def test_prepare_rejects_text_over_the_limit() -> None:
    config = IngestConfig(max_document_bytes=10)
    with pytest.raises(TooLarge, match="12 bytes"):
        prepare("ééééé!!", "r", config)  # 7 characters, 12 bytes
    assert prepare("ééééé", "r", config)[0] == "ééééé"  # 10 bytes: at the limit


def test_prepare_normalizes_and_splits() -> None:
    config = IngestConfig(example_max_chars=64)
    text, examples = prepare("First.  \r\n\r\nSecond.\r\n", "x", config)
    assert text == "First.\n\nSecond."
    assert examples == ["First.\n\nSecond."]
