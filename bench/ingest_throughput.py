"""Ingest throughput: a JSONL export into a fresh temporary store, then the same again (all duplicates).

    .venv/bin/python bench/ingest_throughput.py [PATH.jsonl] [--runs N] [--smoke]

Prints documents/s and MB/s (input bytes, 10^6) for the first ingest (decode, normalize,
split, one transaction per document into a WAL database on disk) and for the
re-ingest (everything a duplicate: decode, normalize, hash, look up). Best of N runs.
--smoke: 200 generated notes instead of PATH, one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from pocketd.ingest.config import IngestConfig
from pocketd.ingest.pipeline import ingest_paths
from pocketd.store import Store

DEFAULT_DATA = benchlib.TIL_NOTES


def _line(label: str, n_docs: int, n_bytes: int, seconds: float) -> str:
    return (f"{label:<10} {n_docs:>6} documents  {n_bytes / 1e6:7.3f} MB  {seconds:7.3f} s  "
            f"{n_docs / seconds:9.1f} documents/s  {n_bytes / 1e6 / seconds:7.2f} MB/s")


def run_once(path: Path, config: IngestConfig) -> tuple[float, float, int, int, int]:
    """(first seconds, re-ingest seconds, added, duplicates, rejected) into a fresh store."""
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp, Store.open(Path(tmp) / "bench.sqlite3") as store:
        t0 = time.perf_counter()
        first = ingest_paths(store, [path], config)
        t1 = time.perf_counter()
        again = ingest_paths(store, [path], config)
        t2 = time.perf_counter()
        if again.added:
            raise SystemExit(f"re-ingest added {len(again.added)} documents; dedup is broken")
        return t1 - t0, t2 - t1, len(first.added), len(again.duplicates), len(first.rejected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3, help="repeat and keep the best (default 3)")
    benchlib.smoke_flag(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pocketd-bench-") as tmp:
        if args.smoke:
            args.path, args.runs = benchlib.write_notes_jsonl(Path(tmp) / "notes.jsonl", 200), 1
        report(args.path, args.runs)


def report(path: Path, runs: int) -> None:
    config = IngestConfig()
    size = path.stat().st_size
    results = [run_once(path, config) for _ in range(max(1, runs))]
    first_s = min(r[0] for r in results)
    again_s = min(r[1] for r in results)
    _, _, added, duplicates, rejected = results[0]
    print(f"input      {path} ({size:,} bytes)")
    print(f"config     example_max_chars={config.example_max_chars} max_document_bytes={config.max_document_bytes:,}")
    print(_line("ingest", added, size, first_s) + (f"  ({rejected} rejected)" if rejected else ""))
    print(_line("re-ingest", duplicates, size, again_s) + "  (all duplicates)")
    print(f"best of {len(results)} runs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
