"""A stop request is honoured within a couple of seconds in every phase of a session, and preparation
(GGUF conversion stages, tokenization) keeps its progress for the next session.

Phases are made slow on the tiny model with the test-only POCKETD_TEST_PHASE_DELAY hook
(trainer.stopping); each test waits for a condition (a status phase, a log line, a file), sends
SIGTERM to the real trainer process and measures how long it takes to exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pocketd.store import Status, Store
from pocketd.trainer import data as tdata
from pocketd.trainer import model as tm
from pocketd.trainer.errors import Stopped
from pocketd.trainer.job import ExitCode

from tests.trainer_helpers import fill_store, make_job, run

# Each slowed unit of work takes DELAY seconds, so a phase takes many times that; a stop must end the process
# within one unit plus the process's exit (EXIT_MARGIN_S: generous for a loaded 2-core machine; measured
# figures are in the report), far sooner than the phase would have ended.
DELAY = 2.0
EXIT_MARGIN_S = 6.0
STOP_WITHIN_S = DELAY + EXIT_MARGIN_S


def wait_for(cond, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def status_of(job) -> dict:
    try:
        return json.loads(job.status_file.read_text())
    except (OSError, ValueError):
        return {}


def start(job, tmp_path: Path, delays: str) -> tuple[subprocess.Popen, Path]:
    job.write(tmp_path / "job.json")
    log = tmp_path / "trainer.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "POCKETD_TEST_PHASE_DELAY": delays}
    proc = subprocess.Popen([sys.executable, "-m", "pocketd.trainer", "--job", str(tmp_path / "job.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    return proc, log


def stop_and_time(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return time.monotonic() - t0


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    j = make_job(tmp_path, tiny_model_dir, max_steps=3, hash_every=1)
    fill_store(j.database)
    return j.model_copy(update={"status_file": tmp_path / "status.json"})


def test_stop_while_tokenizing_exits_at_once_and_keeps_the_tokens(job, tmp_path):
    proc, log = start(job, tmp_path, f"tokenizing={DELAY}")
    wait_for(lambda: "loaded " in log.read_text(), what="the model to load")
    seconds = stop_and_time(proc)
    assert proc.returncode == ExitCode.OK, log.read_text()
    assert seconds < STOP_WITHIN_S, seconds  # tokenizing all 12 examples would take 24 s more
    assert status_of(job)["end_reason"] == "stopped while tokenizing"
    with Store.open(job.database) as store:
        cached = store.db.execute("select count(*) from token_cache").fetchone()[0]
        examples = store.db.execute("select count(*) from examples").fetchone()[0]
    assert cached < examples  # stopped before the end (test_tokenization_is_committed_in_batches: what was done is kept)


def test_stop_while_loading_the_model(job, tmp_path):
    proc, log = start(job, tmp_path, f"loading={DELAY}")
    wait_for(lambda: status_of(job).get("phase") == "loading", what="the loading phase")
    seconds = stop_and_time(proc)
    assert proc.returncode == ExitCode.OK and seconds < STOP_WITHIN_S, (seconds, log.read_text())
    assert status_of(job)["end_reason"] == "stopped while loading the model"


def test_stop_while_replaying(job, tmp_path):
    first = run(job.model_copy(update={"max_steps": 8, "status_file": None}))
    assert first.steps == 8  # replaying 8 steps takes 16 s with the delay
    with Store.open(job.database) as store:  # no snapshot to start from (if this build has them): a full replay
        if "checkpoint_snapshots" in store.db.table_names():
            store.db.execute("delete from checkpoint_snapshots")
            store.db.conn.commit()
    proc, log = start(job, tmp_path, f"replaying={DELAY}")
    wait_for(lambda: status_of(job).get("phase") == "replaying", what="the replaying phase")
    seconds = stop_and_time(proc)
    assert proc.returncode == ExitCode.OK and seconds < STOP_WITHIN_S, (seconds, log.read_text())
    assert status_of(job)["end_reason"] == "stopped while replaying"
    with Store.open(job.database) as store:
        assert [c.id for c in store.log.list()] == [first.checkpoint_id]  # no candidate was opened


def test_stop_while_evaluating_leaves_the_candidate(job, tmp_path):
    proc, log = start(job, tmp_path, f"evaluating={DELAY}")
    wait_for(lambda: status_of(job).get("phase") == "evaluating", what="the gate's evaluation")
    seconds = stop_and_time(proc)
    assert proc.returncode == ExitCode.OK and seconds < STOP_WITHIN_S, (seconds, log.read_text())
    assert status_of(job)["end_reason"] == "stopped while evaluating"
    with Store.open(job.database) as store:
        ck = store.log.list()[-1]
        assert ck.status is Status.CANDIDATE and ck.n_steps == 3  # resumed (and gated) by the next session


# -- the GGUF conversion: a child process killed on stop, its finished stages kept ---------------------------


def test_stop_while_converting_kills_the_converter_at_once(tmp_path, monkeypatch):
    gguf = tmp_path / "Slow.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"
    monkeypatch.setenv("POCKETD_TEST_PHASE_DELAY", "converter=30")
    stop = threading.Event()
    partial_dirs = lambda: list((cache / "models").glob(".*.partial")) if (cache / "models").exists() else []
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, lambda: tm.load_base(str(gguf), cache, stop=stop)))
    t.start()
    wait_for(lambda: partial_dirs() and _converters(), what="the converter process")
    t0 = time.monotonic()
    stop.set()
    t.join(30)
    seconds = time.monotonic() - t0
    assert not t.is_alive() and isinstance(errors[0], Stopped), errors
    assert str(errors[0]) == "stopped while converting the model"
    assert seconds < STOP_WITHIN_S, seconds
    assert _converters() == []  # killed, not left running
    assert tm.cached_copy(str(gguf), cache) is None


def _converters() -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "pocketd.trainer.convert"], capture_output=True,
                         text=True)
    return out.stdout.split()


def _catch(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        errors.append(e)


def test_a_stopped_conversion_keeps_its_finished_stages(tmp_path, tiny_model_dir, monkeypatch):
    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(b"GGUF pretend weights")
    cache = tmp_path / "cache"
    calls: list[list[str]] = []

    def first(src, out_dir, stop=None):  # the tokenizer stage finishes, then a stop arrives
        calls.append(tm.finished_stages(out_dir))
        for f in tiny_model_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                (out_dir / f.name).write_bytes(f.read_bytes())
        (out_dir / tm.STAGES_MARKER).write_text(json.dumps({"format": tm.CACHE_FORMAT, "done": ["tokenizer"]}))
        raise Stopped("converting the model")

    def second(src, out_dir, stop=None):
        calls.append(tm.finished_stages(out_dir))
        for f in tiny_model_dir.iterdir():
            if not (out_dir / f.name).exists():
                (out_dir / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(tm, "convert_gguf", first)
    with pytest.raises(Stopped):
        tm.load_base(str(gguf), cache, stop=threading.Event())
    monkeypatch.setattr(tm, "convert_gguf", second)
    base = tm.load_base(str(gguf), cache, stop=threading.Event())
    assert calls == [[], ["tokenizer"]]  # the second attempt continued after the tokenizer stage
    assert base.converted and not (base.model_dir / tm.STAGES_MARKER).exists()


def test_a_failed_conversion_names_the_gguf(tmp_path):
    gguf = tmp_path / "Broken.gguf"
    gguf.write_bytes(b"not a gguf at all")
    with pytest.raises(tm.ModelNotFound, match="Broken.gguf: cannot load the GGUF"):
        tm.load_base(str(gguf), tmp_path / "cache", stop=threading.Event())


def test_tokenization_is_committed_in_batches(job, monkeypatch):
    monkeypatch.setattr(tdata, "TOKENIZE_BATCH", 2)
    stop = threading.Event()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.trainer.model)
    seen = [0]

    def counting(text, **kw):
        seen[0] += 1
        if seen[0] == 5:
            stop.set()
        return tok(text, **kw)

    counting.eos_token_id = tok.eos_token_id  # type: ignore[attr-defined]
    counting.backend_tokenizer = tok.backend_tokenizer  # type: ignore[attr-defined]
    with Store.open(job.database) as store, pytest.raises(Stopped, match="stopped while tokenizing"):
        tdata.items_for(store, counting, "train", 32, stop=stop)
    with Store.open(job.database) as store:
        assert store.db.execute("select count(*) from token_cache").fetchone()[0] == 5
        items = tdata.items_for(store, counting, "train", 32)  # the next session tokenizes only the rest
    assert items and seen[0] == 5 + len({it.example_id for it in items}) - 5
