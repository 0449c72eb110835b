"""`pocketd train | eval | checkpoint | forget` in-process, and `python -m pocketd.trainer` under SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.store import Status, Store
from pocketd.trainer.ckptfile import pack, unpack
from pocketd.trainer.methods.mezo import to_file
from pocketd.trainer.errors import CheckpointFileError
from pocketd.trainer.job import ExitCode, TrainingJob

from tests.trainer_helpers import NOTES, fill_store, make_job, start_trainer


@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    """A config pointing at the tiny model and a store with notes."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[trainer]\nmodel = "{tiny_model_dir}"\nbatch_size = 4\nseq_len = 32\nlr = 1e-3\nseed = 3\n'
        f'hash_every = 2\neval_examples = 16\n[paths]\ndata_dir = "{tmp_path / "data"}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'
    )
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    fill_store(tmp_path / "data" / "pocketd.sqlite3")
    return tmp_path


def pocketd(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_train_eval_verify_list(env):
    code, out = pocketd("train", "--steps", "4")
    assert code == 0, out
    assert "session: step budget reached; 4 steps" in out and "checkpoint 1:" in out
    code, out = pocketd("checkpoint", "list")
    assert code == 0 and " 1  " in out
    code, out = pocketd("checkpoint", "verify", "1")
    assert code == 0 and "ok (4 steps replayed" in out
    code, out = pocketd("eval", "--json")
    assert code == 0
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["base"]["loss"] > 0


def test_verify_detects_a_tampered_log(env):
    pocketd("train", "--steps", "3", "--no-eval")
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        store.db.execute("update steps set grads = ? where step = 1", [b"\x00\x00\x80\x3f"])
        store.db.conn.commit()
    code, out = pocketd("checkpoint", "verify", "1")
    assert code == 1 and "replay differs from the log after 2 steps" in out


def test_export_import_roundtrip_and_size(env, tmp_path):
    pocketd("train", "--steps", "5")
    f = tmp_path / "ck.pkd"
    code, out = pocketd("checkpoint", "export", "1", str(f))
    assert code == 0 and oct(f.stat().st_mode & 0o777) == "0o600"
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        header_only = len(pack(to_file(store, 1))) - 5 * 16
    per_step = (f.stat().st_size - header_only) / 5
    assert per_step == 16  # seed i64 + grad f32 + lr f32
    code, out = pocketd("checkpoint", "import", str(f))  # the same weights again: no better than current
    assert code == 0 and "verified" in out and "kept as rejected" in out, out
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        assert store.log.current().id == 1 and store.log.get(2).status is Status.REJECTED
    # Another device (a fresh store with the same notes): imported, verified, gated against the base.
    cfg = env / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(env / "data"), str(env / "data2")))
    fill_store(env / "data2" / "pocketd.sqlite3")
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 0 and "(5 steps, verified; validation loss" in out and "now current" in out, out
    with Store.open(env / "data2" / "pocketd.sqlite3") as store, Store.open(env / "data" / "pocketd.sqlite3") as first:
        cur = store.log.current()
        assert cur.id == 1 and cur.n_steps == 5
        assert store.log.hashes(1) == first.log.hashes(1)


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic"])
def test_corrupt_checkpoint_file_is_refused_naming_it(env, tmp_path, damage):
    pocketd("train", "--steps", "2")
    f = tmp_path / "ck.pkd"
    pocketd("checkpoint", "export", "1", str(f))
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data[:8] = b"NOTAFILE"
    f.write_bytes(bytes(data))
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 1 and str(f) in out
    with pytest.raises(CheckpointFileError):
        unpack(bytes(data), "x")


def test_forget_drops_exactly_the_steps_that_saw_the_document(env):
    pocketd("train", "--steps", "6")
    db = env / "data" / "pocketd.sqlite3"
    with Store.open(db) as store:
        train_doc = next(d for d in store.docs.list() if d.split == "train")
        steps = list(store.log.steps(1, with_documents=True))
        expected = sorted(s.step for s in steps if train_doc.id in s.document_ids)
        kept = [s for s in steps if train_doc.id not in s.document_ids]
    assert expected, "the document should have been in some batch"
    code, out = pocketd("forget", "--document", str(train_doc.id))
    assert code == 0, out
    assert f"dropped {len(expected)} training step" in out
    with Store.open(db) as store:
        cur = store.log.current()
        assert store.log.get(1).status is Status.FORGOTTEN and store.log.get(1).n_steps == 0
        rebuilt = list(store.log.steps(cur.id, with_documents=True))
        assert [(r.seeds, r.grads) for r in rebuilt] == [(k.seeds, k.grads) for k in kept]
        assert all(train_doc.id not in r.document_ids for r in rebuilt)
        assert store.log.checkpoints_with_documents([train_doc.id]) == {}
    code, out = pocketd("checkpoint", "verify", str(cur.id))
    assert code == 0, out


def test_trainer_child_process_sigterm_finishes_step_and_exits_0(tmp_path, tiny_model_dir):
    job = make_job(tmp_path, tiny_model_dir, max_steps=100000, hash_every=1000)
    fill_store(job.database)
    job = job.model_copy(update={"status_file": tmp_path / "status.json"})
    proc = start_trainer(job, tmp_path / "job.json", until_step=3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.OK, out.decode()
    assert oct(job.status_file.stat().st_mode & 0o777) == "0o600"
    from pocketd.trainer.checkpoints import load_checkpoint

    with Store.open(job.database) as store:
        ck = store.log.list()[-1]
        assert ck.status is Status.CANDIDATE and ck.n_steps >= 3
        assert max(store.log.hashes(ck.id)) == ck.n_steps  # final hash recorded at the stop
        load_checkpoint(store, job.trainer, job.cache_dir, ck.id, verify=True)


def test_bad_job_file_exits_2(tmp_path):
    bad = tmp_path / "job.json"
    bad.write_text('{"database": 3}')
    proc = subprocess.run([sys.executable, "-m", "pocketd.trainer", "--job", str(bad)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == ExitCode.BAD_JOB and "invalid job file" in proc.stderr


def test_forget_clears_the_activation_cache(env):
    cfg = env / "config.toml"
    cfg.write_text(cfg.read_text().replace("[paths]", "lora_layers = 1\n[paths]"))
    code, out = pocketd("train", "--steps", "2", "--no-eval")
    assert code == 0, out
    acts = env / "cache" / "activations"
    assert any(acts.rglob("*.act")), "training with a frozen prefix fills the activation cache"
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        doc = store.docs.list()[0]
    code, out = pocketd("forget", "--document", str(doc.id))
    assert code == 0, out
    assert "cleared the activation cache" in out and not acts.exists()
