"""Time from "charger unplugged" to "trainer stopped", through a real `pocketd run`.

    python bench/unplug_to_stop.py [--fake-trainer] [--steps 3] [--runs 1]

Starts a private daemon in a temporary home (fake charger plugged, the sample
corpus ingested with `pocketd demo`), waits until the trainer has done `--steps`
steps, unplugs the fake charger and measures until `status` no longer says
training. With the real trainer this includes one supervision tick (<= 2 s), the
power probe, and the trainer finishing its current step; the converted model is
cached in the real XDG cache dir so later runs load it quickly.
`--fake-trainer` uses tests/fake_trainer.py (no torch, 0.05 s steps).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pocketd.daemon.client import DaemonNotRunning, request  # noqa: E402


def one_run(fake: bool, steps: int, show_log: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="pocketd-unplug-") as t:
        tmp = Path(t)
        home = tmp / "home"
        home.mkdir()
        (tmp / "run").mkdir(mode=0o700)
        power = tmp / "power.json"
        power.write_text(json.dumps({"on_power": True, "percent": 90}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETD_") and k != "NOTIFY_SOCKET"}
        env.update(
            HOME=str(home), XDG_RUNTIME_DIR=str(tmp / "run"), XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local/share"), XDG_STATE_HOME=str(home / ".local/state"),
            XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
            POCKETD_DAEMON__POWER_PROBE="fake", POCKETD_DAEMON__FAKE_POWER_FILE=str(power),
            POCKETD_POLICY__MAX_LOAD="100", POCKETD_TRAINER__BATCH_SIZE="2",
            POCKETD_TRAINER__MICRO_BATCH_SIZE="2", POCKETD_TRAINER__SEQ_LEN="64",
        )
        subprocess.run([sys.executable, "-m", "pocketd.daemon", "demo"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        argv = [sys.executable, "-m", "pocketd.daemon", "run"]
        if fake:
            argv += ["--trainer-command", f"{sys.executable} {ROOT / 'tests' / 'fake_trainer.py'} --step-s 0.05"]
        log_path = tmp / "daemon.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sock = tmp / "run" / "pocketd" / "pocketd.sock"
        try:
            t0 = time.monotonic()
            st: dict = {}
            while time.monotonic() - t0 < 600:
                try:
                    st = request(sock, "status")
                except DaemonNotRunning:
                    st = {}
                if st.get("state") == "training" and (st["training"]["step"] or 0) >= steps:
                    break
                if st.get("last_session"):
                    raise SystemExit(f"the session ended before the unplug: {st['last_session']}")
                time.sleep(0.2)
            else:
                raise SystemExit("no training within 600 s; see " + str(log_path))
            to_training = time.monotonic() - t0
            s_per_step = st["training"]["s_per_step"]
            power.write_text(json.dumps({"on_power": False, "percent": 90}))
            t1 = time.monotonic()
            while request(sock, "status")["state"] == "training":
                time.sleep(0.05)
            stop_s = time.monotonic() - t1
            last = request(sock, "status")["last_session"]
            return {"start_to_step_s": round(to_training, 1), "s_per_step": s_per_step,
                    "unplug_to_stopped_s": round(stop_s, 2), "end_reason": last["end_reason"],
                    "exit_status": last["exit_status"], "steps": last["steps"], "peak_rss_mb": last["peak_rss_mb"]}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            if show_log:
                print(log_path.read_text()[-4000:], file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake-trainer", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="steps to wait for before unplugging")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--log", action="store_true", help="print the end of the daemon's log after each run")
    args = parser.parse_args()
    for i in range(args.runs):
        print(json.dumps({"run": i + 1, **one_run(args.fake_trainer, args.steps, args.log)}))


if __name__ == "__main__":
    main()
