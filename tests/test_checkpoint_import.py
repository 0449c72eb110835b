"""`pocketd checkpoint import` of files from outside: bounded reads, checked specs and counts, no forged
model ever current, nothing stored by a failed or interrupted import; eval/generate refuse a NaN model."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from pocketd.daemon.cli import cli
from pocketd.store import Status, Store
from pocketd.trainer import ckptfile, sidefile
from pocketd.trainer.errors import CheckpointFileError
from pocketd.trainer.transfer import MAX_FILE_BYTES, read_checkpoint_file

from tests.trainer_helpers import fill_store

MODEL_CFG = 'batch_size = 4\nseq_len = 32\nlr = 1e-3\nseed = 3\nhash_every = 2\neval_examples = 16\n'


def _env(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, extra: str = "") -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[trainer]\nmodel = "{model_dir}"\n{MODEL_CFG}{extra}[paths]\ndata_dir = "{tmp_path / "data"}"\n'
                   f'cache_dir = "{tmp_path / "cache"}"\n')
    monkeypatch.setenv("POCKETD_CONFIG", str(cfg))
    fill_store(tmp_path / "data" / "pocketd.sqlite3")
    return tmp_path


@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    return _env(tmp_path, tiny_model_dir, monkeypatch)


def pocketd(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def db_rows(env: Path) -> list:
    """Everything the import could have written."""
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        return [store.db.execute(f"select * from {t}").fetchall()
                for t in ("checkpoints", "steps", "checkpoint_hashes", "checkpoint_states")]


def exported(env: Path, steps: int = 4) -> bytes:
    code, out = pocketd("train", "--steps", str(steps))
    assert code == 0, out
    f = env / "ck.pkd"
    assert pocketd("checkpoint", "export", "1", str(f))[0] == 0
    return f.read_bytes()


def resign(magic: bytes, header: dict | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True).encode()
    payload = magic + struct.pack("<I", len(h)) + h + body
    return payload + hashlib.sha256(payload).digest()


def split(data: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", data, 8)
    return json.loads(data[12 : 12 + hlen]), data[12 + hlen : -32]


# -- reading: regular files only, size checked before reading --------------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ck.fifo"
    os.mkfifo(fifo)
    result: list = []
    t = threading.Thread(target=lambda: result.append(_error_of(fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert str(fifo) in result[0] and "not a regular file (a FIFO)" in result[0]


def _error_of(path: Path) -> str:
    try:
        read_checkpoint_file(path)
    except CheckpointFileError as e:
        return str(e)
    return "no error"


def test_a_symlink_to_a_device_and_a_directory_are_refused(tmp_path):
    link = tmp_path / "zero.pkd"
    link.symlink_to("/dev/zero")
    assert "not a regular file (a character device)" in _error_of(link)
    assert "not a regular file (a directory)" in _error_of(tmp_path)
    real = tmp_path / "real.pkd"
    real.write_bytes(b"x" * 10)
    ok = tmp_path / "ok.pkd"
    ok.symlink_to(real)
    assert read_checkpoint_file(ok) == b"x" * 10  # a symlink to a regular file is fine


def test_a_huge_sparse_file_is_refused_from_its_size_in_bounded_memory(tmp_path):
    sparse = tmp_path / "huge.pkd"
    with sparse.open("wb") as f:
        f.truncate(3 << 30)
    code = ("import resource, sys\nfrom pathlib import Path\nfrom pocketd.trainer.transfer import read_checkpoint_file\n"
            "from pocketd.trainer.errors import CheckpointFileError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    read_checkpoint_file(Path(sys.argv[1]))\nexcept CheckpointFileError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(sparse)], capture_output=True, text=True, timeout=60)
    message, grown_kib = out.stdout.strip().splitlines()
    assert str(sparse) in message and "larger than any checkpoint file" in message
    assert int(grown_kib) < 16 * 1024  # the peak RSS grew by less than 16 MiB (it read nothing)
    assert MAX_FILE_BYTES < 3 << 30


# -- parsing: every malformed file is one line naming it, exit 1, store unchanged -----------------------------


def _mezo_fuzz(data: bytes) -> dict[str, bytes]:
    header, body = split(data)
    seg = header["segments"][0]
    cases: dict[str, bytes] = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "bad json header": resign(ckptfile.MAGIC, b"{not json", body),
        "header not an object": resign(ckptfile.MAGIC, b"[1, 2]", body),
        "header length past the end": ckptfile.MAGIC + struct.pack("<I", 1 << 30) + b"{}" + b"\0" * 32,
        "trailing bytes": resign(ckptfile.MAGIC, header, body + b"\0" * 7),
        "missing body": resign(ckptfile.MAGIC, header, body[:-5]),
        "NaN constant": resign(ckptfile.MAGIC, json.dumps(header).replace('"n": 1', '"n": NaN').encode(), body),
    }
    for label, change in {
        "segments not a list": lambda h: h.update(segments="x"),
        "segment not an object": lambda h: h.update(segments=[3]),
        "n_steps a string": lambda h: h["segments"][0].update(n_steps="4"),
        "n_steps huge": lambda h: h["segments"][0].update(n_steps=10**15),
        "n_steps negative": lambda h: h["segments"][0].update(n_steps=-1),
        "n huge": lambda h: h["segments"][0].update(n=10**6),
        "n a boolean": lambda h: h["segments"][0].update(n=True),
        "no segments": lambda h: h.update(segments=[]),
        "hashes a list": lambda h: h["segments"][0].update(hashes=[]),
        "hash not hex": lambda h: h["segments"][0]["hashes"].update({"1": "zz"}),
        "hash beyond the last step": lambda h: h["segments"][0]["hashes"].update({str(seg["n_steps"] + 1): "0" * 64}),
        "spec rank huge": lambda h: h["spec"]["lora"].update(rank=1 << 20),
        "spec rank a string": lambda h: h["spec"]["lora"].update(rank="8"),
        "spec alpha infinite": lambda h: h["spec"]["lora"].update(alpha=1e999),
        "spec unknown trainable": lambda h: h["spec"].update(trainable="everything"),
        "spec extra field": lambda h: h["spec"].update(evil=1),
        "spec no target in base": lambda h: h["spec"]["lora"].update(targets="mlp", layers=1) or None,
        "eps zero": lambda h: h["segments"][0]["estimator"].update(eps=0),
        "unknown restore": lambda h: h["segments"][0]["estimator"].update(restore="teleport"),
        "fingerprint not hex": lambda h: h.update(base_fingerprint="abc"),
        "method not mezo": lambda h: h.update(method="side"),
    }.items():
        h = json.loads(json.dumps(header))
        change(h)
        cases[label] = resign(ckptfile.MAGIC, h, body)
    nan_lr = bytearray(body)
    nan_lr[0:4] = struct.pack("<f", float("nan"))
    cases["NaN learning rate"] = resign(ckptfile.MAGIC, header, bytes(nan_lr))
    return cases


def test_malformed_mezo_files_are_one_line_errors_and_store_nothing(env):
    data = exported(env)
    before = db_rows(env)
    cases = _mezo_fuzz(data)
    for label, bad in cases.items():
        if label == "spec no target in base":
            continue  # the tiny Llama has mlp linears: checked separately below
        f = env / "bad.pkd"
        f.write_bytes(bad)
        code, out = pocketd("checkpoint", "import", str(f))
        assert code == 1, (label, out)
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pocketd: error: ") and str(f) in lines[0], (label, out)
        assert "Traceback" not in out
        assert db_rows(env) == before, label


def test_a_spec_that_does_not_fit_the_base_is_refused_before_anything_is_stored(env, monkeypatch):
    data = exported(env)
    header, body = split(data)
    header["spec"]["lora"]["targets"] = "all"
    from pocketd.trainer import lora

    monkeypatch.setattr(lora, "_block_kind", lambda parent: None)  # a base without attention or mlp blocks
    f = env / "nofit.pkd"
    f.write_bytes(resign(ckptfile.MAGIC, header, body))
    before = db_rows(env)
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 1 and "does not fit the configured base" in out and str(f) in out, out
    assert db_rows(env) == before


# -- forged models: never current, never "verified" ---------------------------------------------------------------


def test_absurd_learning_rates_without_hashes_are_refused_as_non_finite(env):
    data = exported(env)
    header, body = split(data)
    for seg in header["segments"]:
        seg["hashes"] = {}
    forged = bytearray(body)
    for i in range(header["segments"][0]["n_steps"]):
        forged[16 * i : 16 * i + 4] = struct.pack("<f", 3e38)
    f = env / "forged.pkd"
    f.write_bytes(resign(ckptfile.MAGIC, header, bytes(forged)))
    before = db_rows(env)
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 1 and "NaN or infinite" in out and str(f) in out, out
    assert db_rows(env) == before
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        assert store.log.current().id == 1


def test_a_file_without_hashes_is_unverified_and_gated(env):
    data = exported(env)
    header, body = split(data)
    for seg in header["segments"]:
        seg["hashes"] = {}
    f = env / "nohash.pkd"
    f.write_bytes(resign(ckptfile.MAGIC, header, body))
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 0 and "unverified (no hashes)" in out and " verified" not in out.replace("unverified", ""), out
    assert "kept as rejected" in out  # same weights as current: no improvement, current unchanged
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        assert store.log.current().id == 1
        new = store.log.list()[-1]
        assert new.status is Status.REJECTED and new.val_loss is not None
    code, out = pocketd("checkpoint", "verify", str(new.id))
    assert code == 1 and "unverified (no hashes)" in out, out


def test_an_interrupted_import_leaves_nothing(env, monkeypatch):
    data = exported(env)
    f = env / "ck.pkd"
    before = db_rows(env)
    from pocketd.store.log import CheckpointLog

    calls = [0]
    real = CheckpointLog.append_step

    def dies_midway(self, *a, **kw):  # killed inside the store transaction, after some rows
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(CheckpointLog, "append_step", dies_midway)
    result = CliRunner().invoke(cli, ["checkpoint", "import", str(f)])
    assert result.exit_code != 0 and calls[0] == 3  # click turns the KeyboardInterrupt into "Aborted!"
    assert db_rows(env) == before
    monkeypatch.setattr(CheckpointLog, "append_step", real)

    from pocketd.trainer import replay

    monkeypatch.setattr(replay, "replay_step", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = CliRunner().invoke(cli, ["checkpoint", "import", str(f)])
    assert result.exit_code != 0 and "Aborted" in result.output
    assert db_rows(env) == before
    assert len(data) > 0


def test_a_killed_import_process_leaves_nothing(env):
    exported(env)
    before = db_rows(env)
    # The import process dies by SIGKILL in the middle of its replay (a hook in a wrapper script).
    script = ("import os, signal, sys\nfrom pocketd.trainer import replay\nreal = replay.replay_step\n"
              "n = [0]\ndef hook(*a, **kw):\n    n[0] += 1\n    if n[0] == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n    return real(*a, **kw)\n"
              "replay.replay_step = hook\nfrom pocketd.daemon.cli import main\n"
              "sys.argv = ['pocketd', 'checkpoint', 'import', sys.argv[1]]\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(env / "ck.pkd")], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == -9, proc.stderr
    assert db_rows(env) == before


# -- side files: shapes checked before allocating ---------------------------------------------------------------


@pytest.fixture
def side_env(tmp_path, tiny_model_dir, monkeypatch):
    return _env(tmp_path, tiny_model_dir, monkeypatch, 'method = "side"\nside_part = "mlp"\nside_hidden = 16\n')


def test_malformed_side_files_are_refused_before_allocating(side_env):
    env = side_env
    data = exported(env, steps=3)
    header, tensors = split(data)
    (n,) = struct.unpack_from("<Q", tensors, 0)
    st_header = json.loads(tensors[8 : 8 + n])
    before = db_rows(env)

    def with_st(meta: dict, blob: bytes | None = None) -> bytes:
        h = json.dumps(meta).encode()
        h += b" " * (-len(h) % 8)
        return resign(sidefile.MAGIC, header, struct.pack("<Q", len(h)) + h + (blob if blob is not None
                                                                                 else tensors[8 + n :]))

    huge = json.loads(json.dumps(st_header))
    huge["side.w1"]["shape"] = [1 << 30, 1 << 20]
    wrong = json.loads(json.dumps(st_header))
    w1 = wrong["side.w1"]
    w1["shape"] = [w1["shape"][1], w1["shape"][0]]  # same bytes, transposed: the header check catches it
    cases = {
        "hidden width huge": resign(sidefile.MAGIC, {**header, "spec": {**header["spec"], "hidden": 1 << 24}},
                                    tensors),
        "seed negative": resign(sidefile.MAGIC, {**header, "spec": {**header["spec"], "seed": -1}}, tensors),
        "n_steps a string": resign(sidefile.MAGIC, {**header, "n_steps": "3"}, tensors),
        "sha not hex": resign(sidefile.MAGIC, {**header, "sha256": "x"}, tensors),
        "tensor shape huge": with_st(huge),
        "tensor dtype int": with_st({**st_header, "side.b1": {**st_header["side.b1"], "dtype": "I64"}}),
        "tensor transposed": with_st(wrong),
        "tensor bytes short": with_st(st_header, tensors[8 + n : -4]),
    }
    for label, bad in cases.items():
        f = env / "bad.ckpt"
        f.write_bytes(bad)
        code, out = pocketd("checkpoint", "import", str(f))
        assert code == 1 and str(f) in out and len(out.strip().splitlines()) == 1, (label, out)
        assert db_rows(env) == before, label


def test_eval_and_generate_refuse_a_non_finite_side_model(side_env):
    env = side_env
    data = exported(env, steps=3)
    header, tensors = split(data)
    import torch
    from safetensors.torch import load, save

    from pocketd.trainer.params import TrainableSet

    state = load(tensors[: len(tensors)])
    state["side.b1"][0] = float("nan")
    blob = save(state)
    names = ("side.w1", "side.b1", "side.w2")
    sha = TrainableSet(names, tuple(state[k] for k in names)).sha256()
    assert torch.isnan(state["side.b1"]).any()
    # A forged file with a matching hash: the import refuses it as non-finite.
    f = env / "nan.ckpt"
    f.write_bytes(resign(sidefile.MAGIC, {**header, "sha256": sha}, blob))
    before = db_rows(env)
    code, out = pocketd("checkpoint", "import", str(f))
    assert code == 1 and "NaN or infinite" in out, out
    assert db_rows(env) == before
    # Stored anyway (an older pocketd's import): eval and generate name the checkpoint and refuse it.
    with Store.open(env / "data" / "pocketd.sqlite3") as store:
        store.log.save_state(1, 3, blob, sha)
    for args in (["eval"], ["generate", "--no-chat", "--max-tokens", "2", "--seed", "1", "hi"]):
        code, out = pocketd(*args)
        assert code == 1 and "checkpoint 1" in out and "NaN or infinite" in out, (args, out)
