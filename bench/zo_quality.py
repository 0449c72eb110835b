"""Held-out quality per wall-clock budget: LoRA-AdamW vs textbook LoRA-MeZO vs pocketd's methods (issues 6, 7).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/zo_quality.py [--minutes 10] [--eval-windows 128]
        [--variant NAME='{"lr": 1e-3, ...}' ...] [--only adamw,textbook,pocketd,side,side-block@1,step-cost,...]
        [--blocks 1 2] [--parallel N --threads T] [--smoke]

One command, one run. Ingests ../shared/data/til-notes-2020-2023.jsonl into a
temporary store; the store splits train / validation *by note* (a note's windows are
all on one side). Then, each in a fresh process so peak RSS is its own:

- adamw: LoRA-AdamW (rank 8, attention, all layers, lr --adamw-lr), backprop, the
  reference a user would pick instead (several --adamw-lr values: one run each, named
  adamw@LR, and the best of them is the reference of the ratios);
- textbook: LoRA-MeZO as the MeZO paper sets it (rank 8, attention, all layers,
  lr 1e-4, eps 1e-2, Gaussian z, plain SGD rule, no prefix sharing, no guard),
  through pocketd's own session;
- pocketd: pocketd's default TrainerConfig (method mezo) through its own session;
- side: the default TrainerConfig with method = "side" (AdamW on a small part above
  cached frozen activations), through its own session;
- side-block@K (one per --blocks K): method side with side_part = "block", K decoder
  layers appended (block expansion), through its own session;
- any --variant: the default TrainerConfig with the given fields changed;
- step-cost: one ZO step in units of one full forward (bs 8, seq 128), measured
  interleaved in one process: textbook, prefix sharing (n = 1), prefix sharing
  with every window's activations cached, and n = 4 directions sequentially;
- side-epochs: the side method's training time over the same --epoch-batches batches
  twice, for each side part: epoch 1 runs the backbone and fills the activation
  cache, epoch 2 reads it.

--parallel N runs N of them at once (each still its own process), --threads T gives each
T torch threads: with N x T = the cores, every run of a round shares the machine under
the same conditions (the load of anything else included), so their ratios stay fair.

Every training run gets the same wall-clock budget, counted from before the model
loads (as a daemon session is), the same seed (same batch order) and the same
held-out windows (the first --eval-windows validation windows). Prints a table:
steps, s/step, step cost in full forwards, peak RSS, perplexity before/after and
gain, and each method's gain over LoRA-AdamW's gain in the same run. Writes
bench/results/zo_quality.json.

--smoke: every run once on the tiny test model and 150 generated notes, 2 s budgets, seq 32,
8 held-out windows, all in one child process; the JSON and logs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib
from benchlib import MIB, RssSampler, copy_store, fmt

RESULTS = benchlib.BENCH / "results"
DEFAULT_JSON = RESULTS / "zo_quality.json"
DEFAULT_CACHE = RESULTS / "cache"
TEXTBOOK = {"lr": 1e-4, "eps": 1e-2, "lora_layers": None, "lora_fa": False, "lora_targets": "attention",
            "lora_rank": 8, "perturbation": "gaussian", "step_rule": "sgd", "prefix_sharing": False,
            "divergence_guard": False, "n_perturbations": 1, "lr_schedule": "constant"}
ADAMW_SPEC = {"lora_layers": None, "lora_fa": False, "lora_targets": "attention", "lora_rank": 8}


def config(a: dict[str, Any], **fields: Any) -> Any:
    from pocketd.trainer.config import TrainerConfig

    fields.setdefault("model", a.get("model", "default"))
    return TrainerConfig(seq_len=a["seq"], seed=a["seed"], batch_size=a["batch_size"],
                         eval_examples=a["eval_windows"], **fields)


def full_forward_s(model: Any, batch: Any, cfg: Any, k: int = 3) -> float:
    from pocketd.trainer.loss import mean_loss

    kw = {"micro_batch": cfg.micro_batch_size, "chunk_tokens": cfg.loss_chunk_tokens}
    mean_loss(model, batch, **kw)
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        mean_loss(model, batch, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fixed_batch(a: dict[str, Any], tokenizer: Any, store_path: str, n: int, offset: int = 0) -> Any:
    import random

    from pocketd.store import Store
    from pocketd.trainer.data import collate, items_for, pad_id_of

    with Store.open(store_path) as store:
        items = [it for it in items_for(store, tokenizer, "train", a["seq"]) if len(it.ids) == a["seq"]]
    chosen = random.Random(a["seed"] + offset).sample(items, n)
    return collate(chosen, pad_id_of(tokenizer))


def private_cache(a: dict[str, Any]) -> Path:
    """A cache dir of this worker's own (empty activation cache: every run starts cold, as a first
    session would) that shares the converted model of the common cache."""
    shared = Path(a["cache_dir"])
    own = Path(a["work_dir"]) / f"cache-{os.getpid()}"
    own.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("models", "file-hashes.json"):
        if (shared / name).exists() and not (own / name).exists():
            (own / name).symlink_to(shared / name)
    return own


def worker_session(a: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """pocketd's own session for the budget, its gate's evaluations as before/after."""
    from pocketd.trainer.job import SessionStatus, TrainingJob
    from pocketd.trainer.model import load_base
    from pocketd.trainer.session import run_session

    db = copy_store(a["store"], Path(a["work_dir"]) / f"s{os.getpid()}" / "store.db")
    cfg = config(a, **fields)
    job = TrainingJob(database=db, cache_dir=private_cache(a), trainer=cfg, memory_budget_mb=65536,
                      max_minutes=a["minutes"], evaluate=True)
    training_at, last_step = [0.0], [0.0]
    losses: list[float] = []

    def on_status(st: SessionStatus) -> None:
        if st.phase == "training" and not training_at[0]:
            training_at[0] = time.monotonic()
        if st.phase == "training" and st.step and st.loss is not None and len(losses) < st.step:
            losses.append(st.loss)
            last_step[0] = time.monotonic()

    sampler = RssSampler()
    with sampler.window() as w:
        outcome = run_session(job, threading.Event(), on_status)
    train_s = last_step[0] - training_at[0] if outcome.steps else 0.0
    s_per_step = train_s / outcome.steps if outcome.steps else None
    base = load_base(cfg.model, Path(a["cache_dir"]), cfg.dtype)
    fwd = full_forward_s(base.model, fixed_batch(a, base.tokenizer, a["store"], cfg.batch_size), cfg)
    before, after = outcome.parent_val_loss, outcome.val_loss
    from pocketd.store import Store

    with Store.open(db) as store:
        recs = list(store.log.steps(outcome.checkpoint_id)) if outcome.checkpoint_id else []
    grads = [abs(g) for r in recs for g in r.grads]
    return {"median_abs_grad": statistics.median(grads) if grads else None,
            "lr_first_last": [recs[0].lr, recs[-1].lr] if recs else None,
            "config": {k: (v.value if hasattr(v, "value") else v) for k, v in cfg.model_dump().items()},
            "steps": outcome.steps, "end_reason": outcome.end_reason.value, "step_backoffs": outcome.step_backoffs,
            "skipped_nonfinite": outcome.skipped_nonfinite, "promoted": outcome.promoted,
            "s_per_step": s_per_step, "forward_s": fwd,
            "step_cost": s_per_step / fwd if s_per_step else None,
            "loss_before": before, "loss_after": after,
            "ppl_before": math.exp(before) if before is not None else None,
            "ppl_after": math.exp(after) if after is not None else None,
            "train_loss_first10": statistics.fmean(losses[:10]) if losses else None,
            "train_loss_by_tenth": [statistics.fmean(losses[i * len(losses) // 10:(i + 1) * len(losses) // 10])
                                    for i in range(10)] if len(losses) >= 10 else None,
            "train_loss_last10": statistics.fmean(losses[-10:]) if losses else None,
            "peak_rss_mib": w["peak"] / MIB}


def worker_adamw(a: dict[str, Any], lr: float) -> dict[str, Any]:
    """LoRA-AdamW with the same budget accounting, batches and held-out windows as the sessions."""
    cfg = config(a, **ADAMW_SPEC)
    db = copy_store(a["store"], Path(a["work_dir"]) / f"adamw-{lr:g}" / "store.db")
    r = benchlib.adamw_quality(cfg, db, Path(a["cache_dir"]), lr, a["minutes"], RssSampler(), a.get("min_steps", 0))
    base = r["base"]
    fwd = full_forward_s(base.model, fixed_batch(a, base.tokenizer, a["store"], cfg.batch_size), cfg)
    s_per_step = r["train_loop_s"] / max(r["steps"], 1)
    return {"config": {"adamw_lr": lr, **ADAMW_SPEC}, "steps": r["steps"], "s_per_step": s_per_step,
            "forward_s": fwd, "step_cost": s_per_step / fwd, "loss_before": r["loss_before"],
            "loss_after": r["loss_after"], "ppl_before": r["ppl_before"], "ppl_after": r["ppl_after"],
            "peak_rss_mib": r["peak_rss_mib"]}


def worker_step_cost(a: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of one ZO step (the session's own step function) over one full forward, interleaved."""
    from pocketd.trainer.job import TrainingJob
    from pocketd.trainer.loss import mean_loss
    from pocketd.trainer.model import load_base
    from pocketd.trainer.replay import Spec, prepare_model
    from pocketd.trainer.methods.mezo import step_plan
    from pocketd.trainer.zo import Restore

    out: dict[str, Any] = {}
    k = a["cost_repeats"]
    for label, fields in (("textbook", TEXTBOOK), ("default", {}), ("default n=4", {"n_perturbations": 4}),
                          ("default n=4 batched", {"n_perturbations": 4, "batched_perturbations": True}),
                          ("default batched", {"batched_perturbations": True})):
        cfg = config(a, **fields)
        base = load_base(cfg.model, Path(a["cache_dir"]), cfg.dtype)
        model = base.model
        params = prepare_model(model, Spec.from_config(cfg))
        batches = [fixed_batch(a, base.tokenizer, a["store"], cfg.batch_size, offset=i) for i in range(k)]
        kw = {"micro_batch": cfg.micro_batch_size, "chunk_tokens": cfg.loss_chunk_tokens}
        cache_dir = Path(a["work_dir"]) / f"cost-{label.replace(' ', '-')}"

        def plan(cache_mb: int) -> Any:
            job = TrainingJob(database=Path(a["store"]), cache_dir=cache_dir, memory_budget_mb=65536,
                              trainer=cfg.model_copy(update={"activation_cache_mb": cache_mb}))
            return step_plan(model, params, "bench", job)

        plain_step, cached_step = plan(0), plan(4096)
        seeds = list(range(cfg.n_perturbations))

        def timed(step: Any, batch: Any) -> float:
            t0 = time.perf_counter()
            step(batch, seeds, Restore.SNAPSHOT)
            return time.perf_counter() - t0

        timed(plain_step, batches[0])  # warm-up
        fwd, plain, cold, warm = [], [], [], []
        for b in batches:  # interleaved: forward, step, step filling the cache, step reading it
            t0 = time.perf_counter()
            mean_loss(model, b, **kw)
            fwd.append(time.perf_counter() - t0)
            plain.append(timed(plain_step, b))
            cold.append(timed(cached_step, b))
            warm.append(timed(cached_step, b))
        f = statistics.median(fwd)
        cached = any(cache_dir.rglob("*.act"))
        out[label] = {"forward_s": f, "step_s": statistics.median(plain), "step_cost": statistics.median(plain) / f,
                      "n": cfg.n_perturbations, "lora_layers": cfg.lora_layers,
                      "cached_step_cost": statistics.median(warm) / f if cached else None,
                      "cache_filling_step_cost": statistics.median(cold) / f if cached else None}
    return out


def worker_side_epochs(a: dict[str, Any]) -> dict[str, Any]:
    """The side method's step time over the same examples twice: epoch 1 fills the activation cache
    (the backbone runs), epoch 2 reads it (only the trained part, the head and its backward run)."""
    from pocketd.trainer.model import load_base
    from pocketd.trainer.prefix import Parts, batch_prefixes
    from pocketd.trainer.actcache import ActivationCache
    from pocketd.trainer.backprop import loss_backward
    from pocketd.trainer.side import SideSpec, attach_side

    import torch

    out: dict[str, Any] = {}
    for part in ("adapters", "mlp", "block"):
        cfg = config(a, method="side", side_part=part)
        base = load_base(cfg.model, Path(a["cache_dir"]), cfg.dtype)
        att = attach_side(base.model, SideSpec.from_config(cfg))
        leaves = att.train_mode(True)
        opt = torch.optim.AdamW(leaves, lr=cfg.side_lr)
        parts = Parts.of(base.model)
        at = att.spec.start_layer(len(parts.layers))
        cache = ActivationCache(Path(a["work_dir"]) / f"epochs-{part}", base.fingerprint, at,
                                parts.head.weight.dtype, int(parts.head.weight.shape[1]), 2**32)
        batches = [fixed_batch(a, base.tokenizer, a["store"], cfg.batch_size, offset=100 + i)
                   for i in range(a["epoch_batches"])]

        def epoch() -> float:
            t0 = time.perf_counter()
            for b in batches:
                opt.zero_grad(set_to_none=True)
                loss_backward(parts, batch_prefixes(parts, b, at, cfg.micro_batch_size, cache), cfg.loss_chunk_tokens)
                opt.step()
            return time.perf_counter() - t0

        first = epoch()
        hits_before = cache.hits
        second = epoch()
        out[part] = {"batches": len(batches), "first_s": first, "second_s": second, "ratio": second / first,
                     "second_epoch_hits": cache.hits - hits_before, "windows": len(batches) * cfg.batch_size,
                     "cached_mib": cache.bytes_used / 2**20}
        att.train_mode(False)
        del base, att, opt
    return out


def worker(name: str, a: dict[str, Any]) -> dict[str, Any]:
    if a.get("threads"):
        import torch

        torch.set_num_threads(a["threads"])
    if name.startswith("side-block@"):
        return worker_session(a, {"method": "side", "side_part": "block", "side_blocks": int(name.partition("@")[2]),
                                  "threads": a.get("threads")})
    if name.startswith("adamw"):
        return worker_adamw(a, float(name.partition("@")[2] or a["adamw_lr"][0]))
    if name == "step-cost":
        return worker_step_cost(a)
    if name == "side-epochs":
        return worker_side_epochs(a)
    threads = {"threads": a.get("threads")}
    if name == "side":
        return worker_session(a, {"method": "side", **threads, **a["variants"].get(name, {})})
    if name == "textbook":
        return worker_session(a, {**TEXTBOOK, **threads})
    return worker_session(a, {**threads, **a["variants"].get(name, {})})


def gain_pct(r: dict[str, Any]) -> float | None:
    if r.get("ppl_before") is None or r.get("ppl_after") is None:
        return None
    return 100.0 * (1.0 - r["ppl_after"] / r["ppl_before"])


def render(results: dict[str, dict[str, Any]]) -> str:
    # The reference is the best LoRA-AdamW of the run (one per --adamw-lr).
    adamws = [r for n, r in results.items() if n.startswith("adamw") and "error" not in r]
    best = max(adamws, key=lambda r: gain_pct(r) or -math.inf, default={})
    ref = gain_pct(best)
    rows = [("method", "steps", "s/step", "step cost (fwd)", "peak RSS MiB", "ppl before", "ppl after", "gain %",
             "gain / AdamW's", "RSS / AdamW's", "RSS / pocketd's")]
    adamw_rss = best.get("peak_rss_mib")
    mezo_rss = results.get("pocketd", {}).get("peak_rss_mib")
    for name, r in results.items():
        if name in ("step-cost", "side-epochs") or "error" in r:
            continue
        g = gain_pct(r)
        rows.append((name, str(r["steps"]), fmt(r["s_per_step"], ".2f"), fmt(r["step_cost"], ".2f"),
                     fmt(r["peak_rss_mib"], ".0f"), fmt(r["ppl_before"]), fmt(r["ppl_after"]), fmt(g, "+.2f"),
                     fmt(g / ref if g is not None and ref else None, ".3f"),
                     fmt(r["peak_rss_mib"] / adamw_rss if adamw_rss else None, ".3f"),
                     fmt(r["peak_rss_mib"] / mezo_rss if mezo_rss else None, ".3f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
    cost = results.get("step-cost")
    if cost and "error" not in cost:
        text += "\n\nZO step cost in full forwards (bs %d, seq %d), medians interleaved in one process:" % (
            ARGS["batch_size"], ARGS["seq"])
        for label, c in cost.items():
            if not isinstance(c, dict):
                continue
            text += (f"\n  {label:20s} step {c['step_cost']:.2f}  (n={c['n']}, lora_layers={c['lora_layers']})"
                     + (f"  cached activations {c['cached_step_cost']:.2f}  filling the cache {c['cache_filling_step_cost']:.2f}"
                        if c["cached_step_cost"] is not None else ""))
    epochs = results.get("side-epochs")
    if epochs and "error" not in epochs:
        text += "\n\nside method, the same examples twice (epoch 1 runs the backbone and fills the cache, epoch 2 reads it):"
        for part, e in epochs.items():
            if not isinstance(e, dict):  # worker_wall_s
                continue
            text += (f"\n  {part:9s} {e['windows']} windows: epoch 1 {e['first_s']:.1f} s, epoch 2 {e['second_s']:.1f} s "
                     f"= {100 * e['ratio']:.0f} % of epoch 1 ({e['second_epoch_hits']} cache hits, "
                     f"{e['cached_mib']:.1f} MiB cached)")
    for name, r in results.items():
        if "error" in r:
            text += f"\n{name} FAILED: {r['error']}"
    return text


ARGS: dict[str, Any] = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per method (default 10)")
    p.add_argument("--eval-windows", type=int, default=128, help="held-out validation windows (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--adamw-lr", type=float, nargs="+", default=[1e-4],
                   help="LoRA-AdamW learning rate(s); the best of them is the reference (default 1e-4)")
    p.add_argument("--blocks", type=int, nargs="*", default=[1, 2],
                   help="side-block@K runs: decoder layers appended (default 1 2)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once, each its own process (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    p.add_argument("--cost-repeats", type=int, default=5)
    p.add_argument("--epoch-batches", type=int, default=8, help="side-epochs: batches per epoch (default 8)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="extra session: the default TrainerConfig with these fields (repeatable)")
    p.add_argument("--only", help="comma-separated subset of: adamw, textbook, pocketd, side, step-cost, side-epochs, "
                   "variant names")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="model cache (GGUF converted once)")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    benchlib.smoke_flag(p)
    args = p.parse_args()
    if args.worker:
        settings = json.loads(args.settings)
        benchlib.run_workers(args.worker, lambda name: worker(name, settings))
        return
    if args.smoke:
        args.minutes, args.eval_windows, args.seq, args.cost_repeats, args.epoch_batches = 0.03, 8, 32, 1, 1
    variants = {}
    for v in args.variant:
        name, _, body = v.partition("=")
        variants[name] = json.loads(body)
    adamw_names = [f"adamw@{lr:g}" for lr in args.adamw_lr] if len(args.adamw_lr) > 1 else ["adamw"]
    names = [*adamw_names, "textbook", "pocketd", "side", *[f"side-block@{k}" for k in args.blocks],
             *[v for v in variants if v != "side"], "step-cost", "side-epochs"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="zo_quality.") as tmp:
        if args.smoke:
            args.json, args.cache_dir = str(Path(tmp) / "zo_quality.json"), str(Path(tmp) / "cache")
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        log_dir = json_path.parent / "logs"
        log_dir.mkdir(exist_ok=True)
        store = Path(tmp) / "store.db"
        notes = benchlib.write_notes_jsonl(Path(tmp) / "notes.jsonl", 150) if args.smoke else benchlib.TIL_NOTES
        ingested = benchlib.ingest_store(store, [notes])
        print(f"ingested {ingested}", file=sys.stderr)
        ARGS.update(store=str(store), work_dir=tmp, cache_dir=str(Path(args.cache_dir).resolve()),
                    minutes=args.minutes, eval_windows=args.eval_windows, batch_size=args.batch_size, seq=args.seq,
                    seed=args.seed, adamw_lr=args.adamw_lr, cost_repeats=args.cost_repeats, variants=variants,
                    epoch_batches=args.epoch_batches, threads=args.threads, parallel=args.parallel)
        if args.smoke:
            ARGS["model"] = str(benchlib.tiny_model(Path(tmp) / "tiny-model", in_process=False))
            ARGS["min_steps"] = 1  # the AdamW loop runs at least once even when loading ate the budget

        def save() -> None:
            json_path.write_text(json.dumps({"args": {k: v for k, v in ARGS.items() if k not in ("store", "work_dir")},
                                             "ingested": ingested, "results": results}, indent=2))

        script = Path(__file__).resolve()
        if args.smoke:  # every run in one child: one torch import, not six
            results.update(benchlib.spawn_workers(script, names, json.dumps(ARGS), log_dir / "zo_quality-smoke.log"))
            save()
        def one(name: str) -> None:
            t0 = time.monotonic()
            results[name] = benchlib.spawn_workers(script, [name], json.dumps(ARGS),
                                                   log_dir / f"zo_quality-{name}.log")[name]
            print(f"{name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            save()

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            list(pool.map(one, [] if args.smoke else names))
        results = {n: results[n] for n in names if n in results}  # the table in the order of the names
    print(render(results))
    if args.smoke:
        sys.exit(1 if any("error" in r for r in results.values()) else 0)
    print(f"\nwrote {json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
