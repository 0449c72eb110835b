"""Every bench script still runs: its --smoke mode (tiny model, tiny data, seconds) end to end.

Each script runs as a subprocess (`python bench/X.py --smoke`, `bash bench/runit_check.sh --smoke`)
in the test's private home, with the tiny model built once for all of them ($BENCH_TINY_MODEL); the
test asserts exit status 0 and that the script printed its table. A failure shows the command, its
exit status, its wall time and the tails of its stdout and stderr.

In one pytest process the selected scripts start together on first use, at most $BENCH_SMOKE_JOBS at
a time (default 2: most of a smoke run is one core importing torch or waiting on a daemon), longest
first; each test then waits for its own script. BENCH_SMOKE_JOBS=1 runs them one after the other.
Under pytest-xdist (`make test`) the tests are spread over the workers like any other test, and each
runs its own script when it starts (the workers already use the cores).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TIMEOUT_S = 300.0
JOBS = int(os.environ.get("BENCH_SMOKE_JOBS", "2"))
RUNIT_TOOLS = ("runsv", "sv", "svlogd")

# script -> regular expressions its smoke output must match (its table's header and rows), longest
# running first (the order they start in)
EXPECTED: dict[str, list[str]] = {
    "crash_kill.py": [r"^kind\s+tried\s+survived\s+rows lost", r"^trainer \(tiny\)\s+1\s+1\s+0",
                      r"^pocketd ingest FOLDER\s+1\s+1\s+0", r"^pocketd run, mid-ingest \(inbox\)\s+1\s+1\s+0",
                      r"^pocketd run, mid-training\s+1\s+1\s+0", r"^pocketd forget\s+1\s+1\s+0",
                      r"^pocketd checkpoint import\s+1\s+1\s+0", r"^total\s+6\s+6\s+0\s+0"],
    "trainer_bench.py": [r"^configuration\s+bs\s+k\s+s/op", r"^MeZO step lora \(snapshot\)\s+8",
                         r"^LoRA-AdamW step\s+8", r"^log and replay\s+value", r"replay exact \(final hash\)\s+yes",
                         r"^held-out perplexity", r"^lora-MeZO \(session\)", r"^target\s+measured"],
    "gguf_llama.py": [r"^pocketd export\s+MiB\s+wall s\s+peak RSS MiB", r"^--gguf --type f16\s+[\d.]+\s+[\d.]+",
                      r"^--gguf --type q8_0\s+[\d.]+", r"^--merged\s+[\d.]+",
                      r"^export\s+MiB\s+llama.cpp ppl\s+transformers\(GGUF\) ppl\s+pocketd ppl",
                      r"^f16\s+[\d.]+\s+\S+\s+[\d.]+\s+[\d.]+", r"^q8_0\s+[\d.]+\s+\S+\s+[\d.]+\s+[\d.]+",
                      r"^prompt 1: .*pocketd's loop = generate\(\): True"],
    "zo_quality.py": [r"^method\s+steps\s+s/step", r"^adamw\s+\d+", r"^textbook\s+\d+", r"^pocketd\s+\d+",
                      r"^side\s+\d+", r"ZO step cost in full forwards", r"^\s+mlp\s+\d+ windows: epoch 1"],
    "socket_fuzz.py": [r"^requests sent: \d+", r"well-formed: \d+ \(100\.00%\)", r"^internal errors: 0",
                       r"^status latency under load: p50", r"^daemon exit status after SIGTERM: 0"],
    "memory_budget.py": [r"^run\s+budget MiB\s+estimate MiB", r"^below estimate\s+\d+.*refused",
                         r"^grows mid-session\s+\d+"],
    "soak.py": [r"^duration\s+[\d.]+ min", r"^sessions\s+\d+ started", r"^daemon RSS\s+start",
                r"^result\s+OK"],
    "model_load.py": [r"^load\s+converted\s+import s\s+load s", r"^first\s+(True|False)", r"^cached 1\s",
                      r"^fingerprints identical: True"],
    "unplug_to_stop.py": [r'^\{"run": 1, "start_to_step_s": [\d.]+, .*"unplug_to_stopped_s": [\d.]+'],
    "runit_check.sh": [r"^PASS  sv up -> run", r"^PASS  pocketd status answers",
                       r"^PASS  sv down -> exited 0 on SIGTERM", r"^runit check: ALL PASSED"],
    "status_client.py": [r"vs python -c pass, 5 runs each, interleaved", r"^ratio of p50s: [\d.]+",
                         r"^daemon start to socket ready \(2 starts\)"],
    "status_latency.py": [r"idle daemon RSS: [\d.]+ MiB",
                          r"status round trip, new connection per request \(n=50\): p50 [\d.]+ ms",
                          r"status round trip, one persistent connection \(n=50\): p50"],
    "ingest_throughput.py": [r"^ingest\s+200 documents .* documents/s .* MB/s", r"^re-ingest\s+200 documents",
                             r"best of 1 runs"],
    "socket_watch.py": [r"^watch latency, pause/resume -> status line \(n=10\): p50 [\d.]+ ms, .*p99 [\d.]+ ms",
                        r"^watch stream: \d+ lines after the first"],
    "snapshot_chain.py": [r"^chain\s+300: .*verify exact \(300 steps replayed", r"^steps\s+session start to first step s",
                          r"^300\s+[\d.]+", r"^worst ratio to the 10-step chain", r"^snapshot bytes per checkpoint"],
}


@dataclass
class Run:
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float

    def report(self) -> str:
        return (f"{' '.join(self.argv[1:])} exited {self.code} after {self.seconds:.1f} s\n"
                f"--- stdout (tail) ---\n{self.out[-4000:]}\n--- stderr (tail) ---\n{self.err[-6000:]}")


def argv_of(script: str) -> list[str]:
    if script.endswith(".sh"):
        return ["bash", str(BENCH / script), "--smoke"]
    return [sys.executable, str(BENCH / script), "--smoke"]


def runit_missing() -> list[str]:
    return [tool for tool in RUNIT_TOOLS if shutil.which(tool) is None]


def run_smoke(argv: list[str], env: dict[str, str]) -> Run:
    """Run a smoke command; on timeout kill it and everything it started (daemons in their own sessions too)."""
    import psutil

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        family = psutil.Process(proc.pid).children(recursive=True)
        for p in [*family, psutil.Process(proc.pid)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        err += f"\n[test_bench_smoke] killed after {TIMEOUT_S:.0f} s"
    return Run(argv, proc.returncode, out, err, time.monotonic() - t0)


def selected_scripts(session: pytest.Session) -> list[str]:
    here = Path(__file__).resolve()
    chosen = {item.callspec.params["script"] for item in session.items
              if Path(str(item.path)).resolve() == here and "script" in getattr(getattr(item, "callspec", None),
                                                                                  "params", {})}
    chosen = chosen or set(EXPECTED)
    if runit_missing():
        chosen.discard("runit_check.sh")
    return [s for s in EXPECTED if s in chosen and (BENCH / s).exists()]


class SmokeRuns:
    """The smoke runs of this pytest process, each in a private home: a script starts when `start`ed
    (ahead of its test) or at the latest when its test asks for its result."""

    def __init__(self, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, jobs: int) -> None:
        self.base = {k: v for k, v in os.environ.items() if not k.startswith("POCKETD_") and k != "NOTIFY_SOCKET"}
        self.base.update(BENCH_TINY_MODEL=str(tiny_model_dir), PYTHONUNBUFFERED="1", PY=sys.executable,
                         HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.tmp_path_factory = tmp_path_factory
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="bench-smoke")
        self.runs: dict[str, Future[Run]] = {}

    def start(self, script: str) -> Future[Run]:
        if script not in self.runs:
            home = self.tmp_path_factory.mktemp(f"bench-{script.split('.')[0]}") / "home"
            (home / "run").mkdir(parents=True, mode=0o700)
            env = {**self.base, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                   "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache"),
                   "XDG_STATE_HOME": str(home / ".local/state"), "XDG_RUNTIME_DIR": str(home / "run")}
            self.runs[script] = self.pool.submit(run_smoke, argv_of(script), env)
        return self.runs[script]

    def result(self, script: str) -> Run:
        return self.start(script).result()


def under_xdist(config: pytest.Config) -> bool:
    """This process is a pytest-xdist worker (it runs the tests the controller hands it, one by one)."""
    return hasattr(config, "workerinput")


# Session scope, not module: a module-scoped fixture would make this module one unit of work on one xdist
# worker (tests/xdist_scheduling.py), and the smoke runs are the suite's longest tests.
@pytest.fixture(scope="session")
def smoke_runs(request: pytest.FixtureRequest, tiny_model_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeRuns]:
    """In one pytest process the selected smoke runs start at once (at most JOBS at a time); in an xdist
    worker each script starts when its test asks for it (the worker knows only the test it runs)."""
    xdist = under_xdist(request.config)
    runs = SmokeRuns(tiny_model_dir, tmp_path_factory, 1 if xdist else JOBS)
    if not xdist:
        for script in selected_scripts(request.session):
            runs.start(script)
    yield runs
    runs.pool.shutdown(wait=True)


def check(script: str, run: Run) -> None:
    assert run.code == 0, run.report()
    missing = [p for p in EXPECTED[script] if not re.search(p, run.out, re.MULTILINE)]
    assert not missing, f"{script}: expected output not printed: {missing}\n{run.report()}"
    print(f"{script} --smoke: {run.seconds:.1f} s")


@pytest.mark.parametrize("script", list(EXPECTED))
def test_bench_smoke(script: str, smoke_runs: SmokeRuns) -> None:
    if not (BENCH / script).exists():
        pytest.skip(f"bench/{script} is not in this tree")
    if script == "runit_check.sh" and runit_missing():
        pytest.skip(f"runit is not installed here ({', '.join(runit_missing())} not found; apt-get install runit)")
    check(script, smoke_runs.result(script))


def test_every_bench_script_has_a_smoke_test() -> None:
    helpers = {"benchlib.py", "crash_forget_import.py"}  # modules the scripts import, not scripts
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh") and p.name not in helpers}
    assert scripts <= set(EXPECTED), f"bench scripts without a smoke test: {sorted(scripts - set(EXPECTED))}"
