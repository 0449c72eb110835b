"""The side method: backprop through a small part above cached frozen activations (trainer.method = "side")."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from pydantic import ValidationError

from pocketd.store import Status, Store
from pocketd.trainer.actcache import ActivationCache
from pocketd.trainer.backprop import loss_backward
from pocketd.trainer.config import SidePart, TrainerConfig
from pocketd.trainer.data import collate, items_for, pad_id_of
from pocketd.trainer.errors import ReplayMismatch
from pocketd.trainer.job import ExitCode
from pocketd.trainer.loss import mean_loss
from pocketd.trainer.model import load_base
from pocketd.trainer.prefix import Parts, batch_prefixes
from pocketd.trainer.checkpoints import load_checkpoint
from pocketd.trainer.side import SideSpec, attach_side

from tests.trainer_helpers import invoke_cli, side_cli_env, NOTES, fill_store, make_job, run, start_trainer

PARTS = [{"side_part": "adapters", "lora_layers": 1}, {"side_part": "mlp"}, {"side_part": "block", "side_blocks": 2}]
PART_IDS = ["adapters", "mlp", "block"]
TENSOR_PARTS = [{"side_part": "mlp"}, {"side_part": "block"}]  # the parts trained above the whole base


def _perturb(att, seed: int = 0) -> None:
    """Make the side part non-trivial (a fresh one is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in att.params.tensors:
            t.add_(0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _batch(tmp_path, base, n: int = 4):
    db = tmp_path / "db.sqlite3"
    fill_store(db)
    with Store.open(db) as store:
        items = items_for(store, base.tokenizer, "train", 32)[:n]
    return collate(items, pad_id_of(base.tokenizer))


# -- the config switch --------------------------------------------------------------------------------------

def test_method_is_validated_by_config():
    assert TrainerConfig(method="side").method.value == "side"
    with pytest.raises(ValidationError, match="method"):
        TrainerConfig(method="sideways")
    with pytest.raises(ValidationError, match="trainable"):
        TrainerConfig(method="side", trainable="full")
    with pytest.raises(ValidationError, match="lora_layers"):
        TrainerConfig(method="side", side_part="adapters", lora_layers=None)
    with pytest.raises(ValidationError, match="side_part"):
        TrainerConfig(method="side", side_part="everything")
    with pytest.raises(ValidationError, match="side_lr"):
        TrainerConfig(method="side", side_lr=0)
    assert TrainerConfig(method="side", side_part="mlp", lora_layers=None).side_part is SidePart.MLP


# -- the loss and its gradient --------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", PARTS, ids=PART_IDS)
@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_loss_and_gradient_equal_a_full_forward_and_backward(tmp_path, tiny_model_dir, fields, cached):
    cfg = TrainerConfig(method="side", model=str(tiny_model_dir), **fields)
    base = load_base(cfg.model, tmp_path / "cache")
    spec = SideSpec.from_config(cfg)
    att = attach_side(base.model, spec)
    _perturb(att)
    batch = _batch(tmp_path, base)
    leaves = att.train_mode(True)
    # Reference: an ordinary forward and backward through the whole model.
    full = mean_loss(base.model, batch, micro_batch=8, chunk_tokens=10_000)
    ids, mask = batch.input_ids, batch.attention_mask
    logits = base.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = mask[:, 1:].bool()
    ref = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
    ref.backward()
    ref_grads = [p.grad.clone() for p in leaves]
    for p in leaves:
        p.grad = None

    parts = Parts.of(base.model)
    at = spec.start_layer(len(parts.layers))
    cache = None
    if cached:
        cache = ActivationCache(tmp_path / "acts", base.fingerprint, at, torch.float32,
                                int(parts.head.weight.shape[1]), 2**24)
        batch_prefixes(parts, batch, at, 2, cache)  # fill
        assert len(cache) == len(batch)
    prefixes = batch_prefixes(parts, batch, at, 2, cache)
    if cached:
        assert cache.hits == len(batch)
    loss, n = loss_backward(parts, prefixes, chunk_tokens=7)
    assert n == batch.n_targets()
    assert loss == pytest.approx(full, abs=1e-5) and loss == pytest.approx(ref.item(), abs=1e-5)
    for got, want in zip([p.grad for p in leaves], ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in ref_grads)


def test_head_never_sees_more_than_a_chunk(tmp_path, tiny_model_dir):
    cfg = TrainerConfig(method="side", model=str(tiny_model_dir), side_part="mlp")
    base = load_base(cfg.model, tmp_path / "cache")
    att = attach_side(base.model, SideSpec.from_config(cfg))
    att.train_mode(True)
    parts = Parts.of(base.model)
    rows: list[int] = []
    handle = parts.head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    batch = _batch(tmp_path, base)
    loss_backward(parts, batch_prefixes(parts, batch, len(parts.layers), 4), chunk_tokens=16)
    handle.remove()
    assert rows and max(rows) <= 16 and sum(rows) == batch.n_targets()


# -- sessions and checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", PARTS, ids=PART_IDS)
def test_session_trains_gates_and_the_checkpoint_reloads_exactly(tmp_path, tiny_model_dir, fields):
    job = make_job(tmp_path, tiny_model_dir, method="side", side_lr=1e-2, max_steps=12, **fields)
    fill_store(job.database)
    out = run(job)
    assert out.steps == 12 and out.promoted is True and out.val_loss < out.parent_val_loss
    assert out.loss_last < out.loss_first
    with Store.open(job.database) as store:
        ck = store.log.get(out.checkpoint_id)
        assert ck.method == "side" and ck.status is Status.CURRENT and ck.n_steps == 12
        n_steps, data, sha = store.log.state(ck.id)
        assert n_steps == 12 and store.log.hashes(ck.id)[12] == sha and len(data) < 2**20
        assert store.log.checkpoints_with_documents([d.id for d in store.docs.list()])[ck.id]
        assert sum(store.docs.trained_counts().values()) == 12 * job.trainer.batch_size
        base, params, got = load_checkpoint(store, job.trainer, job.cache_dir, verify=True)
    assert got.id == ck.id and params.sha256() == sha
    items = items_for(Store.open(job.database), base.tokenizer, "validation", job.trainer.seq_len)
    from pocketd.trainer.evaluate import evaluate

    again = evaluate(base.model, items[: job.trainer.eval_examples], pad_id=pad_id_of(base.tokenizer),
                     batch_size=4, micro_batch=8, chunk_tokens=256)
    assert again.loss == pytest.approx(out.val_loss, abs=1e-6)


@pytest.mark.parametrize("fields", TENSOR_PARTS, ids=["mlp", "block"])
def test_next_session_continues_from_the_current_tensors(tmp_path, tiny_model_dir, fields):
    job = make_job(tmp_path, tiny_model_dir, method="side", side_lr=1e-2, max_steps=6, **fields)
    fill_store(job.database, NOTES * 2)
    first = run(job)
    second = run(job)
    with Store.open(job.database) as store:
        ck = store.log.get(second.checkpoint_id)
    assert ck.parent_id == first.checkpoint_id
    assert second.parent_val_loss == pytest.approx(first.val_loss, abs=1e-6)


@pytest.mark.parametrize("fields", TENSOR_PARTS, ids=["mlp", "block"])
def test_stop_saves_a_candidate_that_the_next_session_resumes(tmp_path, tiny_model_dir, fields):
    job = make_job(tmp_path, tiny_model_dir, method="side", max_steps=50, side_save_every_s=3600, **fields)
    fill_store(job.database)
    out = run(job, stop_after=4)
    assert out.end_reason.value == "stop requested" and out.steps == 4
    with Store.open(job.database) as store:
        ck = store.log.get(out.checkpoint_id)
        assert ck.status is Status.CANDIDATE and ck.n_steps == 4  # saved at the stop despite the long interval
        load_checkpoint(store, job.trainer, job.cache_dir, ck.id, verify=True)
    again = run(job.model_copy(update={"max_steps": 3}))
    assert again.checkpoint_id == out.checkpoint_id
    with Store.open(job.database) as store:
        assert store.log.get(out.checkpoint_id).n_steps == 7


@pytest.mark.parametrize("fields", TENSOR_PARTS, ids=["mlp", "block"])
def test_a_killed_session_leaves_loadable_checkpoints(tmp_path, tiny_model_dir, fields):
    job = make_job(tmp_path, tiny_model_dir, method="side", side_lr=1e-2, max_steps=4, **fields)
    fill_store(job.database)
    previous = run(job)  # a current checkpoint
    job = job.model_copy(update={"max_steps": 100_000, "status_file": tmp_path / "status.json",
                                 "trainer": job.trainer.model_copy(update={"side_save_every_s": 0.2})})
    proc = start_trainer(job, tmp_path / "job.json", until_step=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with Store.open(job.database) as store:
        assert store.db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert store.log.current().id == previous.checkpoint_id
        load_checkpoint(store, job.trainer, job.cache_dir, previous.checkpoint_id, verify=True)
        cand = store.log.list()[-1]
        assert cand.status is Status.CANDIDATE and cand.parent_id == previous.checkpoint_id
        load_checkpoint(store, job.trainer, job.cache_dir, cand.id, verify=True)  # its last save
        # Trained counts were committed with the tensors: exactly batch x saved steps.
        assert sum(store.docs.trained_counts().values()) == 4 * 4 + cand.n_steps * 4
    resumed = run(job.model_copy(update={"max_steps": 2, "status_file": None}))
    assert resumed.checkpoint_id == cand.id


@pytest.mark.parametrize("fields", TENSOR_PARTS, ids=["mlp", "block"])
def test_damaged_tensors_do_not_verify_and_are_not_trained_on(tmp_path, tiny_model_dir, fields):
    job = make_job(tmp_path, tiny_model_dir, method="side", max_steps=3, evaluate=False, **fields)
    fill_store(job.database)
    out = run(job)
    with Store.open(job.database) as store:
        n, data, sha = store.log.state(out.checkpoint_id)
        flipped = bytearray(data)
        flipped[-5] ^= 0x40
        store.db.execute("update checkpoint_states set data = ? where checkpoint_id = ?",
                         [bytes(flipped), out.checkpoint_id])
        with pytest.raises(ReplayMismatch, match=f"checkpoint {out.checkpoint_id}"):
            load_checkpoint(store, job.trainer, job.cache_dir, out.checkpoint_id, verify=True)
        store.db.execute("update checkpoint_states set data = ? where checkpoint_id = ?",
                         [b"garbage", out.checkpoint_id])
        with pytest.raises(ReplayMismatch, match="unreadable"):
            load_checkpoint(store, job.trainer, job.cache_dir, out.checkpoint_id)
    with pytest.raises(ReplayMismatch):
        run(job)  # the candidate is resumed only if it verifies


def test_cache_is_bounded_and_keyed_by_base_and_layer_spec(tmp_path, tiny_model_dir):
    job = make_job(tmp_path, tiny_model_dir, method="side", side_part="mlp", max_steps=6, evaluate=False,
                   activation_cache_mb=1)
    fill_store(job.database, NOTES * 3)
    run(job)
    root = job.cache_dir / "activations"
    dirs = {p.name for p in root.iterdir()}
    assert len(dirs) == 1
    used = sum(p.stat().st_size for p in root.rglob("*.act"))
    assert 0 < used <= 2**20
    run(job.model_copy(update={"trainer": job.trainer.model_copy(update={"side_part": SidePart.ADAPTERS,
                                                                             "lora_layers": 1})}))
    assert len({p.name for p in root.iterdir()}) == 2  # another layer: another key, nothing stale served
    other = tmp_path / "other-model"
    from pocketd.trainer.tiny import make_tiny_model_dir

    make_tiny_model_dir(other, seed=1)
    run(job.model_copy(update={"trainer": job.trainer.model_copy(update={"model": str(other)})}))
    assert len({p.name for p in root.iterdir()}) == 3  # another base: another key


def test_budget_estimate_counts_the_backward(tiny_model_dir):
    from pocketd.trainer.budget import estimate_need_mb

    mezo = estimate_need_mb(TrainerConfig(batch_size=8, seq_len=512), tiny_model_dir)
    side = estimate_need_mb(TrainerConfig(method="side", batch_size=8, seq_len=512, lora_layers=4), tiny_model_dir)
    assert side > mezo


# -- the command line ----------------------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    return side_cli_env(tmp_path, tiny_model_dir, monkeypatch, 'side_part = "adapters"\nlora_layers = 1\n')


pocketd = invoke_cli


def test_cli_train_verify_eval_generate_export_import(env):
    code, out = pocketd("train", "--steps", "6")
    assert code == 0 and "checkpoint 1: promoted" in out, out
    code, out = pocketd("checkpoint", "verify", "1")
    assert code == 0 and "side tensors of 6 steps" in out, out
    code, out = pocketd("checkpoint", "show", "1")
    assert code == 0 and json.loads(out)["method"] == "side"
    code, out = pocketd("eval", "--json")
    figures = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and figures["checkpoint 1"]["loss"] < figures["base"]["loss"]
    code, out = pocketd("generate", "--no-chat", "--max-tokens", "4", "--seed", "1", "bread")
    assert code == 0, out
    code, out = pocketd("export", "--adapter", str(env / "adapter"))
    assert code == 0 and (env / "adapter" / "adapter_model.safetensors").exists(), out
    code, out = pocketd("export", "--merged", str(env / "merged"))
    assert code == 0, out
    f = env / "side.ckpt"
    code, out = pocketd("checkpoint", "export", "1", str(f))
    assert code == 0 and oct(f.stat().st_mode & 0o777) == "0o600", out
    code, out = pocketd("checkpoint", "import", str(f))  # the current weights again: verified, not better
    assert code == 0 and "as checkpoint 2 (6 steps, verified" in out and "kept as rejected" in out, out
    damaged = bytearray(f.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (env / "bad.ckpt").write_bytes(bytes(damaged))
    code, out = pocketd("checkpoint", "import", str(env / "bad.ckpt"))
    assert code == 1 and "bad.ckpt" in out and "checksum" in out


def test_cli_export_of_a_side_mlp_is_refused_clearly(env):
    cfg = env / "config.toml"
    cfg.write_text(cfg.read_text().replace('side_part = "adapters"', 'side_part = "mlp"'))
    assert pocketd("train", "--steps", "3")[0] == 0
    code, out = pocketd("generate", "--no-chat", "--max-tokens", "4", "--seed", "1", "bread")
    assert code == 0 and "checkpoint 1" in out, out
    code, out = pocketd("eval", "--json")
    assert code == 0 and "checkpoint 1" in json.loads(out.strip().splitlines()[-1]), out
    for flag in ("--merged", "--adapter"):
        code, out = pocketd("export", flag, str(env / "out"))
        assert code == 1 and "side MLP" in out and "checkpoint export" in out and 'side_part = "block"' in out
        assert not (env / "out").exists()


def test_cli_forget_drops_side_checkpoints_that_saw_the_document(env):
    assert pocketd("train", "--steps", "6")[0] == 0
    assert pocketd("train", "--steps", "2")[0] == 0  # checkpoint 2 continues 1 (if promoted)
    db = env / "data" / "pocketd.sqlite3"
    with Store.open(db) as store:
        doc = next(d.id for d in store.docs.list() if store.log.checkpoints_with_documents([d.id]).get(1))
        before = store.log.list()
    code, out = pocketd("forget", "--document", str(doc))
    assert code == 0, out
    assert "retrains the side part" in out and "the base model" in out
    with Store.open(db) as store:
        assert store.log.current() is None
        for ck in before:
            assert store.log.get(ck.id).status is Status.FORGOTTEN and store.log.state(ck.id) is None
        assert store.log.checkpoints_with_documents([doc]) == {}
        # What the dropped checkpoints learned is gone: their examples count as untrained again.
        assert sum(store.docs.trained_counts().values()) == 0
    code, out = pocketd("train", "--steps", "3")
    assert code == 0 and "checkpoint 3" in out


# -- the daemon ----------------------------------------------------------------------------------------------

def test_the_daemon_trains_the_side_method_and_unplugging_stops_it_after_a_committed_save(tmp_path, tiny_model_dir):
    from pocketd.daemon.client import request
    from pocketd.daemon.service import Daemon
    from tests.daemon_helpers import make_config, set_power, wait_for

    set_power(tmp_path / "power.json", True)
    config = make_config(tmp_path, daemon={"stop_grace_s": 60.0, "nice": 0})
    config.trainer = TrainerConfig(model=str(tiny_model_dir), method="side", side_part="mlp", batch_size=4,
                                   seq_len=32, eval_examples=8, seed=3, side_save_every_s=3600)
    fill_store(config.paths.database)
    d = Daemon(config, supervise_interval_s=0.5)
    d.start()
    try:
        wait_for(lambda: (r := request(d.socket_path, "status"))["state"] == "training"
                 and (r["training"] or {}).get("step", 0) >= 3 and r, timeout=120, what="side training")
        set_power(tmp_path / "power.json", False)
        wait_for(lambda: request(d.socket_path, "status")["training"] is None, timeout=60, what="the stop")
        reply = request(d.socket_path, "history", sessions=5, events=0)
        (session,) = [s for s in reply["sessions"] if s["ended_at"]]
        assert session["exit_status"] == ExitCode.OK and session["steps"] >= 3, session
        with Store.open(config.paths.database) as store:
            ck = store.log.get(session["checkpoint_id"])
            # The long save interval never came: the stop itself committed every finished step.
            assert ck.method == "side" and ck.status is Status.CANDIDATE and ck.n_steps == session["steps"]
            load_checkpoint(store, config.trainer, config.paths.cache_dir, ck.id, verify=True)
    finally:
        d.shutdown()


def test_a_side_session_over_the_budget_is_refused_before_loading(tmp_path, tiny_model_dir):
    from pocketd.trainer.errors import OverBudget

    job = make_job(tmp_path, tiny_model_dir, method="side", memory_budget_mb=100)
    fill_store(job.database)
    with pytest.raises(OverBudget, match="memory_budget_mb is 100"):
        run(job)
    with Store.open(job.database) as store:
        assert store.log.list() == []
