"""GGUF exports checked by a real llama.cpp: perplexity and greedy text against pocketd's own (issue 16).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gguf_llama.py [--minutes 2] [--method side] [--part block]
        [--threads 2] [--cache-dir bench/results/cache] [--smoke]

One command, one run, in a private temporary home:

1. ingest ../shared/data/til-notes-2020-2023.jsonl; `pocketd train --minutes M` (default: method side,
   side_part block, so the checkpoint is a standard Llama of L + 1 layers that differs from the base);
2. `pocketd export --gguf FILE --type f16|q8_0 --checkpoint ID` and `export --merged DIR` (wall time,
   size, the export process's peak RSS);
3. perplexity on exactly the held-out windows `pocketd eval` uses (trainer.data.items_for +
   trainer.evaluate.eval_items with the same seq_len and eval_examples): pocketd's own model of the
   checkpoint, the GGUF loaded back by transformers, and the GGUF run by llama.cpp (llama-cpp-python:
   each window evaluated from an empty context, its logits read back); relative difference to pocketd's
   (targets: f16 <= 0.5 %, q8_0 <= 2 %);
4. greedy generation of 32 tokens on 4 prompts (the chat template's user turn, the same token ids fed to
   both): pocketd (trainer.generate's loop: encode_prompt, sample_next at temperature 0, stop ids; checked
   equal to `generate()`'s text) against llama.cpp (argmax of its logits): identical, or the first
   divergence with both runtimes' logit margin between the two tokens (a margin near 0 explains a flip);
   and whether llama.cpp's own tokenizer gives pocketd's ids for each chat prompt.

--smoke: the tiny test model, 60 generated notes, 2 steps, seq 32, 8 windows, one prompt; about a minute
(five pocketd commands start a Python with torch each). Without
llama-cpp-python (it builds llama.cpp from source) the llama.cpp columns stay empty and the script says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import benchlib
from benchlib import MIB, fmt

DEFAULT_CACHE = benchlib.BENCH / "results" / "cache"
TARGET_PCT = {"f16": 0.5, "q8_0": 2.0}
PROMPTS = [
    "What should I plant in a small vegetable garden in early spring?",
    "Write a short note about today's bike ride along the river.",
    "How do I keep a sourdough starter alive?",
    "List three things to remember before a long train journey.",
]
GEN_TOKENS = 32


def pocketd_cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    """`pocketd ARGS... --json` in a child; its JSON line, wall time and peak RSS (the child's own, wait4)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pocketd.daemon", *args, "--json"], cwd=benchlib.ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"pocketd {' '.join(args)} exited {proc.returncode}: {err.read()[-2000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "wall_s": time.monotonic() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}


def nll_sum(scores: Any, ids: list[int]) -> float:
    """Summed next-token negative log-likelihood of `ids` from logits rows [len(ids), V] (float64)."""
    import numpy as np

    s = np.asarray(scores[: len(ids) - 1], dtype=np.float64)  # [T-1, V]
    m = s.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
    return float((lse - s[np.arange(len(ids) - 1), ids[1:]]).sum())


def llama_perplexity(llm: Any, items: list[Any]) -> float:
    total, count = 0.0, 0
    for it in items:
        ids = [int(x) for x in it.ids]
        llm.reset()
        llm.eval(ids)
        total += nll_sum(llm.scores, ids)
        count += len(ids) - 1
    return math.exp(total / count)


def pocketd_greedy(model: Any, tokenizer: Any, ids: list[int]) -> tuple[list[int], list[Any]]:
    """trainer.generate's loop at temperature 0, keeping each step's logits row."""
    import torch

    from pocketd.trainer.generate import sample_next, stop_ids

    stops = stop_ids(model, tokenizer)
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    rows: list[Any] = []
    step_input, past = torch.tensor([ids]), None
    with torch.inference_mode():
        for _ in range(GEN_TOKENS):
            o = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = o.past_key_values
            row = o.logits[0, -1].float()
            nxt = sample_next(row, 0.0, 1.0, gen)
            out.append(nxt)
            rows.append(row.numpy().copy())
            if nxt in stops:
                break
            step_input = torch.tensor([[nxt]])
    return out, rows


def llama_greedy(llm: Any, ids: list[int], stops: set[int]) -> tuple[list[int], list[Any]]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    rows: list[Any] = []
    for _ in range(GEN_TOKENS):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        nxt = int(row.argmax())
        out.append(nxt)
        rows.append(row)
        if nxt in stops:
            break
        llm.eval([nxt])
    return out, rows


def compare_generation(tok: Any, a: tuple[list[int], list[Any]], b: tuple[list[int], list[Any]]) -> str:
    (ids_a, rows_a), (ids_b, rows_b) = a, b
    if ids_a == ids_b:
        return f"identical ({len(ids_a)} tokens)"
    i = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    if i >= min(len(ids_a), len(ids_b)):
        return f"same first {i} tokens, then one stopped"
    x, y = ids_a[i], ids_b[i]
    return (f"diverge at {i}: pocketd {tok.decode([x])!r} vs llama.cpp {tok.decode([y])!r}; margin pocketd "
            f"{rows_a[i][x] - rows_a[i][y]:+.3f}, llama.cpp {rows_b[i][y] - rows_b[i][x]:+.3f}")


def compare(a: argparse.Namespace, cfg: Any, db: Path, cache: Path, ck_id: int, files: dict[str, Path]) -> None:
    """Perplexities and generations; prints the tables."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' cache-argument renames
    import torch
    from transformers.utils import logging as hf_logging
    from transformers import AutoModelForCausalLM

    from pocketd.store import Store
    from pocketd.trainer.checkpoints import load_checkpoint
    from pocketd.trainer.data import items_for, pad_id_of
    from pocketd.trainer.evaluate import eval_items, evaluate
    from pocketd.trainer.generate import encode_prompt, generate, stop_ids
    from pocketd.trainer.model import load_base

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    with Store.open(db) as store:
        base, _params, _ck = load_checkpoint(store, cfg, cache, ck_id)
        items = eval_items(items_for(store, base.tokenizer, "validation", cfg.seq_len), cfg.eval_examples)
    tok, model = base.tokenizer, base.model
    kw = dict(pad_id=pad_id_of(tok), batch_size=cfg.batch_size, micro_batch=cfg.micro_batch_size,
              chunk_tokens=cfg.loss_chunk_tokens)
    ours = evaluate(model, items, **kw)
    plain = evaluate(load_base(cfg.model, cache, cfg.dtype).model, items, **kw)
    print(f"held-out: {ours.windows} windows, {ours.tokens} tokens (pocketd eval's); perplexity base "
          f"{plain.perplexity:.3f} -> checkpoint {ck_id} {ours.perplexity:.3f}\n")
    try:
        import llama_cpp
    except ImportError as e:
        llama_cpp = None
        print(f"llama.cpp: llama-cpp-python is not installed ({e}); its columns are empty\n")
    rows, llms = [], {}
    for name, path in files.items():
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).eval()
        hf_ppl = evaluate(hf, items, **kw).perplexity
        del hf
        ll_ppl = None
        if llama_cpp is not None:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, cfg.seq_len), n_batch=512, logits_all=True,
                                  n_threads=a.threads, verbose=False, seed=0)
            ll_ppl = llama_perplexity(llm, items)
            llms[name] = llm
        diff = None if ll_ppl is None else 100 * (ll_ppl - ours.perplexity) / ours.perplexity
        ok = "-" if diff is None else ("yes" if abs(diff) <= TARGET_PCT[name] else "NO")
        rows.append([name, f"{path.stat().st_size / MIB:.1f}", fmt(ll_ppl), f"{hf_ppl:.3f}", f"{ours.perplexity:.3f}",
                     fmt(diff, "+.3f"), f"{100 * (hf_ppl - ours.perplexity) / ours.perplexity:+.3f}",
                     f"<= {TARGET_PCT[name]}", ok])
    print(benchlib.table(["export", "MiB", "llama.cpp ppl", "transformers(GGUF) ppl", "pocketd ppl",
                          "llama.cpp diff %", "transformers diff %", "target %", "met"], rows))
    print(f"\ngreedy generation, {GEN_TOKENS} tokens, chat template, the same prompt ids in both runtimes:")
    stops = stop_ids(model, tok)
    for i, prompt in enumerate(PROMPTS[:1] if a.smoke else PROMPTS):
        ids = encode_prompt(tok, prompt, chat=True)
        mine = pocketd_greedy(model, tok, ids)
        text = generate(model, tok, prompt, GEN_TOKENS, temperature=0.0, chat=True)
        same_path = tok.decode([t for t in mine[0] if t not in stops], skip_special_tokens=True) == text
        print(f"prompt {i + 1}: {prompt!r} ({len(ids)} tokens; pocketd's loop = generate(): {same_path})")
        print(f"  pocketd: {text[:100]!r}")
        for name, llm in llms.items():
            chat_text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
            own_ids = llm.tokenize(chat_text.encode("utf-8"), add_bos=False, special=True)
            theirs = llama_greedy(llm, ids, stops)
            print(f"  {name:5} llama.cpp: {compare_generation(tok, mine, theirs)}; "
                  f"its tokenizer gives pocketd's prompt ids: {own_ids == ids}")
    for llm in llms.values():
        llm.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="training session budget (default 2)")
    p.add_argument("--method", default="side", choices=["side", "mezo"])
    p.add_argument("--part", default="block", help="side_part when --method side (default block)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="model cache (the GGUF converted once)")
    benchlib.smoke_flag(p)
    a = p.parse_args()
    benchlib.offline_defaults()
    with tempfile.TemporaryDirectory(prefix="gguf_llama.") as tmp_name:
        tmp = Path(tmp_name)
        home = benchlib.make_home(tmp)
        cache = tmp / "cache" if a.smoke else Path(a.cache_dir).resolve()
        data = tmp / "data"
        model = str(benchlib.tiny_model(tmp / "tiny-model", in_process=False)) if a.smoke else "default"
        fields: dict[str, Any] = {"model": model, "method": a.method, "threads": a.threads}
        if a.method == "side":
            fields["side_part"] = a.part
        if a.smoke:
            fields.update(seq_len=32, eval_examples=8, batch_size=4)
        env = benchlib.private_env(home, POCKETD_PATHS__DATA_DIR=str(data), POCKETD_PATHS__CACHE_DIR=str(cache),
                                   POCKETD_POLICY__MEMORY_BUDGET_MB="16000",
                                   **{f"POCKETD_TRAINER__{k.upper()}": str(v) for k, v in fields.items()})
        notes = benchlib.write_notes_jsonl(tmp / "notes.jsonl", 60) if a.smoke else benchlib.TIL_NOTES
        data.mkdir(mode=0o700)
        print(f"ingested {benchlib.ingest_store(data / benchlib.DB_NAME, [notes])}", file=sys.stderr)
        budget = ["--steps", "2"] if a.smoke else ["--minutes", str(a.minutes)]
        train = pocketd_cli(env, "train", *budget)
        ck = train["checkpoint_id"]
        print(f"trained: {fields} {train['steps']} steps in {train['wall_s']:.0f} s, checkpoint {ck} "
              f"(promoted: {train['promoted']}; validation loss {fmt(train['parent_val_loss'], '.4f')} -> "
              f"{fmt(train['val_loss'], '.4f')})")
        files: dict[str, Path] = {}
        rows = []
        for qtype in ("f16", "q8_0"):
            files[qtype] = tmp / "exports" / f"model-{qtype}.gguf"
            r = pocketd_cli(env, "export", "--gguf", str(files[qtype]), "--type", qtype, "--checkpoint", str(ck))
            rows.append([f"--gguf --type {qtype}", f"{r['bytes'] / MIB:.1f}", f"{r['wall_s']:.1f}",
                         f"{r['peak_rss_mib']:.0f}", f"{r['tensors']} tensors, {r['block_count']} blocks"])
        r = pocketd_cli(env, "export", "--merged", str(tmp / "exports" / "merged"), "--checkpoint", str(ck))
        rows.append(["--merged", f"{r['bytes'] / MIB:.1f}", f"{r['wall_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
                     ", ".join(r["files"])])
        print(benchlib.table(["pocketd export", "MiB", "wall s", "peak RSS MiB", "contents"], rows))
        print()
        from pocketd.trainer.config import TrainerConfig

        compare(a, TrainerConfig(**fields), data / benchlib.DB_NAME, cache, ck, files)


if __name__ == "__main__":
    main()
