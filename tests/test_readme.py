"""The README's configuration reference names every setting, and its commands exist."""

from __future__ import annotations

from pathlib import Path

from daemon.cli import cli
from daemon.settings import SECTIONS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_config_field_is_documented():
    reference = README[README.index("## Configuration reference"):]
    missing = [f"{sec}.{name}" for sec, model in SECTIONS.items() for name in model.model_fields
               if f"| `{name}` |" not in reference.split(f"### [{sec}]")[1].split("### [")[0]]
    assert missing == []


def test_documented_commands_exist():
    blocks = README.split("```")[1::2]  # the fenced code blocks
    lines = [line.split()[1] for b in blocks for line in b.splitlines() if line.startswith("pocketd ")]
    assert lines, "the README shows pocketd commands"
    unknown = sorted({c for c in lines if c not in cli.commands})
    assert unknown == []
