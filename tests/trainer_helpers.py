"""Helpers for trainer tests: a store with notes and a job on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pocketd.store import Store
from pocketd.trainer.config import TrainerConfig
from pocketd.trainer.job import TrainingJob
from pocketd.trainer.session import SessionOutcome, run_session

NOTES = [
    "Planted tomatoes in the south bed today. The soil was still cold, so I covered them.",
    "Bike chain skipped again on the climb. Cleaned the cassette and adjusted the derailleur.",
    "Made sourdough with 75% hydration; the crumb was open but the crust too pale.",
    "Reading log: finished the book about lighthouses. Loved the chapter on fog signals.",
    "The apple tree has aphids. Tried soapy water; check again on Friday.",
    "Bread again: longer bake at 240 C gave a darker crust. Keep the lid on for 20 minutes.",
    "Rode 40 km along the river. New tyres feel faster; pressure 4.5 bar front, 5 rear.",
    "Garden: beans are up, lettuce bolted in the heat. Shade cloth next summer.",
    "Notes on fermentation: kimchi ready after five days on the counter.",
    "Fixed the squeaky brake by cleaning the rim and toeing in the pads.",
    "Picked the first strawberries. Birds got half of them; need a net.",
    "Started a new notebook for recipes that worked, with dates and oven settings.",
]


def fill_store(path: Path, notes: list[str] = NOTES, validation_percent: int = 25) -> None:
    with Store.open(path) as store:
        for text in notes:
            store.docs.add_document(text, [text], source="notes", source_kind="test",
                                    validation_percent=validation_percent)


def make_job(tmp: Path, model_dir: Path, **trainer: Any) -> TrainingJob:
    cfg = dict(model=str(model_dir), batch_size=4, seq_len=32, lr=1e-3, eps=1e-2, seed=7, hash_every=3,
               eval_examples=16)
    cfg.update(trainer)
    job_kw = {k: cfg.pop(k) for k in ("max_steps", "evaluate", "max_minutes", "memory_budget_mb") if k in cfg}
    job_kw.setdefault("max_steps", 5)
    job_kw.setdefault("memory_budget_mb", 8000)
    return TrainingJob(database=tmp / "data" / "db.sqlite3", cache_dir=tmp / "cache",
                       trainer=TrainerConfig(**cfg), **job_kw)


def run(job: TrainingJob, stop_after: int | None = None) -> SessionOutcome:
    stop = threading.Event()

    def on_status(s: Any) -> None:
        if stop_after is not None and s.phase == "training" and s.step >= stop_after:
            stop.set()

    return run_session(job, stop, on_status)


def start_trainer(job: TrainingJob, job_file: Path, until_step: int, timeout: float = 120) -> subprocess.Popen:
    """`python -m pocketd.trainer --job` in a child process, returned once its status file says it is training
    and has done `until_step` steps (the job needs a status_file). Fails the test if it never gets there."""
    import pytest

    job.write(job_file)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "pocketd.trainer", "--job", str(job_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert job.status_file is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.status_file.exists():
            try:
                status = json.loads(job.status_file.read_text())
            except ValueError:  # written atomically, but be lenient
                status = {}
            if status.get("phase") == "training" and status.get("step", 0) >= until_step:
                return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("trainer did not start training: " + proc.stdout.read().decode())


def side_cli_env(tmp: Path, model_dir: Path, monkeypatch: Any, part_lines: str) -> Path:
    """A config (method side with `part_lines`, tiny model, small batches) in POCKETD_CONFIG and a filled
    store under `tmp`; returns `tmp`."""
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'[trainer]\nmodel = "{model_dir}"\nmethod = "side"\n{part_lines}'
        f'side_lr = 1e-2\nbatch_size = 4\nseq_len = 32\nseed = 3\neval_examples = 16\n[paths]\n'
        f'data_dir = "{tmp / "data"}"\ncache_dir = "{tmp / "cache"}"\n'
    )
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    fill_store(tmp / "data" / "pocketd.sqlite3")
    return tmp


def invoke_cli(*args: str) -> tuple[int, str]:
    """`pocketd ARGS` in-process: (exit code, output)."""
    from click.testing import CliRunner

    from pocketd.daemon.cli import cli

    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output
