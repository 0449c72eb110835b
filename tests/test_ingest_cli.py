"""`pocketd ingest | stats | forget | demo`, in process with click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pocketd.daemon.cli import cli  # first: daemon.cli registers daemon.cli_data's commands as it loads

import pocketd.daemon.cli_data as cli_data  # noqa: E402  (isort: skip)


def run(*args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("Garden: tomatoes in March.\n", encoding="utf-8")
    (notes / "b.txt").write_text("Bike: new chain at 0.75 % wear.\n", encoding="utf-8")
    (notes / "c.jsonl").write_text(
        '{"text": "Journal one", "source": "journal"}\n{oops\n{"text": "Journal two", "source": "journal"}\n',
        encoding="utf-8",
    )
    (notes / "bad.txt").write_bytes(b"caf\xe9")
    (notes / "blob.md").write_bytes(b"\x00\x01\x02")
    (notes / "empty.txt").write_bytes(b"")
    (notes / "dup.md").write_text("Garden: tomatoes in March.\r\n", encoding="utf-8")
    (notes / "song.mp3").write_bytes(b"ID3")
    return notes


def test_ingest_reports_and_exits_1_on_rejects(folder: Path) -> None:
    result = run("ingest", str(folder))
    assert result.exit_code == 1
    out = result.output
    assert f"rejected   {folder / 'bad.txt'}: invalid UTF-8 at byte offset 3 (e9)" in out
    assert f"rejected   {folder / 'blob.md'}: binary data, not text (NUL byte at offset 0)" in out
    assert f"rejected   {folder / 'empty.txt'}: empty, no text" in out
    assert f"rejected   {folder / 'c.jsonl'}:2: bad JSONL line: not valid JSON" in out
    assert f"skipped    {folder / 'song.mp3'}: extension .mp3 is not in ingest.extensions" in out
    assert out.strip().splitlines()[-1] == "4 added (4 examples), 1 duplicate, 4 rejected, 1 skipped"


def test_second_run_adds_nothing_and_says_so(folder: Path) -> None:
    run("ingest", str(folder))
    result = run("ingest", str(folder))
    assert result.exit_code == 1  # the bad files are still bad
    assert "0 added (0 examples), 5 duplicates" in result.output
    assert "(already stored: nothing new)" in result.output


def test_clean_ingest_exits_0_and_lists(folder: Path) -> None:
    result = run("ingest", "--list", str(folder / "a.md"), str(folder / "dup.md"))
    assert result.exit_code == 0, result.output
    assert f"added      {folder / 'a.md'}: document 1, 1 example" in result.output
    assert f"duplicate  {folder / 'dup.md'}: already stored as document 1" in result.output


def test_ingest_json_output(folder: Path) -> None:
    result = run("ingest", "--json", str(folder))
    report = json.loads(result.output)
    assert len(report["added"]) == 4
    assert {r["kind"] for r in report["rejected"]} == {"InvalidUtf8", "BinaryInput", "EmptyText", "BadJsonlLine"}


def test_ingest_missing_path_and_stdin(tmp_path: Path) -> None:
    result = run("ingest", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert f"rejected   {tmp_path / 'nope'}: no such file or folder" in result.output
    result = run("ingest", "-", "--source", "clipboard", input="pasted text\n")
    assert result.exit_code == 0, result.output
    assert "1 added" in result.output
    stats = json.loads(run("stats", "--json").output)
    assert [(s["name"], s["kind"]) for s in stats["sources"]] == [("clipboard", "stdin")]


def test_ingest_stdin_jsonl_and_binary() -> None:
    result = run("ingest", "-", "--stdin-format", "jsonl", input='{"text": "a"}\n{"text": "b"}\n')
    assert result.exit_code == 0 and "2 added" in result.output
    result = run("ingest", "-", input=b"\x00binary")
    assert result.exit_code == 1
    assert "rejected   <stdin>: binary data" in result.output


def test_ingest_needs_a_path() -> None:
    result = CliRunner().invoke(cli, ["ingest"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_size_limit_from_set_override(tmp_path: Path) -> None:
    f = tmp_path / "n.txt"
    f.write_text("x" * 2000, encoding="utf-8")
    result = run("--set", "ingest.max_document_bytes=1000", "ingest", str(f))
    assert result.exit_code == 1
    assert "too large: 2,000 bytes, the limit is 1,000 bytes (ingest.max_document_bytes)" in result.output


def test_stats_text_and_json(folder: Path) -> None:
    run("ingest", str(folder))
    text = run("stats").output
    assert "documents   4" in text
    assert "examples    4  (train " in text
    assert "journal" in text and str(folder) in text
    data = json.loads(run("stats", "--json").output)
    assert data["documents"] == 4 and data["examples"] == 4
    assert data["train_examples"] + data["validation_examples"] == 4
    assert data["untrained_examples"] == data["train_examples"]
    assert {s["name"]: s["documents"] for s in data["sources"]} == {str(folder): 2, "journal": 2}
    assert data["chars"] == sum(s["chars"] for s in data["sources"])


def test_stats_on_an_empty_store() -> None:
    result = run("stats")
    assert result.exit_code == 0
    assert "documents   0" in result.output


def test_forget_by_source_and_document(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run("ingest", str(folder))
    result = run("forget", "--source", "journal", "--json")
    assert result.exit_code == 0, result.output
    assert [d["id"] for d in json.loads(result.output)["documents"]] == [3, 4]
    run("ingest", str(folder))
    result = run("forget", "--source", "journal")
    assert result.exit_code == 0, result.output
    assert result.output.count("deleted document ") == 2
    assert result.output.strip().endswith("deleted 2 documents")
    result = run("forget", "--document", "1")
    assert "deleted document 1 (" in result.output and "deleted 1 document" in result.output
    data = json.loads(run("stats", "--json").output)
    assert data["documents"] == 1


def test_forget_errors_are_one_line(folder: Path) -> None:
    run("ingest", str(folder))
    result = run("forget", "--document", "999")
    assert result.exit_code == 1
    assert result.output.strip() == "pocketd: error: document '999': no such document"
    result = run("forget", "--source", "nowhere")
    assert result.output.strip() == "pocketd: error: source 'nowhere': no such source"
    result = CliRunner().invoke(cli, ["forget"])
    assert result.exit_code == 2 and "give --document ID or --source NAME" in result.output
    assert json.loads(run("stats", "--json").output)["documents"] == 4


def test_forget_without_checkpoints_touches_no_log(tmp_path) -> None:
    from pocketd.store import Store

    from pocketd.trainer.forget import forget_in_log

    with Store.open(tmp_path / "db.sqlite3") as store:
        done = forget_in_log(store, [1, 2])
        assert done.dropped == set() and not done.result.rebuilt
        assert store.log.list() == []


def test_demo_ingests_the_sample_and_prints_stats() -> None:
    result = run("demo")
    assert result.exit_code == 0, result.output
    assert "0 rejected, 0 skipped" in result.output
    assert "documents   " in result.output and "journal" in result.output
    sample = cli_data.sample_dir()
    n_files = len([p for p in sample.iterdir() if p.suffix in {".md", ".txt"}])
    n_records = sum(1 for line in (sample / "journal.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    assert n_files >= 10
    assert f"{n_files + n_records} added" in result.output
    again = run("demo")
    assert "0 added" in again.output and "nothing new" in again.output


def test_commands_use_the_configured_database(tmp_path: Path, folder: Path) -> None:
    data_dir = tmp_path / "elsewhere"
    result = run("--set", f"paths.data_dir={data_dir}", "ingest", str(folder / "a.md"))
    assert result.exit_code == 0
    assert (data_dir / "pocketd.sqlite3").exists()
    assert json.loads(run("stats", "--json").output)["documents"] == 0  # the default store is untouched


def test_a_long_run_lists_the_first_entries_and_says_how_many_more(tmp_path: Path) -> None:
    """The report keeps the first 1,000 entries of each kind (bounded memory); the rest are counted."""
    export = tmp_path / "export.jsonl"
    export.write_text("{oops\n" * 1050 + '{"text": "the one good line"}\n', encoding="utf-8")
    result = run("ingest", str(export))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert sum(line.startswith("rejected   ") for line in lines) == 1000
    assert lines[-1] == ("1 added (1 example), 0 duplicates, 1,050 rejected, 0 skipped "
                         "(listed: the first 1,000 of each kind; ... and 50 more rejected)")
    data = json.loads(run("ingest", "--json", str(export)).output)
    assert len(data["rejected"]) == 1000
    assert data["counts"] == {"added": 0, "duplicates": 1, "rejected": 1050, "skipped": 0, "examples": 0}
    assert data["omitted"]["rejected"] == 50
