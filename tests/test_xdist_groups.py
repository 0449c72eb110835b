"""`make test` runs the suite on pytest-xdist workers (-n 2 --dist loadgroup): a module that defines a
module-scoped fixture runs on one worker, so the fixture is built once; every other test is free to go
to either worker (tests/xdist_scheduling.py, wired in tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.xdist_scheduling import defines_shared_fixture, unit_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RECORD = '''
import json, os
from pathlib import Path

import pytest


def record(**fields):
    with Path(os.environ["XDIST_GROUPS_LOG"]).open("a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), **fields}) + "\\n")
'''

SHARED = RECORD + '''

@pytest.fixture(scope="module")
def shared():
    record(built="shared")
    return object()


@pytest.mark.parametrize("i", range(6))
def test_uses_the_module_fixture(i, shared):
    record(test=f"shared-{i}")
'''

FREE = RECORD + '''

@pytest.fixture(scope="session")
def per_worker():  # like tests/test_bench_smoke.py's smoke runs: session scope, not module
    return object()


@pytest.mark.parametrize("i", range(6))
def test_free(i, per_worker):
    record(test=f"free-{i}")
'''


def test_a_module_with_a_module_fixture_runs_on_one_worker_and_builds_it_once(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    (suite / "tests").mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "xdist_scheduling.py"):
        shutil.copy(HERE / name, suite / "tests" / name)
    (suite / "tests" / "test_shared.py").write_text(SHARED)
    (suite / "tests" / "test_free.py").write_text(FREE)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "XDIST_GROUPS_LOG": str(log)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", "tests"], cwd=suite, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    shared = [r for r in rows if r.get("test", "").startswith("shared-")]
    assert len(shared) == 6 and len([r for r in rows if r.get("test", "").startswith("free-")]) == 6, rows
    assert len({r["worker"] for r in shared}) == 1, rows  # one unit: one worker
    assert [r["worker"] for r in rows if r.get("built") == "shared"] == [shared[0]["worker"]], rows  # built once
    assert {r["worker"] for r in rows} <= {"gw0", "gw1"}, rows


def test_the_units_of_this_suite() -> None:
    # Modules with a module-scoped fixture are one unit each ...
    for name in ("test_model.py", "test_corruption.py", "test_socket_fuzz.py", "test_packaging.py"):
        assert defines_shared_fixture(HERE / name), name
        assert unit_of(ROOT, f"tests/{name}::test_x[1]") == f"tests/{name}"
    # ... the bench smoke runs (session-scoped fixture) and ordinary modules are not: each test is its own.
    for nodeid in ("tests/test_bench_smoke.py::test_bench_smoke[crash_kill.py]",
                   "tests/test_stop_phases.py::test_stop_while_replaying"):
        assert not defines_shared_fixture(ROOT / nodeid.split("::")[0])
        assert unit_of(ROOT, nodeid) == nodeid
    assert not defines_shared_fixture(HERE / "no-such-file.py")


def test_the_suite_runs_torch_on_one_thread() -> None:
    """tests/conftest.py: one OpenMP thread here and in the processes tests start (two workers share the
    cores with daemons and trainers; spinning OpenMP threads made in-process forwards 5-10x slower)."""
    import torch

    assert os.environ.get("OMP_NUM_THREADS") == "1"
    assert torch.get_num_threads() == 1
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]
