"""What the bench scripts share: a private environment, a real `pocketd run`, socket and RSS helpers,
generated notes and stores, the LoRA-AdamW baseline, worker processes and tables.

Imported as `import benchlib` by the scripts in this folder (a script's own folder is on sys.path);
the package `pocketd` is installed. Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SHARED_DATA = ROOT.parent / "shared" / "data"
TIL_NOTES = SHARED_DATA / "til-notes-2020-2023.jsonl"
SAMPLE_NOTES = ROOT / "ingest" / "sample"
MIB = 2**20
DB_NAME = "pocketd.sqlite3"
# A tiny model directory built once by the caller (tests/test_bench_smoke.py) and reused by every
# smoke run; not a POCKETD_* name, which pocketd's config loader would reject as unknown.
TINY_MODEL_ENV = "BENCH_TINY_MODEL"
T = TypeVar("T")


# -- the private environment ---------------------------------------------------------------------------


def offline_defaults() -> None:
    """This process: never reach a hub, no POCKETD_* settings of the user's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for name in [n for n in os.environ if n.startswith("POCKETD_")]:
        del os.environ[name]


def make_home(tmp: Path) -> Path:
    """tmp/home and tmp/run (0700, the XDG runtime dir); returns the home."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    (tmp / "run").mkdir(mode=0o700, exist_ok=True)
    return home


def private_env(home: Path, runtime: Path | None = None, *, config: Path | None = None,
                cache_home: Path | None = None, **settings: str) -> dict[str, str]:
    """os.environ without POCKETD_* and NOTIFY_SOCKET, HOME and the XDG dirs under `home`, offline.

    `runtime`: XDG_RUNTIME_DIR (default home/run); `cache_home`: XDG_CACHE_HOME (default home/.cache);
    `config`: POCKETD_CONFIG; `settings`: more variables (e.g. POCKETD_TRAINER__MODEL=...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCKETD_") and k != "NOTIFY_SOCKET"}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_STATE_HOME=str(home / ".local/state"), XDG_CACHE_HOME=str(cache_home or home / ".cache"),
               XDG_RUNTIME_DIR=str(runtime or home / "run"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if config is not None:
        env["POCKETD_CONFIG"] = str(config)
    env.update(settings)
    return env


def fake_power_settings(power: Path, plugged: bool, percent: float = 90) -> dict[str, str]:
    """Write the fake charger file; the POCKETD_DAEMON__* variables that make the daemon read it."""
    set_power(power, plugged, percent)
    return {"POCKETD_DAEMON__POWER_PROBE": "fake", "POCKETD_DAEMON__FAKE_POWER_FILE": str(power)}


def set_power(path: Path, plugged: bool | None, percent: float = 90) -> None:
    """Plug or unplug the fake charger (atomically: the probe may read at any moment)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"on_power": plugged, "percent": percent}))
    os.replace(tmp, path)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def error_lines(text: str) -> list[str]:
    """ERROR / Traceback / CRITICAL lines of a daemon log."""
    return [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln or "CRITICAL" in ln]


def wait_until(pred: Callable[[], T | None], timeout_s: float, what: str, *, interval: float = 0.05,
               alive: Callable[[], str | None] | None = None) -> T:
    """Poll `pred` until it returns something truthy; RuntimeError on timeout or when `alive` names a death."""
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None and (dead := alive()):
            raise RuntimeError(f"{dead} while waiting for {what}")
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval)


def run_cli(env: dict[str, str], *args: str) -> None:
    """`pocketd ARGS...` in a child with `env` (e.g. `demo`); raises with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "pocketd.daemon", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pocketd {' '.join(args)} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")


def sigkill(proc: subprocess.Popen[Any]) -> bool:
    """SIGKILL `proc`; True if it was still running (a real kill, not a process that had just exited)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 120) -> int | None:
    """SIGTERM, wait; SIGKILL after `timeout_s`. The exit status (None when it had to be killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        sigkill(proc)
        return None


class Daemon:
    """A real `python -m pocketd.daemon run` in a child with a private environment, its output in a log."""

    def __init__(self, env: dict[str, str], log_path: Path, sock: Path | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.env = env
        self.log_path = log_path
        self.sock = sock or Path(env["XDG_RUNTIME_DIR"]) / "pocketd" / "pocketd.sock"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", "run", *self.extra_args],
                                         cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"the daemon exited {self.proc.returncode}: {self.log_tail()}"
        return None

    def status(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        from pocketd.daemon.client import ClientError, DaemonNotRunning, request

        try:
            return request(self.sock, "status", timeout_s=timeout_s)
        except (DaemonNotRunning, ClientError, OSError):
            return None

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        from pocketd.daemon.client import request

        return request(self.sock, cmd, **args)

    def wait(self, pred: Callable[[], T | None], timeout_s: float, what: str, interval: float = 0.05) -> T:
        try:
            return wait_until(pred, timeout_s, what, interval=interval, alive=self.dead)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n--- daemon log tail ---\n{self.log_tail()}") from None

    def wait_or_exit(self, pred: Callable[[], T | None], timeout_s: float, what: str, interval: float = 0.05) -> T:
        """`wait`, but on failure kill the daemon and exit the script with the reason and the log's tail."""
        try:
            return self.wait(pred, timeout_s, what, interval)
        except RuntimeError as e:
            self.kill()
            raise SystemExit(str(e)) from None

    def ready(self, timeout_s: float = 120) -> dict[str, Any]:
        """The first `status` reply (the socket is up)."""
        return self.wait(lambda: self.status(), timeout_s, "the daemon to answer status")

    def stop(self, timeout_s: float = 120) -> int | None:
        return None if self.proc is None else stop_process(self.proc, timeout_s)

    def kill(self) -> bool:
        return self.proc is not None and sigkill(self.proc)

    def log_tail(self, n: int = 3000) -> str:
        return tail(self.log_path, n)


def training_past(status: dict[str, Any] | None, after_session: int, step: int) -> dict[str, Any] | None:
    """`status` if it shows a session newer than `after_session` at step `step` or later."""
    tr = (status or {}).get("training") or {}
    if tr.get("session_id", 0) > after_session and (tr.get("step") or 0) >= step:
        return status
    return None


def training_daemon_settings(model_dir: Path | str, **more: str) -> dict[str, str]:
    """POCKETD_* variables for a daemon that trains at once when plugged: load, memory, battery and
    cooldown waved through, the given model, one torch thread, small batches."""
    return {"POCKETD_POLICY__MAX_LOAD": "1000", "POCKETD_POLICY__MIN_AVAILABLE_MB": "0",
            "POCKETD_POLICY__MIN_BATTERY_PERCENT": "0", "POCKETD_POLICY__COOLDOWN_MINUTES": "0",
            "POCKETD_TRAINER__MODEL": str(model_dir), "POCKETD_TRAINER__THREADS": "1",
            "POCKETD_TRAINER__BATCH_SIZE": "2", "POCKETD_TRAINER__MICRO_BATCH_SIZE": "2",
            "POCKETD_TRAINER__SEQ_LEN": "64", **more}


# -- the tiny model --------------------------------------------------------------------------------------


def tiny_model(dest: Path, *, in_process: bool = True) -> Path:
    """The tiny random test model (trainer.tiny, seed 0): $BENCH_TINY_MODEL if set (built once by the
    smoke tests), else built at `dest` (in a child process when `in_process` is False, so the caller
    stays free of torch)."""
    given = os.environ.get(TINY_MODEL_ENV)
    if given:
        return Path(given)
    if in_process:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        from pocketd.trainer.tiny import make_tiny_model_dir

        return make_tiny_model_dir(dest, seed=0)
    code = ("import sys; from pathlib import Path; from pocketd.trainer.tiny import make_tiny_model_dir; "
            "make_tiny_model_dir(Path(sys.argv[1]), seed=0)")
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"building the tiny model failed: {proc.stderr[-2000:]}")
    return dest


# -- socket ------------------------------------------------------------------------------------------------


def connect(path: Path, timeout: float = 60.0) -> socket.socket:
    """A raw connection to the control socket; like daemon.client, wait for room while the listen
    backlog is full (EAGAIN)."""
    from pocketd.daemon.protocol import unix_address

    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            with unix_address(path) as addr:
                s.connect(addr)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        except BaseException:
            s.close()
            raise


def read_all(s: socket.socket) -> bytes:
    """Read until the peer closes (a reset counts as the end; a timeout raises)."""
    out = bytearray()
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def exchange(path: Path, data: bytes, timeout: float = 60.0) -> bytes:
    """Send raw `data`, end our side, read the replies until the daemon closes."""
    with connect(path, timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early (too_large) and closed
        return read_all(s)


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """n, p50/p90/p99/max/mean in milliseconds."""
    ms = sorted(x * 1000 for x in samples_s)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]

    return {"n": len(ms), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ms[-1],
            "mean": statistics.fmean(ms)}


# -- RSS ------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident set (MiB) from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def tree_rss_mb(proc: Any) -> float | None:
    """RSS of a psutil.Process and all its descendants (MiB); None once it is gone."""
    import psutil

    try:
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += child.memory_info().rss
        return total / MIB
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a daemon thread, only inside `window()`."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self.interval = interval
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._peak = 0
        self._active = False
        self._samples = 0
        threading.Thread(target=self._run, name="rss-sampler", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._active:
                self._sample()

    def current_mib(self) -> float:
        return self._proc.memory_info().rss / MIB

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        with self._lock:
            self._peak = max(self._peak, rss)
            self._samples += 1

    @contextmanager
    def window(self) -> Iterator[dict[str, int]]:
        """Yields a dict that holds {"peak": bytes, "samples": n} once the block has finished."""
        out: dict[str, int] = {}
        with self._lock:
            self._peak, self._samples = 0, 0
        self._sample()
        self._active = True
        try:
            yield out
        finally:
            self._active = False
            self._sample()
            with self._lock:
                out["peak"], out["samples"] = self._peak, self._samples


# -- notes and stores -------------------------------------------------------------------------------------------

WORDS = (
    "garden tomato bed soil seed water frost bike chain tyre climb river bread dough crust oven flour "
    "yeast book chapter lighthouse fog signal kimchi jar brine apple aphid net strawberry bird recipe "
    "notebook morning evening rain wind sun shade cloth bean lettuce pepper onion garlic compost worm "
    "shed ladder paint brush fence gate path stone moss fern pond frog heron kettle tea coffee cup "
    "train station ticket platform map walk hill valley forest pine birch oak maple leaf bark root"
).split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 16))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def note_text(rng: random.Random, i: int, long: bool) -> str:
    """A generated note: 1-3 short paragraphs, or 4-9 long ones."""
    pars = []
    for _ in range(rng.randint(4, 9) if long else rng.randint(1, 3)):
        n_sent = rng.randint(8, 16) if long else rng.randint(1, 4)
        pars.append(" ".join(sentence(rng) for _ in range(n_sent)))
    return f"Note {i} ({rng.getrandbits(32):08x}).\n\n" + "\n\n".join(pars)


def write_notes_jsonl(path: Path, n: int, seed: int = 0, long_share: float = 0.2) -> Path:
    """`n` generated notes as a JSONL export ({"text", "time"} per line), like the shared TIL notes."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": note_text(rng, i, rng.random() < long_share), "time": 1_600_000_000 + i * 3600})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ingest_store(path: Path, sources: Sequence[Path]) -> dict[str, Any]:
    """Ingest `sources` into a store at `path` (created); the counts."""
    from pocketd.ingest import IngestConfig, ingest_paths
    from pocketd.store import Store

    with Store.open(path) as store:
        report = ingest_paths(store, list(sources), IngestConfig())
        stats = store.docs.stats()
    return {"added": report.n_added, "rejected": report.n_rejected, "documents": stats.documents,
            "examples": stats.examples}


def copy_store(src: str | Path, dst: Path) -> Path:
    """A private copy of a prepared store (sqlite backup API: consistent even with a WAL)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(str(src))) as a, closing(sqlite3.connect(str(dst))) as b:
        a.backup(b)
    return dst


# -- the LoRA-AdamW baseline (trainer_bench, zo_quality) --------------------------------------------------------------


def lora_adamw(model: Any, cfg: Any, lr: float) -> tuple[Any, list[Any]]:
    """LoRA adapters of `cfg`'s spec on `model`, and torch.optim.AdamW over them."""
    import torch

    from pocketd.trainer.lora import lora_modules
    from pocketd.trainer.replay import Spec, prepare_model

    prepare_model(model, Spec.from_config(cfg))
    params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=lr), params


def adamw_step(model: Any, opt: Any, batch: Any) -> float:
    """Plain transformers forward with labels (full [B, T, V] logits), backward, AdamW step."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, use_cache=False)
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())


def adamw_quality(cfg: Any, db: Path, cache_dir: Path, lr: float, minutes: float, sampler: RssSampler,
                  min_steps: int = 0) -> dict[str, Any]:
    """LoRA-AdamW (adapters of cfg's spec) for `minutes` counted from before the model loads (as a
    session's budget is), on the session's batch order (cfg.seed) and held-out windows; perplexity
    before and after. `min_steps`: steps taken even past the budget (smoke runs)."""
    from pocketd.store import Store
    from pocketd.trainer.data import BatchSampler, collate, items_for, pad_id_of
    from pocketd.trainer.evaluate import eval_items, evaluate
    from pocketd.trainer.model import load_base

    t_start = time.monotonic()
    deadline = t_start + minutes * 60
    with sampler.window() as w:
        base = load_base(cfg.model, cache_dir, cfg.dtype)
        tok, model = base.tokenizer, base.model
        with Store.open(db) as store:
            train_items = items_for(store, tok, "train", cfg.seq_len)
            val_items = eval_items(items_for(store, tok, "validation", cfg.seq_len), cfg.eval_examples)
            counts = store.docs.trained_counts()
        opt, _ = lora_adamw(model, cfg, lr)
        pad = pad_id_of(tok)
        kw = {"micro_batch": cfg.micro_batch_size, "chunk_tokens": cfg.loss_chunk_tokens}
        before = evaluate(model, val_items, pad_id=pad, batch_size=cfg.batch_size, **kw)
        rng = random.Random(cfg.seed)  # the session's first draw seeds its sampler: same batch order
        batches = BatchSampler(train_items, counts, cfg.batch_size, rng.getrandbits(63))
        steps, t_loop = 0, time.monotonic()
        while time.monotonic() < deadline or steps < min_steps:
            adamw_step(model, opt, collate(batches.next(), pad))
            steps += 1
        train_s = time.monotonic() - t_loop
        after = evaluate(model, val_items, pad_id=pad, batch_size=cfg.batch_size, **kw)
    return {"base": base, "steps": steps, "train_loop_s": train_s, "s_per_step": train_s / steps if steps else None,
            "eval_windows": len(val_items), "loss_before": before.loss, "loss_after": after.loss,
            "ppl_before": before.perplexity, "ppl_after": after.perplexity,
            "wall_s": time.monotonic() - t_start, "peak_rss_mib": w["peak"] / MIB}


# -- worker processes (trainer_bench, zo_quality) ------------------------------------------------------------------


def spawn_workers(script: Path, names: Sequence[str], settings_json: str, log_path: Path,
                  timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Run `script --worker N1,N2,... --settings JSON` in one fresh process; each worker's JSON result
    (one line each on stdout, in order) or an error record with the tail of its log (stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(script), "--worker", ",".join(names), "--settings", settings_json]
    t0 = time.monotonic()
    with log_path.open("w", encoding="utf-8") as err:
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {n: {"error": f"timed out after {timeout_s:.0f} s (see {log_path})", "worker_wall_s": timeout_s}
                    for n in names}
    wall = round(time.monotonic() - t0, 1)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(names):
        log_tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        return {n: {"error": f"exit {proc.returncode}: {' | '.join(log_tail)}", "worker_wall_s": wall} for n in names}
    return {n: {**r, "worker_wall_s": wall} for n, r in zip(names, lines)}


def run_workers(names: str, call: Callable[[str], dict[str, Any]]) -> None:
    """The worker side of `spawn_workers`: each comma-separated name's result as one JSON line; a worker
    that raises yields {"error": ...} (its traceback goes to stderr) and the others still run."""
    import logging
    import traceback

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in names.split(","):
        try:
            result = call(name)
        except Exception as e:  # noqa: BLE001 - reported as this worker's result
            traceback.print_exc()
            where = traceback.extract_tb(e.__traceback__)[-1]
            result = {"error": f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"}
        print(json.dumps(result), flush=True)


# -- output ----------------------------------------------------------------------------------------------------


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, rule: bool = True,
          align_right: bool = True) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned (or all left)."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 or not align_right else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(cells[0])]
    if rule:
        out.append(line(["-" * w for w in widths]))
    return "\n".join(out + [line(r) for r in cells[1:]])


def smoke_flag(parser: Any) -> None:
    """--smoke: a tiny model, tiny data and a few steps, so the whole script runs in seconds."""
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, not minutes: the tiny test model, tiny data, a few steps (numbers meaningless)")
