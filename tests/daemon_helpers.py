"""Helpers for the daemon tests: a config with a fake charger, the fake trainer command, waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pocketd.daemon.settings import DaemonConfig, PathsConfig, PocketdConfig, PolicyConfig

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
T = TypeVar("T")


def fake_trainer_command(*args: str) -> list[str]:
    return [sys.executable, str(FAKE_TRAINER), *args]


def set_power(path: Path, on_power: bool | None, percent: float = 90.0) -> None:
    """Plug or unplug the fake charger (atomically, as FakePowerProbe wants)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"on_power": on_power, "percent": percent}))
    os.replace(tmp, path)


def make_config(tmp_path: Path, *, policy: dict[str, Any] | None = None,
                daemon: dict[str, Any] | None = None) -> PocketdConfig:
    """Policy that only cares about the fake charger (load and memory waved through), short timeouts."""
    power = tmp_path / "power.json"
    if not power.exists():
        set_power(power, False)
    pol = {"max_load": 1000.0, "min_available_mb": 0, "check_interval_s": 1, "cooldown_minutes": 0,
           "min_new_examples": 1, "min_battery_percent": 0, **(policy or {})}
    dmn = {"power_probe": "fake", "fake_power_file": power, "stop_grace_s": 2.0, "request_timeout_s": 1.0,
           "nice": 5, **(daemon or {})}
    return PocketdConfig(daemon=DaemonConfig(**dmn), policy=PolicyConfig(**pol), paths=PathsConfig())


def add_examples(config: PocketdConfig, n: int = 3) -> None:
    from pocketd.store import Store

    with Store.open(config.paths.database) as store:
        for i in range(n):
            text = f"note {i}: the user writes about their day {time.time_ns()}"
            store.docs.add_document(text, [text], source="test", source_kind="text", validation_percent=0)


def wait_for(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DaemonFactory:
    """Builds in-process Daemons on the fake charger and fake trainer; shuts them all down at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.power = tmp_path / "power.json"
        self.made: list[Any] = []

    def __call__(self, *trainer_args: str, policy: dict[str, Any] | None = None,
                 daemon: dict[str, Any] | None = None, start: bool = True, **kwargs: Any) -> Any:
        from pocketd.daemon.service import Daemon

        config = make_config(self.tmp_path, policy=policy, daemon=daemon)
        kwargs.setdefault("supervise_interval_s", 0.2)
        d = Daemon(config, trainer_command=fake_trainer_command(*trainer_args), **kwargs)
        self.made.append(d)
        if start:
            d.start()
        return d

    def close(self) -> None:
        for d in self.made:
            d.shutdown()


def wait_until_training(daemon: "subprocess.Popen[bytes]", sock: Path, log_path: Path, *, timeout: float = 150,
                        fail_on_failed_session: bool = False) -> dict[str, Any]:
    """Poll a `pocketd run` child's status until its trainer has made a step; its status reply then.

    Fails the test (with the daemon log's tail) if the daemon exits, no step comes within `timeout`,
    or, with `fail_on_failed_session`, a session ends as failed first."""
    import pytest

    from pocketd.daemon.client import DaemonNotRunning, request

    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log_path.read_text()
        try:
            status = request(sock, "status")
        except DaemonNotRunning:
            status = {}
        if status.get("state") == "training" and (status["training"]["step"] or 0) >= 1:
            return status
        if fail_on_failed_session:
            assert not (status.get("last_session") or {}).get("end_reason", "").startswith("failed"), status
        time.sleep(0.3)
    pytest.fail(f"the daemon did not train within {timeout:.0f} s: {status}\n{log_path.read_text()[-3000:]}")
