"""Load time and peak RSS of the default model: first load (GGUF conversion) vs cached loads.

Each measurement runs in a fresh process (`python bench/model_load.py --one ...`)
so the figures include imports and nothing is shared between them.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/model_load.py [--model default] [--repeat 3] [--json out.json]

--smoke: the tiny test model, one cached load after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import ROOT, rss_mb


def one(model: str, cache_dir: Path, dtype: str) -> dict[str, object]:
    """One load in this process; the figures as a dict."""
    t0 = time.monotonic()
    import torch  # noqa: F401  (import time is part of what a session pays, reported apart)
    import transformers.models.llama.modeling_llama  # noqa: F401  (transformers imports lazily)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from pocketd.trainer.model import load_base

    t_import = time.monotonic() - t0
    base = load_base(model, cache_dir, dtype)
    wall = time.monotonic() - t0
    rss_loaded = rss_mb()
    with torch.inference_mode():  # touch every weight: mmap'd pages count only once read
        base.model(torch.ones(1, 16, dtype=torch.long))
    return {
        "converted": base.converted,
        "import_s": round(t_import, 2),
        "load_s": round(base.load_seconds, 2),
        "wall_s": round(wall, 2),
        "rss_loaded_mb": round(rss_loaded, 1),
        "rss_forward_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(benchlib.ru_maxrss_mib(), 1),
        "fingerprint": base.fingerprint,
    }


def run_child(model: str, cache_dir: Path, dtype: str) -> dict[str, object]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, __file__, "--one", "--model", model, "--cache-dir", str(cache_dir), "--dtype", dtype],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        sys.exit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3, help="cached loads after the first")
    ap.add_argument("--cache-dir", type=Path, default=None, help="(default: a fresh temporary dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    benchlib.smoke_flag(ap)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(one(args.model, args.cache_dir, args.dtype)))
        return

    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        if args.smoke:
            args.repeat = 1
            args.model = str(benchlib.tiny_model(Path(tmp) / "tiny-model", in_process=False))
        rows = [("first", run_child(args.model, cache_dir, args.dtype))]
        rows += [(f"cached {i + 1}", run_child(args.model, cache_dir, args.dtype)) for i in range(args.repeat)]

    print(f"model={args.model} dtype={args.dtype}")
    print("import s: torch + transformers; load s: load_base; RSS: after loading / after one forward "
          "(mmap'd weights are resident only once read); peak: ru_maxrss of the process")
    print(f"{'load':<10} {'converted':>9} {'import s':>9} {'load s':>7} {'wall s':>7} {'RSS MB':>7} "
          f"{'fwd RSS':>8} {'peak MB':>8}")
    for name, r in rows:
        print(f"{name:<10} {str(r['converted']):>9} {r['import_s']:>9} {r['load_s']:>7} {r['wall_s']:>7} "
              f"{r['rss_loaded_mb']:>7} {r['rss_forward_mb']:>8} {r['peak_rss_mb']:>8}")
    fingerprints = {r["fingerprint"] for _, r in rows}
    print(f"fingerprints identical: {len(fingerprints) == 1} ({next(iter(fingerprints))[:16]}...)")
    if args.json:
        args.json.write_text(json.dumps([{"load": n, **r} for n, r in rows], indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
