"""pocketd needs neither hf_xet nor the other distributions the Termux install leaves out.

huggingface_hub requires hf-xet (a Rust extension with no Termux build) on aarch64, but only to
download; pocketd never downloads. systemd_termux/termux-install.sh therefore installs
huggingface_hub with --no-deps and leaves hf-xet out, together with kernels, typer, requests,
fsspec and networkx (see systemd_termux/requirements-termux.txt). Here every process of an
ingest, a short training session, a daemon that starts training and a `status` runs with those
modules made unimportable by a meta-path blocker in a sitecustomize first on PYTHONPATH; each
import attempt is logged (and must not break anything). The same sitecustomize records, at exit,
every top-level module each process imported: all of them must belong to the standard library,
to pocketd, or to a distribution the Termux install provides.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_helpers import wait_until_training

ROOT = Path(__file__).resolve().parent.parent
TERMUX = ROOT / "systemd_termux"
LEFT_OUT = ("hf_xet", "kernels", "typer", "requests", "fsspec", "networkx")
# From Termux's pkg (termux-packages: python-torch, python-numpy, python-psutil, python-pip; TUR: python-tokenizers).
FROM_PKG = {"torch", "numpy", "psutil", "pip", "tokenizers"}

BLOCKER = r'''
"""Written by tests/test_no_hf_xet.py: some distributions are not installed, as on Termux."""
import atexit, builtins, os, sys, traceback

_BLOCKED = tuple(os.environ["NO_XET_BLOCKED"].split(","))
_LOG = os.environ["NO_XET_ATTEMPTS"]
_MODULES = os.environ["NO_XET_MODULES"]


def _argv():
    return " ".join(getattr(sys, "orig_argv", None) or sys.argv or ["?"]).replace("\n", " ")[:200]


# As if not installed: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") is None
# (how transformers and huggingface_hub probe optional packages). Import statements are logged.
for _name in _BLOCKED:
    sys.modules[_name] = None
_import = builtins.__import__


def _logging_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in _BLOCKED:
        with open(_LOG, "a") as f:
            stack = "".join(traceback.format_stack()[:-1][-6:])
            f.write(f"--- pid {os.getpid()} ({_argv()}): import {name}\n{stack}")
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _logging_import


def _dump():
    names = sorted({m.split(".")[0] for m, v in list(sys.modules.items()) if v is not None})
    with open(_MODULES, "a") as f:
        f.write(json.dumps({"argv": _argv(), "modules": names}) + "\n")


import json
atexit.register(_dump)
'''


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def termux_distributions() -> set[str]:
    """Every distribution the Termux install provides (normalized names), pocketd included."""
    names = set(FROM_PKG) | {"pocketd"}
    for f in ("requirements-termux.txt", "requirements-termux-build.txt"):
        names |= requirement_names(TERMUX / f)
    return names


@pytest.fixture
def no_xet_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "no-xet-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
               NO_XET_BLOCKED=",".join(LEFT_OUT), NO_XET_ATTEMPTS=str(tmp_path / "attempts.log"),
               NO_XET_MODULES=str(tmp_path / "modules.jsonl"), PYTHONDONTWRITEBYTECODE="1")
    # transformers 5 loads models with hub kernels unless USE_HUB_KERNELS=NO; pocketd.trainer sets it
    # itself (the service runs without the Makefile), so the test must not.
    env.pop("USE_HUB_KERNELS", None)
    return env


def run_pocketd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pocketd.daemon", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"pocketd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_blocker_makes_hf_xet_unimportable(no_xet_env: dict[str, str]) -> None:
    code = ("import importlib.util\n"
            "for name in ('hf_xet', 'requests'):\n"
            "    assert importlib.util.find_spec(name) is None\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ModuleNotFoundError:\n"
            "        print(name, 'missing')\n")
    out = subprocess.run([sys.executable, "-c", code], env=no_xet_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["hf_xet missing", "requests missing"], out.stdout
    assert "import hf_xet" in Path(no_xet_env["NO_XET_ATTEMPTS"]).read_text()


def test_ingest_train_run_status_without_hf_xet(tmp_path: Path, no_xet_env: dict[str, str],
                                                tiny_model_dir: Path) -> None:
    power = tmp_path / "power.json"
    power.write_text(json.dumps({"on_power": True, "percent": 90}))
    env = {**no_xet_env,
           "POCKETD_TRAINER__MODEL": str(tiny_model_dir), "POCKETD_TRAINER__THREADS": "1",
           "POCKETD_TRAINER__BATCH_SIZE": "2", "POCKETD_TRAINER__MICRO_BATCH_SIZE": "2",
           "POCKETD_TRAINER__SEQ_LEN": "32", "POCKETD_TRAINER__EVAL_EXAMPLES": "4",
           "POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(power),
           "POCKETD_POLICY__MAX_LOAD": "1000", "POCKETD_POLICY__MIN_AVAILABLE_MB": "0",
           "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0", "POCKETD_POLICY__COOLDOWN_MINUTES": "0",
           "POCKETD_POLICY__CHECK_INTERVAL_S": "1"}
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(10):
        (notes / f"note-{i}.md").write_text(f"# Day {i}\n\nI watered the basil {i} times and fixed the bike.\n")

    run_pocketd(env, "ingest", str(notes))
    trained = run_pocketd(env, "train", "--steps", "2")
    assert "2 steps" in trained.stdout, trained.stdout

    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    sock = tmp_path / "run" / "pocketd" / "pocketd.sock"
    try:
        wait_until_training(daemon, sock, log_path, fail_on_failed_session=True)
        shown = json.loads(run_pocketd(env, "status", "--json").stdout)
        assert shown["ok"] and shown["state"] == "training", shown
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
    assert code == 0, log_path.read_text()[-3000:]

    runs = [json.loads(line) for line in Path(env["NO_XET_MODULES"]).read_text().splitlines()]
    argvs = [r["argv"] + " " for r in runs]
    for needle in (" ingest ", " train ", " run ", " status ", "-m pocketd.trainer --job"):
        assert any(needle in a for a in argvs), (needle, argvs)  # every process ran with the blocker
    imported = set().union(*(r["modules"] for r in runs))
    assert not imported & set(LEFT_OUT), imported & set(LEFT_OUT)
    assert "torch" in imported and "transformers" in imported and "safetensors" in imported

    # Every imported top-level module is stdlib, pocketd's, or from a distribution the Termux install has.
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    allowed = termux_distributions()
    foreign = {}
    for name in sorted(imported - set(sys.stdlib_module_names) - {"sitecustomize", "_distutils_hack"}):
        dists = {d.lower().replace("_", "-") for d in owners.get(name, [])}
        if name != "pocketd" and dists and not dists & allowed:
            foreign[name] = sorted(dists)
    assert not foreign, f"imported, but not installed on Termux: {foreign}"
