"""Using the model must not cost more the longer it trained: verified snapshots beside the seed log (issue 17).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/snapshot_chain.py [--model default] [--chains 100,10000,100000]

For each chain length N, a private store (the same generated notes) gets one current mezo checkpoint of
N steps with the default trainer configuration. The long chains are not trained (100,000 steps would
take days): their step rows (seeds from a seeded RNG, projected gradients ~ N(0, 1), learning rate 1e-7
so the replay stays finite) are written through the store API (`append_step`) in one transaction, then
one replay on the base records the hashes (after step 0 and step N) and the snapshot at step N
(`replay.record_hashes`, what `pocketd forget` runs for a rebuilt chain). Then, each as the user runs it
(a fresh `pocketd` process, the fastest of --repeat runs): `train --steps 1 --no-eval` (session start to the first step, and the step),
`eval`, `generate --max-tokens 1`, and `checkpoint verify` (which replays the whole log: the cost every
one of them paid before snapshots). The table gives the seconds and the ratio to the shortest chain.

--smoke: the tiny test model, chains of 10 and 300 steps (the shortest and a long one: each chain
costs four fresh `pocketd` processes).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import ROOT

COMMANDS = {
    "session start to first step": ("train", "--steps", "1", "--no-eval"),
    "eval": ("eval",),
    "generate --max-tokens 1": ("generate", "--max-tokens", "1", "--seed", "1", "Hello"),
}
VERIFY = "checkpoint verify (whole log)"


def write_config(path: Path, model: str, data_dir: Path, cache_dir: Path, eval_examples: int) -> Path:
    path.write_text(f'[trainer]\nmodel = "{model}"\neval_examples = {eval_examples}\n[paths]\ndata_dir = "{data_dir}"\ncache_dir = "{cache_dir}"\n')
    path.chmod(0o600)
    return path


def build_chain(db: Path, model: str, cache_dir: Path, n_steps: int) -> dict[str, float]:
    """One current mezo checkpoint of `n_steps` written rows, its hashes and snapshot recorded by one replay."""
    from pocketd.store import Status, StepRecord, Store, f32
    from pocketd.trainer.config import TrainerConfig
    from pocketd.trainer.model import load_base
    from pocketd.trainer.replay import Spec, estimator_dict, record_hashes

    cfg = TrainerConfig(model=model)
    rng = random.Random(n_steps)
    base = load_base(cfg.model, cache_dir, cfg.dtype)
    t0 = time.perf_counter()
    with Store.open(db) as store:
        with store.db.atomic():
            cid = store.log.create(parent_id=None, method="mezo", base_fingerprint=base.fingerprint,
                                   spec=Spec.from_config(cfg).to_dict(), estimator=estimator_dict(cfg),
                                   status=Status.CURRENT, note=f"bench: {n_steps} written step rows")
            for i in range(n_steps):
                seeds = tuple(rng.getrandbits(63) for _ in range(cfg.n_perturbations))
                grads = tuple(f32(rng.gauss(0.0, 1.0)) for _ in seeds)
                store.log.append_step(cid, StepRecord(i, seeds, grads, f32(1e-7)))
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        record_hashes(store, base.model, base.fingerprint, cid)
        t_hash = time.perf_counter() - t0
        snap = store.snapshots.get(cid)
        if snap is None:
            raise SystemExit(f"chain of {n_steps}: no snapshot was recorded")
    return {"write_s": t_write, "hash_replay_s": t_hash, "snapshot_bytes": float(len(snap.data))}


def timed(env: dict[str, str], *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pocketd.daemon", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pocketd {' '.join(args)} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return seconds, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help='trainer.model ("default": SmolLM2-135M GGUF)')
    p.add_argument("--chains", default="100,10000,100000", help="chain lengths, comma-separated")
    p.add_argument("--notes", type=int, default=200, help="generated notes in each store")
    p.add_argument("--cache-dir", type=Path, default=None, help="reuse this cache (the converted default model)")
    p.add_argument("--eval-examples", type=int, default=16, help="trainer.eval_examples (eval's constant cost)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command; the fastest counts (shared CPUs)")
    benchlib.smoke_flag(p)
    args = p.parse_args()
    benchlib.offline_defaults()
    chains = [int(x) for x in args.chains.split(",")]
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-snap-") as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if args.smoke:
            model, chains, args.notes, args.repeat = str(benchlib.tiny_model(tmp / "tiny")), [10, 300], 40, 1
        home = benchlib.make_home(tmp)
        cache_dir = args.cache_dir or tmp / "cache"
        seed_db = tmp / "seed" / benchlib.DB_NAME
        benchlib.ingest_store(seed_db, [benchlib.write_notes_jsonl(tmp / "notes.jsonl", args.notes)])
        print(f"model {model}; {args.notes} generated notes per store; chains {', '.join(map(str, chains))}")
        print("long chains: step rows written through the store API in one transaction (seeded seeds, "
              "gradients ~ N(0,1), lr 1e-7), hashes and the snapshot recorded by one replay")
        rows, built = [], {}
        for n in chains:
            data_dir = tmp / f"chain{n}"
            benchlib.copy_store(seed_db, data_dir / benchlib.DB_NAME)
            built[n] = build_chain(data_dir / benchlib.DB_NAME, model, cache_dir, n)
            cfg = write_config(tmp / f"chain{n}.toml", model, data_dir, cache_dir, args.eval_examples)
            env = benchlib.private_env(home, config=cfg)
            figures = {name: min(timed(env, *argv)[0] for _ in range(args.repeat)) for name, argv in COMMANDS.items()}
            seconds, out = timed(env, "checkpoint", "verify", "1")
            if f"checkpoint 1: ok ({n} steps replayed" not in out:
                raise SystemExit(f"chain of {n}: verify did not replay all {n} steps exactly: {out[-500:]}")
            figures[VERIFY] = seconds
            rows.append((n, figures))
            print(f"chain {n:>7}: rows written in {built[n]['write_s']:.1f} s, hashes + snapshot by one replay in "
                  f"{built[n]['hash_replay_s']:.1f} s; verify exact ({n} steps replayed, every hash matches)")
        short = rows[0][1]
        names = [*COMMANDS, VERIFY]
        print()
        print(benchlib.table(["steps", *[f"{k} s" for k in names], *[f"x {k}" for k in COMMANDS]],
                             [(f"{n:,}", *[f"{f[k]:.2f}" for k in names],
                               *[f"{f[k] / short[k]:.2f}" for k in COMMANDS]) for n, f in rows]))
        worst = max(f[k] / short[k] for _n, f in rows for k in COMMANDS)
        print(f"\nworst ratio to the {rows[0][0]}-step chain: {worst:.2f} (goal <= 1.2)")
        print(f"snapshot bytes per checkpoint ({model}, default LoRA spec): {int(built[chains[0]]['snapshot_bytes']):,}")


if __name__ == "__main__":
    main()
