"""End to end: the real daemon, the real trainer child (`python -m pocketd.trainer`), the tiny model, a fake charger.

Plug in: training starts. Unplug: the trainer stops within one step plus a few
seconds, the log verifies, the daemon keeps running. SIGTERM: the daemon exits 0
and every committed step is still there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pocketd.daemon.client import request
from pocketd.daemon.service import socket_path_for
from pocketd.daemon.settings import PocketdConfig
from pocketd.store import Store
from pocketd.trainer.config import TrainerConfig
from pocketd.trainer.checkpoints import load_checkpoint

from tests.daemon_helpers import set_power, wait_for
from tests.trainer_helpers import fill_store


def test_plug_train_unplug_stop_sigterm(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    power = tmp_path / "power.json"
    set_power(power, False)
    settings = {
        "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(power),
        "POCKETD_DAEMON__STOP_GRACE_S": "30", "POCKETD_POLICY__MAX_LOAD": "1000",
        "POCKETD_POLICY__MIN_AVAILABLE_MB": "0", "POCKETD_POLICY__CHECK_INTERVAL_S": "1",
        "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0", "POCKETD_POLICY__COOLDOWN_MINUTES": "0",
        "POCKETD_TRAINER__MODEL": str(tiny_model_dir), "POCKETD_TRAINER__BATCH_SIZE": "4",
        "POCKETD_TRAINER__SEQ_LEN": "32", "POCKETD_TRAINER__HASH_EVERY": "1000",
        "POCKETD_TRAINER__EVAL_EXAMPLES": "8",
    }
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    config = PocketdConfig()
    fill_store(config.paths.database)
    sock = socket_path_for(config)
    proc = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run"], cwd=tmp_path, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        st = wait_for(lambda: sock.exists() and request(sock, "status"), timeout=30, what="the socket")
        wait_for(lambda: request(sock, "status")["state"] == "waiting", timeout=15, what="waiting")
        assert any("charging" in r or "power" in r for r in request(sock, "status")["reasons"])

        set_power(power, True)  # plug in
        wait_for(lambda: ((request(sock, "status").get("training") or {}).get("step") or 0) >= 3,
                 timeout=120, what="training to reach step 3")
        s_per_step = request(sock, "status")["training"]["s_per_step"] or 1.0

        set_power(power, False)  # unplug
        t0 = time.monotonic()
        wait_for(lambda: request(sock, "status")["training"] is None, timeout=30, what="training to stop")
        stopped_after = time.monotonic() - t0
        assert stopped_after < s_per_step + 10, f"stopped {stopped_after:.1f} s after unplug"

        st = request(sock, "status")
        assert st["ok"] and st["daemon"]["pid"] == proc.pid  # still running
        assert st["debug"]["torch_loaded"] is False
        last = st["last_session"]
        assert last["exit_status"] == 0 and "unplugged" in (last["end_reason"] or "")
        hist = request(sock, "history")
        assert hist["ok"]

        with Store.open(config.paths.database) as store:
            ck = store.log.list()[-1]
            n_steps = ck.n_steps
            assert n_steps >= 3 and max(store.log.hashes(ck.id)) == n_steps
            load_checkpoint(store, TrainerConfig(model=str(tiny_model_dir)), config.paths.cache_dir, ck.id,
                            verify=True)

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        with Store.open(config.paths.database) as store:
            assert store.log.get(ck.id).n_steps == n_steps  # nothing lost
            assert store.integrity_check() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
