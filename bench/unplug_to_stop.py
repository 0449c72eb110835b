"""Time from "charger unplugged" to "trainer stopped", through a real `pocketd run`.

    python bench/unplug_to_stop.py [--fake-trainer] [--steps 3] [--runs 1] [--smoke]

Starts a private daemon in a temporary home (fake charger plugged, the sample
corpus ingested with `pocketd demo`), waits until the trainer has done `--steps`
steps, unplugs the fake charger and measures until `status` no longer says
training. With the real trainer this includes one supervision tick (<= 2 s), the
power probe, and the trainer finishing its current step; the converted model is
cached in the real XDG cache dir so later runs load it quickly.
`--fake-trainer` uses tests/fake_trainer.py (no torch, 0.05 s steps).
`--smoke`: the real trainer on the tiny test model, unplugged after its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import ROOT

WAIT_S = 600.0  # for the first steps (--smoke: 120)


def one_run(fake: bool, steps: int, show_log: bool = False, model_dir: Path | None = None) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="pocketd-unplug-") as t:
        tmp = Path(t)
        home = benchlib.make_home(tmp)
        power = tmp / "power.json"
        settings = {**benchlib.fake_power_settings(power, True), "POCKETD_POLICY__MAX_LOAD": "100",
                    "POCKETD_TRAINER__BATCH_SIZE": "2", "POCKETD_TRAINER__MICRO_BATCH_SIZE": "2",
                    "POCKETD_TRAINER__SEQ_LEN": "64"}
        if model_dir is not None:
            settings.update(POCKETD_TRAINER__MODEL=str(model_dir), POCKETD_TRAINER__THREADS="1")
        # the real cache dir: the default model's converted copy is made once and kept
        cache_home = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
        env = benchlib.private_env(home, tmp / "run", cache_home=cache_home, **settings)
        benchlib.run_cli(env, "demo")
        extra = ["--trainer-command", f"{sys.executable} {ROOT / 'tests' / 'fake_trainer.py'} --step-s 0.05"] \
            if fake else []
        daemon = benchlib.Daemon(env, tmp / "daemon.log", extra_args=extra).start()
        try:
            return measure(daemon, power, steps)
        finally:
            daemon.stop(120)
            if show_log:
                print(daemon.log_tail(4000), file=sys.stderr)


def measure(daemon: benchlib.Daemon, power: Path, steps: int) -> dict[str, Any]:
    """Wait for `steps` steps, unplug, time until `status` no longer says training."""
    t0 = time.monotonic()

    def trained() -> dict[str, Any] | None:
        st = daemon.status() or {}
        if st.get("last_session"):
            raise SystemExit(f"the session ended before the unplug: {st['last_session']}")
        return st if st.get("state") == "training" and (st["training"]["step"] or 0) >= steps else None

    st = daemon.wait_or_exit(trained, WAIT_S, f"{steps} training steps", interval=0.2)
    to_training = time.monotonic() - t0
    s_per_step = st["training"]["s_per_step"]
    benchlib.set_power(power, False)
    t1 = time.monotonic()
    while daemon.request("status")["state"] == "training":
        time.sleep(0.05)
    stop_s = time.monotonic() - t1
    last = daemon.request("status")["last_session"]
    return {"start_to_step_s": round(to_training, 1), "s_per_step": s_per_step,
            "unplug_to_stopped_s": round(stop_s, 2), "end_reason": last["end_reason"],
            "exit_status": last["exit_status"], "steps": last["steps"], "peak_rss_mb": last["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake-trainer", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="steps to wait for before unplugging")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--log", action="store_true", help="print the end of the daemon's log after each run")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    model_dir = None
    with tempfile.TemporaryDirectory(prefix="pocketd-unplug-model-") as t:
        if args.smoke:
            global WAIT_S
            args.steps, args.runs, WAIT_S = 1, 1, 120.0
            model_dir = benchlib.tiny_model(Path(t) / "tiny-model", in_process=False)
        for i in range(args.runs):
            print(json.dumps({"run": i + 1, **one_run(args.fake_trainer, args.steps, args.log, model_dir)}))


if __name__ == "__main__":
    main()
