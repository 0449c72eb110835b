"""File modes: everything pocketd creates is private (files 0600, directories 0700), under umask 022.

A realistic run through the real CLI (each step its own process, umask 022 so that a file
created without an explicit mode would come out 0644): `config init`, ingest, a few
training steps on the tiny model, a checkpoint export, a merged and an adapter model
export, and a `pocketd run` daemon that trains (its socket, lock, job, status and pid
files) and is paused (its marker file). The trees are walked while the daemon trains and
again after it stopped; every offender is listed.

pocketd writes no log file of its own: the daemon logs to stdout, which the service manager
(journald, svlogd) stores; the tests here redirect it to a file of their own.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_helpers import wait_until_training

ROOT = Path(__file__).resolve().parent.parent
UMASK = 0o022

# Generic parents that pocketd may create on the way to its own folders (mkdir -p semantics),
# relative to HOME; pocketd's folders below them are checked, these are not its data.
XDG_PARENTS = {".config", ".local", ".local/share", ".local/state", ".cache"}


def modes_under(root: Path, skip: set[Path]) -> dict[Path, int]:
    """path -> st_mode (lstat) of everything under root (root included unless skipped)."""
    found: dict[Path, int] = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *dirnames, *filenames]:
            p = Path(dirpath) if name is None else Path(dirpath) / name
            if p in skip or (name is None and Path(dirpath) != root):
                continue
            try:
                found[p] = os.lstat(p).st_mode
            except FileNotFoundError:  # a status file replaced while we walk
                pass
    return found


def offenders(found: dict[Path, int]) -> list[str]:
    bad = []
    for p, mode in sorted(found.items()):
        perm = stat.S_IMODE(mode)
        if stat.S_ISDIR(mode):
            want = 0o700
        elif stat.S_ISREG(mode) or stat.S_ISSOCK(mode):
            want = 0o600
        else:
            bad.append(f"{p}: unexpected file type {stat.filemode(mode)}")
            continue
        if perm != want:
            bad.append(f"{p}: {perm:04o} (want {want:04o})")
    return bad


def pocketd(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pocketd.daemon", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, umask=UMASK)
    assert proc.returncode == 0, f"pocketd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_everything_pocketd_creates_is_private(tmp_path: Path, isolated_home: Path, tiny_model_dir: Path) -> None:
    home = isolated_home
    run_dir = Path(os.environ["XDG_RUNTIME_DIR"])
    assert not any(home.iterdir())  # so everything found below HOME was made by this run
    power = tmp_path / "power.json"
    power.write_text(json.dumps({"on_power": True, "percent": 90}))
    env = {
        **os.environ,
        "POCKETD_TRAINER__MODEL": str(tiny_model_dir), "POCKETD_TRAINER__THREADS": "1",
        "POCKETD_TRAINER__BATCH_SIZE": "2", "POCKETD_TRAINER__MICRO_BATCH_SIZE": "2",
        "POCKETD_TRAINER__SEQ_LEN": "32", "POCKETD_TRAINER__EVAL_EXAMPLES": "4",
        "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(power),
        "POCKETD_POLICY__MAX_LOAD": "1000", "POCKETD_POLICY__MIN_AVAILABLE_MB": "0",
        "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0", "POCKETD_POLICY__COOLDOWN_MINUTES": "0",
        "POCKETD_POLICY__CHECK_INTERVAL_S": "1",
    }
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(12):
        (notes / f"note-{i:02d}.txt").write_text(f"Day {i}: watered the beans, {i * 3} new pods, "
                                                 f"the cat slept on the tomato seedlings again.\n")
    exports = tmp_path / "exports"  # the user's folder; what pocketd writes into it is checked
    exports.mkdir()

    old_umask = os.umask(UMASK)
    try:
        pocketd(env, "config", "init")
        pocketd(env, "ingest", str(notes))
        pocketd(env, "train", "--steps", "3")
        pocketd(env, "checkpoint", "export", "1", str(exports / "ck1.pkd"))
        pocketd(env, "export", "--merged", str(exports / "merged"))
        pocketd(env, "export", "--adapter", str(exports / "adapter"))

        seen: dict[Path, int] = {}
        skip = {home, run_dir, *(home / p for p in XDG_PARENTS)}
        log_path = tmp_path / "daemon.log"
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run"], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, umask=UMASK)
        sock = run_dir / "pocketd" / "pocketd.sock"
        try:
            wait_until_training(daemon, sock, log_path)
            jobs = sorted(p.name for p in (home / ".local/state/pocketd/jobs").iterdir())
            assert any(n.endswith(".job.json") for n in jobs) and any(n.endswith(".status.json") for n in jobs), jobs
            seen.update(modes_under(home, skip) | modes_under(run_dir, skip))  # while training
            pocketd(env, "pause")
            seen.update(modes_under(home, skip) | modes_under(run_dir, skip))  # with the paused marker
            assert (home / ".local/state/pocketd/paused").exists()
            pocketd(env, "resume")
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(120) == 0, log_path.read_text()[-3000:]
        seen.update(modes_under(home, skip) | modes_under(run_dir, skip))  # after the daemon stopped
    finally:
        os.umask(old_umask)
    seen.update({p: os.lstat(p).st_mode for p in (exports / "ck1.pkd",)})
    seen.update(modes_under(exports / "merged", set()) | modes_under(exports / "adapter", set()))

    names = {str(p.relative_to(tmp_path)) for p in seen}
    for expected in ("home/.config/pocketd/config.toml", "home/.local/share/pocketd/pocketd.sqlite3",
                     "home/.local/share/pocketd", "home/.local/state/pocketd/jobs", "home/.local/state/pocketd/paused",
                     "home/.cache/pocketd", "run/pocketd/pocketd.sock", "run/pocketd/pocketd.lock",
                     "exports/ck1.pkd", "exports/merged", "exports/merged/model.safetensors",
                     "exports/adapter", "exports/adapter/adapter_config.json"):
        assert expected in names, (expected, sorted(names))
    assert any(n.endswith(".status.json") for n in names) and any(n.endswith(".pid") for n in names)
    assert any(n.endswith("-wal") for n in names), sorted(names)  # SQLite's side files too
    bad = offenders(seen)
    assert not bad, "not private:\n" + "\n".join(bad)
    assert {p.name for p in home.iterdir()} <= {".config", ".local", ".cache"}, sorted(home.iterdir())


def test_modes_under_reports_loose_files_and_dirs(tmp_path: Path) -> None:
    tmp_path = tmp_path / "t"
    tmp_path.mkdir(mode=0o700)
    old = os.umask(UMASK)
    try:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "f").write_text("x")
        (tmp_path / "ok").mkdir(mode=0o700)
        (tmp_path / "ok" / "g").touch(mode=0o600)
    finally:
        os.umask(old)
    bad = offenders(modes_under(tmp_path, {tmp_path}))
    assert bad == [f"{tmp_path / 'd'}: 0755 (want 0700)", f"{tmp_path / 'd' / 'f'}: 0644 (want 0600)"]
