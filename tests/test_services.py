"""Service files: the templates, rendering, installing into a temporary HOME/PREFIX, and the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.services import (
    TASKER_SCRIPTS,
    FileStatus,
    ServiceInstallError,
    ServiceKind,
    detect_service_kind,
    install_service,
    render_service,
)

REPO = Path(__file__).resolve().parents[1]
REPO_TEMPLATES = REPO / "systemd_termux"
CMD = ["/opt/pocketd/bin/pocketd"]


def _files(root: Path) -> dict[str, Path]:
    """The service files (the unit, sv/ and boot/), not the install-time scripts beside them."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
            and (p.parent != root or p.suffix == ".service")}


def test_the_installed_templates_are_the_repo_files() -> None:
    """One copy: the package data of `pocketd.systemd_termux` is the repo's `systemd_termux/` folder."""
    from pocketd.daemon.services import _templates_root

    repo, pkg = _files(REPO_TEMPLATES), _files(_templates_root(None))
    assert sorted(pkg) == sorted(repo)
    for rel, path in repo.items():
        assert path.read_bytes() == pkg[rel].read_bytes(), rel
        assert os.access(path, os.X_OK) == os.access(pkg[rel], os.X_OK), rel
    tasker = [f"tasker/{name}" for name in TASKER_SCRIPTS]
    assert sorted(repo) == sorted(["boot/start-pocketd", "pocketd.service", "sv/pocketd/down", "sv/pocketd/finish",
                                   "sv/pocketd/log/run", "sv/pocketd/run", *tasker])
    for script in ("boot/start-pocketd", "sv/pocketd/log/run", "sv/pocketd/run", "sv/pocketd/finish", *tasker):
        assert os.access(repo[script], os.X_OK), f"{script} should be executable in the repo"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home, prefix = tmp_path / "h", tmp_path / "usr"
    home.mkdir()
    prefix.mkdir()
    return {"HOME": str(home), "PREFIX": str(prefix), "PATH": "/usr/bin:/bin"}


def test_systemd_dry_run_content(env: dict[str, str]) -> None:
    files = install_service("systemd", dry_run=True, env=env, pocketd_command=CMD, memory_budget_mb=1024,
                            stop_grace_s=45)
    assert [(f.path, f.mode, f.status) for f in files] == [
        (Path(env["HOME"]) / ".config/systemd/user/pocketd.service", 0o644, FileStatus.CREATED)]
    unit = files[0].content
    for line in ["Type=notify", "ExecStart=/opt/pocketd/bin/pocketd run", "Restart=on-failure", "RestartSec=30",
                 "Nice=10", "IOSchedulingClass=idle", "MemoryMax=1280M", "Environment=HF_HUB_OFFLINE=1",
                 "TimeoutStopSec=75", "WantedBy=default.target",
                 # issue 15: OOM kills of the trainer are the daemon's business; the lowest CPU weight; no network
                 "OOMPolicy=continue", "CPUWeight=idle", "RestrictAddressFamilies=AF_UNIX", "NoNewPrivileges=yes",
                 "UMask=0077", "ProtectSystem=strict", "ProtectHome=read-only", "PrivateNetwork=yes"]:
        assert line in unit.splitlines(), line
    assert not re.search(r"@[A-Z_]+@", unit)
    assert not files[0].path.exists()  # dry run writes nothing


def test_systemd_honours_xdg_config_home(env: dict[str, str], tmp_path: Path) -> None:
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    (f,) = render_service(ServiceKind.SYSTEMD, env=env, pocketd_command=CMD)
    assert f.path == tmp_path / "xdg/systemd/user/pocketd.service"


def test_termux_render(env: dict[str, str]) -> None:
    files = {f.path: f for f in render_service("termux", env=env, pocketd_command=CMD)}
    prefix, home = Path(env["PREFIX"]), Path(env["HOME"])
    svc = prefix / "var/service/pocketd"
    tasker = {home / ".termux/tasker" / name for name in TASKER_SCRIPTS}
    assert set(files) == {svc / "run", svc / "log/run", svc / "finish", svc / "down",
                          home / ".termux/boot/start-pocketd", *tasker}
    run = files[svc / "run"].content
    assert run.startswith(f"#!{prefix}/bin/sh\n")
    assert "exec 2>&1\n" in run and run.rstrip().endswith("exec /opt/pocketd/bin/pocketd run")
    assert f'export PREFIX="${{PREFIX:-{prefix}}}"' in run and "TZ" in run and f"{home}" in run
    log_run = files[svc / "log/run"].content
    assert "svlogd -tt" in log_run and "var/log/sv/pocketd" in log_run and "mkdir -p" in log_run
    assert files[svc / "down"].content == "" and files[svc / "down"].mode == 0o644
    boot = files[home / ".termux/boot/start-pocketd"].content
    # issue 15: no wake lock held from boot on (pocketd holds one only while a session trains)
    assert "termux-wake-lock\n" not in boot and '. "$PREFIX/etc/profile"' in boot and "sv up pocketd" in boot
    for f in files.values():
        assert "@" not in f.content
        if f.content.startswith("#!"):
            assert f.mode == (0o700 if f.path in tasker else 0o755)
            res = subprocess.run(["sh", "-n"], input=f.content, text=True, capture_output=True)
            assert res.returncode == 0, (f.path, res.stderr)


def test_command_quoting(env: dict[str, str]) -> None:
    cmd = ["/home/me/my venv/bin/python", "-m", "pocketd.daemon"]
    run = next(f for f in render_service("termux", env=env, pocketd_command=cmd) if f.path.name == "run"
               and f.path.parent.name == "pocketd").content
    assert "exec '/home/me/my venv/bin/python' -m pocketd.daemon run" in run
    (unit,) = render_service("systemd", env=env, pocketd_command=cmd)
    assert 'ExecStart="/home/me/my venv/bin/python" -m pocketd.daemon run' in unit.content


def test_termux_needs_prefix(env: dict[str, str]) -> None:
    del env["PREFIX"]
    with pytest.raises(ServiceInstallError, match="PREFIX"):
        install_service("termux", env=env, pocketd_command=CMD)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_install_modes_idempotence_and_refusal(env: dict[str, str]) -> None:
    files = install_service("termux", env=env, pocketd_command=CMD)
    assert all(f.status is FileStatus.CREATED for f in files)
    for f in files:
        assert f.path.read_text() == f.content
        private = f.path.parent.name == "tasker"
        assert _mode(f.path) == (0o700 if private else 0o755 if f.content.startswith("#!") else 0o644)
    run = next(f.path for f in files if f.path.name == "run" and f.path.parent.name == "pocketd")

    # again: unchanged; a mode that drifted is repaired
    run.chmod(0o700)
    again = install_service("termux", env=env, pocketd_command=CMD)
    assert {f.path.name: f.status for f in again}["start-pocketd"] is FileStatus.UNCHANGED
    assert _mode(run) == 0o755

    # a differing file is refused, and nothing at all is written
    run.write_text("#!/bin/sh\nexec my-own-thing\n")
    boot = Path(env["HOME"]) / ".termux/boot/start-pocketd"
    boot.unlink()
    with pytest.raises(ServiceInstallError, match="refusing to overwrite.*--force"):
        install_service("termux", env=env, pocketd_command=CMD)
    assert run.read_text() == "#!/bin/sh\nexec my-own-thing\n" and not boot.exists()
    dry = install_service("termux", dry_run=True, env=env, pocketd_command=CMD)
    assert {f.path: f.status for f in dry}[run] is FileStatus.CONFLICT

    # --force overwrites
    forced = install_service("termux", force=True, env=env, pocketd_command=CMD)
    assert {f.path: f.status for f in forced}[run] is FileStatus.UPDATED
    assert "exec /opt/pocketd/bin/pocketd run" in run.read_text() and boot.exists()


def test_reinstall_keeps_an_enabled_service_enabled(env: dict[str, str]) -> None:
    install_service("termux", env=env, pocketd_command=CMD)
    down = Path(env["PREFIX"]) / "var/service/pocketd/down"
    assert down.exists()
    down.unlink()  # what `sv-enable pocketd` does
    files = install_service("termux", env=env, pocketd_command=CMD)
    assert {f.path: f.status for f in files}[down] is FileStatus.SKIPPED
    assert not down.exists()


def test_symlinked_log_run_is_a_conflict(env: dict[str, str], tmp_path: Path) -> None:
    """termux-services links log/run to its svlogger; we do not silently replace it."""
    log_run = Path(env["PREFIX"]) / "var/service/pocketd/log/run"
    log_run.parent.mkdir(parents=True)
    (tmp_path / "svlogger").write_text("#!/bin/sh\n")
    log_run.symlink_to(tmp_path / "svlogger")
    with pytest.raises(ServiceInstallError):
        install_service("termux", env=env, pocketd_command=CMD)
    install_service("termux", force=True, env=env, pocketd_command=CMD)
    assert not log_run.is_symlink() and "svlogd" in log_run.read_text()
    assert (tmp_path / "svlogger").read_text() == "#!/bin/sh\n"


def test_detect_service_kind(tmp_path: Path) -> None:
    assert detect_service_kind({"PREFIX": "/data/data/com.termux/files/usr"}) is ServiceKind.TERMUX
    assert detect_service_kind({"PATH": str(tmp_path)}) is ServiceKind.SYSTEMD
    fake = tmp_path / "termux-battery-status"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert detect_service_kind({"PATH": str(tmp_path)}) is ServiceKind.TERMUX


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(env: dict[str, str], tmp_path: Path) -> None:
    """systemd-analyze (system mode: needs no user manager) knows every key and value in the unit."""
    (unit,) = render_service("systemd", env=env, pocketd_command=["/bin/true"])
    path = tmp_path / "pocketd.service"
    path.write_text(unit.content)
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=30)
    complaints = [line for line in res.stderr.splitlines() if str(path) in line]
    assert res.returncode == 0 and not complaints, res.stderr


# -- the command -----------------------------------------------------------------------------


def _invoke(*args: str) -> tuple[int, str]:
    from pocketd.daemon.cli import cli

    res = CliRunner().invoke(cli, ["install-service", *args])
    return res.exit_code, res.output


def test_cli_systemd(isolated_home: Path) -> None:
    code, out = _invoke("--systemd", "--dry-run")
    assert code == 0, out
    unit = isolated_home / ".config/systemd/user/pocketd.service"
    assert f"would write: {unit}" in out and "Type=notify" in out and "MemoryMax=1792M" in out
    assert not unit.exists()
    code, out = _invoke("--systemd")
    assert code == 0 and f"wrote: {unit}  [mode 0644]" in out
    assert "systemctl --user enable --now pocketd" in out
    unit.write_text("[Service]\n")
    code, out = _invoke("--systemd")
    assert code == 1 and "refusing to overwrite" in out
    code, out = _invoke("--systemd", "--force")
    assert code == 0 and "overwrote" in out


def test_cli_termux_autodetect(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = tmp_path / "data/data/com.termux/files/usr"
    prefix.mkdir(parents=True)
    monkeypatch.setenv("PREFIX", str(prefix))
    code, out = _invoke()
    assert code == 0, out
    assert "# termux service" in out and "Next: sv-enable pocketd" in out
    assert (prefix / "var/service/pocketd/run").exists()
    assert (isolated_home / ".termux/boot/start-pocketd").exists()
