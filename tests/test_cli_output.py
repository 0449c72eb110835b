"""Issue 15, the CLI half: `--json` on every command that prints data, human output in 60 columns,
and a "not running" hint that names how the service was installed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import COMMAND_TABLE, cli, load_command
from pocketd.daemon.client import start_hint
from pocketd.daemon.statusfmt import WIDTH, fit, format_history, format_status
from pocketd.daemon.wire import SOCKET_NAME

from .test_cli_lazy import heavy_loaded, run_pocketd

# Every command that prints data (figures, reports, replies), as its words on the command line.
DATA_COMMANDS = [["status"], ["history"], ["pause"], ["resume"], ["train-now"], ["stop-training"], ["signal"],
                 ["shutdown"], ["stats"], ["ingest"], ["forget"], ["eval"], ["config", "show"],
                 ["config", "check"], ["checkpoint", "list"], ["checkpoint", "show"], ["checkpoint", "verify"],
                 ["checkpoint", "import"], ["checkpoint", "export"], ["train"], ["demo"], ["install-service"],
                 ["export"], ["generate"]]

LONG = "because the battery temperature 41.5 °C is above policy.max_battery_temp_c 40.0 °C"


def too_wide(text: str) -> list[str]:
    """Lines wider than WIDTH, but for one unbreakable word (a long path) on its own."""
    return [line for line in text.splitlines() if len(line) > WIDTH and len(line.strip().split()) > 1]


def resolve(words: list[str]) -> click.Command:
    command = load_command(words[0], COMMAND_TABLE[words[0]])
    for word in words[1:]:
        assert isinstance(command, click.Group)
        command = command.commands[word]
    return command


@pytest.mark.parametrize("words", DATA_COMMANDS, ids=" ".join)
def test_every_command_that_prints_data_has_json(words: list[str]) -> None:
    command = resolve(words)
    assert any("--json" in p.opts for p in command.params), f"pocketd {' '.join(words)} has no --json"


def test_config_show_json(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POCKETD_POLICY__MAX_LOAD", "3.5")
    result = CliRunner().invoke(cli, ["--set", "daemon.nice=7", "config", "show", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["file"] is None
    assert data["settings"]["policy"]["max_load"] == {"value": 3.5, "origin": "env POCKETD_POLICY__MAX_LOAD"}
    assert data["settings"]["daemon"]["nice"] == {"value": 7, "origin": "cli"}
    assert data["settings"]["daemon"]["request_timeout_s"]["origin"] == "default"


def make_checkpoints(note: str) -> None:
    from pocketd.daemon.config import load_config
    from pocketd.store import Store

    with Store.open(load_config().config.paths.database) as store:
        first = store.log.create(parent_id=None, method="mezo", base_fingerprint="base", spec={}, estimator={})
        store.log.create(parent_id=first, method="side", base_fingerprint="base", spec={}, estimator={}, note=note)


def test_checkpoint_list_json_and_60_columns(isolated_home: Path) -> None:
    make_checkpoints("imported from a-checkpoint-file-with-a-long-name.pocketd-ckpt " + LONG)
    result = CliRunner().invoke(cli, ["checkpoint", "list", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [(c["id"], c["parent_id"], c["status"], c["method"]) for c in listed] == [
        (1, None, "candidate", "mezo"), (2, 1, "candidate", "side")]
    text = CliRunner().invoke(cli, ["checkpoint", "list"], catch_exceptions=False).output
    assert text.splitlines()[0].split() == ["id", "status", "parent", "steps", "val", "loss", "created"]
    assert too_wide(text) == [], text


def test_stats_fit_60_columns(isolated_home: Path, tmp_path: Path) -> None:
    from pocketd.daemon.config import load_config
    from pocketd.store import Store

    with Store.open(load_config().config.paths.database) as store:
        for i, source in enumerate(["clipboard", "a-source-name-far-too-long-for-a-table-column-on-a-phone"]):
            for j in range(3):
                text = f"note {i} {j} " + "word " * 200
                store.docs.add_document(text, [text] * 400, source=source, source_kind="text")
    text = CliRunner().invoke(cli, ["stats"], catch_exceptions=False).output
    assert "clipboard" in text and "a-source-name-far-too-long" in text
    assert too_wide(text) == [], text


def test_status_and_history_fit_60_columns() -> None:
    status: dict[str, Any] = {
        "state": "training", "paused": False, "reasons": [],
        "training": {"session_id": 123, "trigger": "train-now", "pid": 4194304, "elapsed_s": 7000, "phase": "training",
                     "checkpoint_id": 10042, "step": 123456, "loss": 12.3456, "s_per_step": 123.4, "rss_mb": 12345.6,
                     "eta_s": 86000},
        "backoff": {"failures": 12, "remaining_s": 7200},
        "data": {"documents": 1234567, "examples": 12345678, "untrained_examples": 1234567},
        "checkpoint": {"id": 10041, "method": "side", "steps": 1234567, "val_loss": 3.0211},
        "last_session": {"id": 122, "started_at": "2025-01-01T10:00:00+00:00", "ended_at": "2025-01-01T11:00:00+00:00",
                         "end_reason": "stopped: " + LONG, "steps": 123456, "loss_first": 13.4, "loss_last": 12.2,
                         "promoted": False},
        "readings": {"now": "2025-01-01T11:00:00+00:00", "load1": 12.42, "available_mb": 123456.0,
                     "power": {"on_power": True, "percent": 100.0, "temperature_c": 41.5, "status": "NOT_CHARGING",
                               "has_battery": True}},
        "away": {"active": True, "expires_at": "2025-01-01T12:00:00+00:00"},
        "daemon": {"pid": 4194303, "uptime_s": 900000, "rss_mb": 123.4, "version": "0.1.0.dev1234+g0123abc"},
    }
    waiting = {**status, "state": "waiting", "training": None, "paused": True,
               "reasons": ["not charging", "load 12.42 > 1.50", LONG, "no new examples (0 < 1)"]}
    history = {
        "sessions": [{"id": 122, "started_at": "2025-01-01T10:00:00+00:00", "trigger": "train-now",
                      "end_reason": "killed by the system (phantom process killer): " + LONG, "steps": 123456,
                      "loss_first": 13.4, "loss_last": 12.2, "promoted": True, "peak_rss_mb": 12345.0}],
        "events": [{"at": "2025-01-01T10:30:00+00:00", "kind": "decision", "message": "waiting: " + LONG}],
    }
    for text in (format_status(status), format_status(waiting), format_history(history)):
        assert too_wide(text) == [], text
    assert "\n  " + LONG[:30] in format_status(waiting)  # one reason per line


def test_fit_keeps_short_lines_and_long_words() -> None:
    path = "/data/data/com.termux/files/home/" + "x" * 60
    assert fit(["short", "  " + "word " * 20, path]) == [
        "short", "  " + " ".join(["word"] * 11), "    " + " ".join(["word"] * 9), path]


# -- the not-running hint ----------------------------------------------------------------------------------------


def test_start_hint_names_the_installed_service(tmp_path: Path) -> None:
    home, prefix = tmp_path / "home", tmp_path / "usr"
    env = {"HOME": str(home), "PREFIX": str(prefix)}
    assert start_hint(env) == "pocketd run"
    unit = home / ".config" / "systemd" / "user" / "pocketd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    assert start_hint(env) == "systemctl --user start pocketd"
    assert start_hint({**env, "XDG_CONFIG_HOME": str(tmp_path / "elsewhere")}) == "pocketd run"
    assert start_hint({**env, "XDG_CONFIG_HOME": "relative"}) == "systemctl --user start pocketd"
    (prefix / "var" / "service" / "pocketd").mkdir(parents=True)
    assert start_hint(env) == "sv up pocketd"  # Termux's runit service
    assert start_hint({"PREFIX": "relative/usr"}) == "pocketd run"


@pytest.mark.parametrize(("install", "hint"), [
    (None, "pocketd run"),
    ("systemd", "systemctl --user start pocketd"),
    ("runit", "sv up pocketd"),
])
def test_not_running_names_how_to_start(tmp_path: Path, isolated_home: Path, install: str | None,
                                        hint: str) -> None:
    env = dict(os.environ, PREFIX=str(tmp_path / "usr"))
    if install == "systemd":
        unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "pocketd.service"
        unit.parent.mkdir(parents=True)
        unit.write_text("[Service]\n")
    elif install == "runit":
        (tmp_path / "usr" / "var" / "service" / "pocketd").mkdir(parents=True)
    code, out, err, modules = run_pocketd("status", env=env)
    sock = tmp_path / "run" / "pocketd" / SOCKET_NAME
    assert (code, out) == (3, "")
    assert err == f"pocketd: pocketd is not running (no socket at {sock}); start it with `{hint}`\n"
    assert heavy_loaded(modules) == []


def test_status_watch_streams_and_stays_light(tmp_path: Path, isolated_home: Path) -> None:
    """`pocketd status --watch` sends `watch` and prints each line; it loads only the client. (The fake
    daemon answers one line and closes, as a daemon that stops does: exit 1, saying so.)"""
    from .test_cli_lazy import FakeDaemon

    daemon = FakeDaemon(tmp_path / "run" / "pocketd" / SOCKET_NAME)
    try:
        code, out, err, modules = run_pocketd("status", "--watch", "--json")
    finally:
        daemon.close()
    assert daemon.requests == [{"cmd": "watch", "heartbeat_s": 15.0}]
    assert json.loads(out.splitlines()[0]) == {"ok": True}
    assert (code, err) == (1, "pocketd: error: pocketd closed the watch (the daemon stopped)\n")
    assert heavy_loaded(modules) == []


# -- --json of the commands that work on the store, the model and the service files ------------------------------


def invoke_json(*args: str, code: int = 0) -> Any:
    """Run `pocketd ARGS` in-process; its stdout must be one JSON document."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_config_check_json(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[daemon]\nnice = 5\n")
    assert invoke_json("config", "check", "--json", str(good)) == {"file": str(good), "ok": True}
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nnice = 'x'\n")
    result = CliRunner().invoke(cli, ["config", "check", "--json", str(bad)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("pocketd: error: ") and "daemon.nice" in result.stderr  # as without --json


def test_demo_json() -> None:
    data = invoke_json("demo", "--json")
    assert data["ingest"]["added"] and data["stats"]["documents"] > 0 and data["sample"]
    assert set(data["stats"]) >= {"documents", "examples", "database"}


def test_install_service_json(isolated_home: Path) -> None:
    unit = isolated_home / ".config/systemd/user/pocketd.service"
    planned = invoke_json("install-service", "--systemd", "--dry-run", "--json")
    assert planned["kind"] == "systemd" and planned["dry_run"] is True and not unit.exists()
    assert planned["files"][0]["path"] == str(unit) and "Type=notify" in planned["files"][0]["content"]
    done = invoke_json("install-service", "--systemd", "--json")
    assert done["files"][0] == {"path": str(unit), "status": "created", "action": "wrote", "mode": "0644",
                                "note": None}
    assert "systemctl --user enable --now pocketd" in done["next_steps"]
    unit.write_text("[Service]\n")
    result = CliRunner().invoke(cli, ["install-service", "--systemd", "--json"])
    assert result.exit_code == 1 and result.stdout == "" and "refusing to overwrite" in result.stderr


def test_train_and_checkpoint_commands_json(tmp_path: Path, tiny_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.trainer_helpers import fill_store

    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[trainer]\nmodel = "{tiny_model_dir}"\nbatch_size = 4\nseq_len = 32\nlr = 1e-3\nseed = 3\n'
        f'hash_every = 2\neval_examples = 16\n[paths]\ndata_dir = "{tmp_path / "data"}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'
    )
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    fill_store(tmp_path / "data" / "pocketd.sqlite3")
    out = invoke_json("train", "--steps", "2", "--json")
    assert out["steps"] == 2 and out["end_reason"] == "step budget reached" and out["checkpoint_id"] == 1
    assert out["evaluated"] is True and isinstance(out["promoted"], bool) and out["loss_first"] is not None
    verified = invoke_json("checkpoint", "verify", "1", "--json")
    assert verified["ok"] is True and verified["result"] == "ok" and verified["steps"] == 2
    assert invoke_json("checkpoint", "show", "1", "--json")["id"] == 1
    f = tmp_path / "ck.pkd"
    written = invoke_json("checkpoint", "export", "1", str(f), "--json")
    assert written == {"checkpoint_id": 1, "file": str(f), "bytes": f.stat().st_size}
    imported = invoke_json("checkpoint", "import", str(f), "--json")
    assert imported["checkpoint_id"] == 2 and imported["steps"] == 2 and imported["verified"] is True
    assert imported["promoted"] is False and imported["status"] == "rejected" and imported["reason"]
    result = CliRunner().invoke(cli, ["checkpoint", "import", str(tmp_path / "missing.pkd"), "--json"])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.startswith("pocketd: error: ")


def test_generate_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    from pocketd.trainer.generate import generate
    from pocketd.trainer.model import load_base

    tiny = load_base(str(tiny_model_dir), tmp_path / "cache")
    expected = generate(tiny.model, tiny.tokenizer, "hello", 6, 0.8, seed=4, top_p=0.5)
    data = invoke_json("--set", f"trainer.model={tiny_model_dir}", "generate", "hello", "--base", "--json",
                       "--max-tokens", "6", "--temperature", "0.8", "--seed", "4", "--top-p", "0.5")
    assert data["prompt"] == "hello" and data["completion"] == expected and data["checkpoint"] is None
    assert data["seed"] == 4 and 0 < data["tokens"]["completion"] <= 6 and data["tokens"]["prompt"] > 0


def test_export_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.test_export import make_current_checkpoint

    cache, data = tmp_path / "cache", tmp_path / "data"
    cid, _, _ = make_current_checkpoint(tiny_model_dir, cache, data)
    out = invoke_json("--set", f"trainer.model={tiny_model_dir}", "--set", "trainer.lora_rank=4",
                      "--set", f"paths.data_dir={data}", "--set", f"paths.cache_dir={cache}",
                      "export", "--adapter", str(tmp_path / "adapter"), "--json")
    assert out["kind"] == "adapter" and out["path"] == str(tmp_path / "adapter") and out["checkpoint"]["id"] == cid
    assert out["bytes"] == sum(p.stat().st_size for p in (tmp_path / "adapter").rglob("*") if p.is_file()) > 0
    assert "adapter_config.json" in out["files"]
