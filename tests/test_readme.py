"""The README's configuration reference names every setting, and its commands exist."""

from __future__ import annotations

from pathlib import Path

import click

from pocketd.daemon.cli import cli
from pocketd.daemon.settings import SECTIONS

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
    known = cli.list_commands(click.Context(cli))  # commands load lazily: cli.commands holds none
    unknown = sorted({c for c in lines if c not in known})
    assert unknown == []


def test_trainer_defaults_in_the_reference_are_the_real_ones():
    from enum import Enum

    from pocketd.trainer.config import TrainerConfig

    section = README[README.index("### [trainer]"):].split("\n### [")[0]
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in section.splitlines()
            if line.startswith("| `")}
    for name, field in TrainerConfig.model_fields.items():
        value = field.default.value if isinstance(field.default, Enum) else field.default
        shown = "unset" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"
        assert rows[name] == shown, f"trainer.{name}: README says {rows[name]}, the code {shown}"
