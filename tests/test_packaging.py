"""The wheel installs one import name, `pocketd`, and lives beside distributions that own the bare names."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # --no-build-isolation: the build backend (setuptools) comes from this venv, nothing is fetched.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, env=_pip_env(), cwd=build, timeout=300)
    (found,) = out.glob("pocketd-*.whl")
    return found


def test_the_wheel_has_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"pocketd"}
    # The four packages, the sample notes and the service files (from systemd_termux/, the one copy).
    for expected in ("pocketd/daemon/cli.py", "pocketd/trainer/__main__.py", "pocketd/store/db.py",
                     "pocketd/ingest/pipeline.py", "pocketd/systemd_termux/pocketd.service",
                     "pocketd/systemd_termux/sv/pocketd/run", "pocketd/systemd_termux/sv/pocketd/log/run",
                     "pocketd/systemd_termux/boot/start-pocketd"):
        assert expected in names, expected
    assert any(n.startswith("pocketd/ingest/sample/") for n in names)
    assert not any(n.startswith("pocketd/daemon/service_templates") for n in names)


def test_installs_beside_python_daemon(wheel: Path, tmp_path: Path) -> None:
    """python-daemon owns `import daemon`; pocketd must neither overwrite nor shadow it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q"]
    # The runtime dependencies (torch, transformers, ...) come from this venv through a .pth line, so
    # only the two distributions under test are installed into the new one. (A .pth line adds a folder
    # without running that folder's own .pth files, so this checkout's editable install stays out.)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_outer.pth").write_text(ours + "\n")
    try:
        subprocess.run([*pip, "python-daemon"], check=True, env=_pip_env(), timeout=300, capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"python-daemon is not installable here: {e.stderr.decode(errors='replace')[-300:]}")
    subprocess.run([*pip, str(wheel)], check=True, env=_pip_env(), timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import daemon, daemon.daemon, pocketd.daemon.cli as c; "
             "assert hasattr(daemon, 'DaemonContext'), daemon.__file__; "
             f"assert daemon.__file__.startswith({site!r}), daemon.__file__; "
             f"assert c.__file__.startswith({site!r}), c.__file__; print('ok')")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    version = subprocess.run([str(venv / "bin" / "pocketd"), "--version"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=120)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.startswith("pocketd, version "), version.stdout
    # Uninstalling pocketd leaves python-daemon's files alone.
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "pocketd"], check=True, env=_pip_env(),
                   timeout=120)
    again = subprocess.run([str(py), "-c", "import daemon; print(daemon.DaemonContext.__name__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.stdout.strip() == "DaemonContext", again.stderr[-2000:]
