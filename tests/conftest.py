"""Shared fixtures: every test runs in a private temporary home and never touches the user's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch (OpenMP) thread in this process and every process a test starts (before torch is imported):
# the suite runs on two xdist workers beside daemons and trainers, and OpenMP threads that spin for a
# core another process holds make the tiny model's forwards 5-10x slower (tests/test_prefix.py: 74 s
# with the default two threads on a busy 2-core machine, 8 s with one). A test or config that sets
# trainer.threads still gets its own count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and never called) without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadgroup` (`make test`): one test per unit of work, except that a module defining a
    module-scoped fixture is one unit (tests/xdist_scheduling.py). Other --dist modes: xdist's own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.xdist_scheduling import make_scheduler

    return make_scheduler(config, log)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and the XDG dirs point into tmp_path; POCKETD_* variables are cleared."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var, sub in [("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share"),
                     ("XDG_CACHE_HOME", ".cache"), ("XDG_STATE_HOME", ".local/state")]:
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    for name in list(os.environ):
        if name.startswith("POCKETD_"):
            monkeypatch.delenv(name)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama model directory (trainer.tiny, seed 0), built once; tests must not modify it."""
    from pocketd.trainer.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)
