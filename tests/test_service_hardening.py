"""Issue 15, services: the systemd unit's sandbox and exposure score, runit's growing restart delay
(`finish`), and the Termux:Tasker scripts (rendered, run against a recording fake and the real CLI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.services import TASKER_SCRIPTS, install_service, render_service, writable_dirs
from pocketd.daemon.settings import PathsConfig

HAVE_ANALYZE = shutil.which("systemd-analyze") is not None
EXPOSURE_BEFORE = 9.8  # the unit as shipped before issue 15 (`systemd-analyze --user security`)
EXPOSURE_LIMIT = 2.0


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home, prefix, runtime = tmp_path / "h", tmp_path / "usr", tmp_path / "run-user"
    for d in (home, prefix, runtime):
        d.mkdir()
    runtime.chmod(0o700)
    return {"HOME": str(home), "PREFIX": str(prefix), "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime)}


def _paths(env: dict[str, str]) -> PathsConfig:
    home = Path(env["HOME"])
    return PathsConfig(data_dir=home / ".local/share/pocketd", cache_dir=home / ".cache/pocketd",
                       state_dir=home / ".local/state/pocketd", runtime_dir=Path(env["XDG_RUNTIME_DIR"]) / "pocketd")


def _unit(env: dict[str, str], tmp_path: Path, paths: PathsConfig | None = None) -> Path:
    (unit,) = render_service("systemd", env=env, pocketd_command=["/bin/true"], paths=paths or _paths(env))
    path = tmp_path / "pocketd.service"
    path.write_text(unit.content)
    return path


def test_the_unit_writes_only_pocketds_folders(env: dict[str, str], tmp_path: Path) -> None:
    text = _unit(env, tmp_path).read_text()
    home = env["HOME"]
    assert (f"ReadWritePaths=-{home}/.local/share/pocketd -{home}/.cache/pocketd -{home}/.local/state/pocketd"
            in text.splitlines())
    assert "RuntimeDirectory=pocketd" in text.splitlines()  # the socket's folder, made by systemd at each start
    other = PathsConfig(data_dir=tmp_path / "my data", cache_dir=tmp_path / "c", state_dir=tmp_path / "s",
                        runtime_dir=tmp_path / "sock")
    text = _unit(env, tmp_path, other).read_text()
    assert f'ReadWritePaths="-{tmp_path}/my data" -{tmp_path}/c -{tmp_path}/s -{tmp_path}/sock' in text.splitlines()
    assert "RuntimeDirectory=pocketd" not in text


def test_installing_the_unit_creates_the_writable_folders(env: dict[str, str]) -> None:
    paths = _paths(env)
    install_service("systemd", env=env, pocketd_command=["/bin/true"], paths=paths)
    for d in (paths.data_dir, paths.cache_dir, paths.state_dir):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700, d
    assert not paths.runtime_dir.exists()  # systemd's RuntimeDirectory
    assert writable_dirs(paths)[:3] == [paths.data_dir, paths.cache_dir, paths.state_dir]


@pytest.mark.skipif(not HAVE_ANALYZE, reason="systemd-analyze not installed")
def test_the_user_unit_verifies_and_scores_safe(env: dict[str, str], tmp_path: Path) -> None:
    path = _unit(env, tmp_path)
    run_env = {**os.environ, "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"]}
    res = subprocess.run(["systemd-analyze", "--user", "verify", str(path)], capture_output=True, text=True,
                         timeout=60, env=run_env)
    assert res.returncode == 0 and str(path) not in res.stderr, res.stderr
    res = subprocess.run(["systemd-analyze", "--user", "security", "--offline=true", str(path)], capture_output=True,
                         text=True, timeout=60, env=run_env)
    match = re.search(r"Overall exposure level for pocketd\.service: ([0-9.]+)", res.stdout)
    assert match, res.stdout + res.stderr
    score = float(match.group(1))
    print(f"systemd-analyze --user security: exposure {EXPOSURE_BEFORE} before issue 15, {score} now")
    assert score <= EXPOSURE_LIMIT


# -- runit: finish -----------------------------------------------------------------------------


class Finish:
    """The rendered `finish` in a service dir, with `date` and `sleep` faked (no waiting, an injected clock)."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        files = render_service("termux", env=env, pocketd_command=["/bin/true"], sh="/bin/sh")
        self.dir = tmp_path / "svc"
        self.dir.mkdir()
        self.script = self.dir / "finish"
        self.script.write_text(next(f.content for f in files if f.path.name == "finish"))
        self.script.chmod(0o755)
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        self.slept = tmp_path / "slept"
        self.now = tmp_path / "now"
        (self.bin / "sleep").write_text(f'#!/bin/sh\necho "$1" >> "{self.slept}"\n')
        (self.bin / "date").write_text(f'#!/bin/sh\ncat "{self.now}"\n')
        for f in self.bin.iterdir():
            f.chmod(0o755)

    def exit(self, status: str, *, started: int, now: int, sig: str = "") -> str:
        (self.dir / ".started").write_text(f"{started}\n")
        self.now.write_text(f"{now}\n")
        args = [status, sig] if sig else [status]
        res = subprocess.run([str(self.script), *args], cwd=self.dir, capture_output=True, text=True, timeout=10,
                             env={"PATH": f"{self.bin}:/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr
        return res.stdout

    def delays(self) -> list[int]:
        return [int(x) for x in self.slept.read_text().split()] if self.slept.exists() else []


def test_finish_doubles_the_delay_on_crashes_in_a_row(env: dict[str, str], tmp_path: Path) -> None:
    f = Finish(env, tmp_path)
    t = 1_000_000
    for _ in range(8):
        out = f.exit("1", started=t, now=t + 3)
        t += 100
    assert f.delays() == [2, 4, 8, 16, 32, 60, 60, 60]
    assert "crash 8 in a row: restarting in 60 s" in out
    f.exit("0", started=t, now=t + 5)  # a clean stop (`sv down`): no wait, the count starts again
    assert f.delays()[-1] == 60 and not (f.dir / ".crashes").exists()
    f.exit("1", started=t, now=t + 3)
    assert f.delays()[-1] == 2
    f.exit("-1", started=t, now=t + 3, sig="9")
    assert f.delays()[-1] == 4
    out = f.exit("1", started=t, now=t + 601)  # it ran 10 minutes before this crash: a new count
    assert f.delays()[-1] == 2 and "(status 1)" in out


@pytest.mark.skipif(shutil.which("runsv") is None, reason="runit not installed")
def test_finish_under_real_runsv(env: dict[str, str], tmp_path: Path) -> None:
    """A `run` that fails at once: runsv runs our finish between the attempts, which waits (2 s, then 4 s)."""
    f = Finish(env, tmp_path)
    (f.dir / "run").write_text(f'#!/bin/sh\ndate +%s > ./.started\necho x >> "{tmp_path}/runs"\nexit 1\n')
    (f.dir / "run").chmod(0o755)
    (f.bin / "sleep").unlink()  # the real sleep
    f.now.write_text("1000000\n")
    proc = subprocess.Popen(["runsv", str(f.dir)], env={"PATH": f"{f.bin}:/usr/bin:/bin"})
    try:
        from .daemon_helpers import wait_for

        wait_for(lambda: (tmp_path / "runs").exists() and len((tmp_path / "runs").read_text().split()) >= 2,
                 timeout=15, what="a restart after finish")
        assert (f.dir / ".crashes").read_text().strip() in {"1", "2"}
        # no third attempt yet: the second finish waits 4 s (runsv alone would have restarted every second)
        assert len((tmp_path / "runs").read_text().split()) == 2
    finally:
        subprocess.run(["sv", "exit", str(f.dir)], capture_output=True, timeout=10)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- Termux:Tasker -----------------------------------------------------------------------------------


def _tasker(env: dict[str, str], command: list[str]) -> dict[str, Path]:
    files = install_service("termux", env=env, pocketd_command=command, sh="/bin/sh")  # no Termux sh here
    return {f.path.name: f.path for f in files if f.path.parent.name == "tasker"}


@pytest.fixture
def recording_pocketd(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "pocketd-calls"
    fake = tmp_path / "fake-pocketd"
    fake.write_text(f'#!/bin/sh\n{{ printf "%s|" "$@"; echo; printf "stdin:"; [ "$2" = "--source" ] && cat; echo; }} '
                    f'>> "{calls}"\n')
    fake.chmod(0o755)
    return fake, calls


def test_tasker_scripts_call_the_cli(env: dict[str, str], recording_pocketd: tuple[Path, Path]) -> None:
    fake, calls = recording_pocketd
    scripts = _tasker(env, [str(fake)])
    assert sorted(scripts) == sorted(TASKER_SCRIPTS)
    home = Path(env["HOME"])
    assert all(p.parent == home / ".termux/tasker" and (p.stat().st_mode & 0o777) == 0o700 for p in scripts.values())

    def run(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(scripts[name]), *args], input=stdin, capture_output=True, text=True, timeout=10,
                              env={"PATH": "/usr/bin:/bin", "PREFIX": env["PREFIX"]})

    for name, args in (("pocketd-away", ()), ("pocketd-away", ("30",)), ("pocketd-back", ()),
                       ("pocketd-pause", ()), ("pocketd-resume", ()), ("pocketd-forget-source", ("shared",)),
                       ("pocketd-ingest-shared", ("a note from my phone",))):
        assert run(name, *args).returncode == 0, name
    assert run("pocketd-ingest-shared", stdin="shared through stdin\n").returncode == 0
    missing = run("pocketd-forget-source")
    assert missing.returncode == 2 and "give the source to forget" in missing.stderr
    lines = [line for line in calls.read_text().splitlines() if line not in ("", "stdin:")]
    assert lines == ["signal|--away|", "signal|--away|--for|30|", "signal|--back|", "pause|", "resume|",
                     "forget|--source|shared|", "ingest|--source|shared|-|", "stdin:a note from my phone",
                     "ingest|--source|shared|-|", "stdin:shared through stdin"]


def test_tasker_scripts_pass_the_sockets_errors_on(env: dict[str, str], tmp_path: Path) -> None:
    """With the real CLI and no daemon: exit status 3 and pocketd's own message, for Tasker's %result/%stderr."""
    scripts = _tasker(env, [sys.executable, "-m", "pocketd.daemon"])
    run_env = {**os.environ, "PREFIX": env["PREFIX"], "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"],
               "HOME": env["HOME"], "POCKETD_PATHS__RUNTIME_DIR": str(tmp_path / "no-daemon")}
    res = subprocess.run([str(scripts["pocketd-pause"])], capture_output=True, text=True, timeout=60, env=run_env)
    assert res.returncode == 3, res.stderr
    assert "pocketd is not running" in res.stderr


def test_install_service_termux_cli_installs_the_tasker_scripts(env: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pocketd.daemon.cli import cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    res = CliRunner().invoke(cli, ["install-service", "--termux"])
    assert res.exit_code == 0, res.output
    tasker = Path(env["HOME"]) / ".termux/tasker"
    assert sorted(p.name for p in tasker.iterdir()) == sorted(TASKER_SCRIPTS)
    assert "Termux:Tasker" in res.output
