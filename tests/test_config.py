"""Configuration: precedence (defaults < file < env < --set), errors naming the dotted field, config commands."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.daemon.config import ConfigError, default_config_path, load_config, validate_file
from pocketd.daemon.settings import PocketdConfig


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    loaded = load_config(environ={})
    assert loaded.path is None
    assert loaded.config.ingest.example_max_chars == PocketdConfig().ingest.example_max_chars
    assert loaded.origin("ingest.example_max_chars") == "default"


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", "[ingest]\nexample_max_chars = 200\nvalidation_percent = 5\nmax_document_bytes = 1000\n")
    env = {"POCKETD_INGEST__EXAMPLE_MAX_CHARS": "300", "POCKETD_INGEST__VALIDATION_PERCENT": "7"}
    loaded = load_config(f, environ=env, overrides={"ingest": {"example_max_chars": "400"}})
    ingest = loaded.config.ingest
    assert (ingest.max_document_bytes, ingest.validation_percent, ingest.example_max_chars) == (1000, 7, 400)
    assert loaded.origin("ingest.max_document_bytes") == "file"
    assert loaded.origin("ingest.validation_percent") == "env POCKETD_INGEST__VALIDATION_PERCENT"
    assert loaded.origin("ingest.example_max_chars") == "cli"
    assert loaded.origin("policy.max_load") == "default"


def test_precedence_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "c.toml", "[ingest]\nexample_max_chars = 200\nvalidation_percent = 5\n")
    monkeypatch.setenv("POCKETD_INGEST__EXAMPLE_MAX_CHARS", "300")
    result = CliRunner().invoke(cli, ["--config", str(f), "--set", "ingest.validation_percent=9", "config", "show"])
    assert result.exit_code == 0, result.output
    assert "example_max_chars = 300  # env POCKETD_INGEST__EXAMPLE_MAX_CHARS" in result.output
    assert "validation_percent = 9  # cli" in result.output


def test_default_file_location_is_under_the_isolated_home(isolated_home: Path) -> None:
    assert default_config_path().is_relative_to(isolated_home)


def test_env_picks_the_config_file(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", "[policy]\nmax_load = 3.5\n")
    loaded = load_config(environ={"POCKETD_CONFIG": str(f)})
    assert loaded.config.policy.max_load == 3.5 and loaded.path == f


def test_invalid_value_names_the_dotted_field_and_the_file(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", "[ingest]\nexample_max_chars = 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert f"ingest.example_max_chars (in {f}): Input should be greater than or equal to 64 (got 10)" in str(info.value)


def test_invalid_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.max_document_bytes \(from env POCKETD_INGEST__MAX_DOCUMENT_BYTES\)"):
        load_config(environ={"POCKETD_INGEST__MAX_DOCUMENT_BYTES": "lots"})


def test_invalid_cli_override_and_malformed_names() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.validation_percent \(from cli\): .*less than or equal to 50"):
        load_config(environ={}, overrides={"ingest": {"validation_percent": "90"}})
    with pytest.raises(ConfigError, match="POCKETD_INGEST_MAX: expected POCKETD_<SECTION>__<FIELD>"):
        load_config(environ={"POCKETD_INGEST_MAX": "1"})


def test_unknown_keys_and_sections_are_refused(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", "[ingest]\nexample_max_char = 300\n[ingestion]\nx = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    message = str(info.value)
    assert "ingest.example_max_char" in message and "unknown setting" in message
    assert "ingestion" in message and "unknown section" in message
    with pytest.raises(ConfigError, match=r"ingest\.nope \(from env POCKETD_INGEST__NOPE\): unknown setting"):
        load_config(environ={"POCKETD_INGEST__NOPE": "1"})


def test_bad_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path / "c.toml", "[ingest\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", environ={})


def test_extensions_are_normalized() -> None:
    loaded = load_config(environ={"POCKETD_INGEST__EXTENSIONS": '["TXT", ".Org"]'})
    assert loaded.config.ingest.extensions == [".txt", ".org"]


def test_config_check_command(tmp_path: Path) -> None:
    runner = CliRunner()
    good = write(tmp_path / "good.toml", "[ingest]\nexample_max_chars = 500\n")
    bad = write(tmp_path / "bad.toml", "[ingest]\nexample_max_chars = 5\n")
    assert runner.invoke(cli, ["config", "check", str(good)]).exit_code == 0
    result = runner.invoke(cli, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "pocketd: error: invalid configuration" in result.output
    assert "ingest.example_max_chars" in result.output


def test_config_init_writes_a_valid_private_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "conf" / "config.toml"
    result = runner.invoke(cli, ["config", "init", str(target)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert validate_file(target) == PocketdConfig()  # all commented out: the defaults

    target.write_text("# mine\n", encoding="utf-8")
    result = runner.invoke(cli, ["config", "init", str(target)])
    assert result.exit_code != 0
    assert "exists; use --force" in result.output
    assert target.read_text(encoding="utf-8") == "# mine\n"

    assert runner.invoke(cli, ["config", "init", "--force", str(target)]).exit_code == 0
    assert "[ingest]" in target.read_text(encoding="utf-8")


def test_config_init_default_location(isolated_home: Path) -> None:
    result = CliRunner().invoke(cli, ["config", "init"])
    assert result.exit_code == 0, result.output
    assert default_config_path().exists()
    assert default_config_path().is_relative_to(isolated_home)
