"""The tiny-model builder: deterministic bytes for a (preset, seed), and the cache reuses its folder."""

from __future__ import annotations

import hashlib

from bezoar.model.tiny import build_tiny_model


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_tiny_model("tiny", seed=5, out_dir=tmp_path / "a")
    b = build_tiny_model("tiny", seed=5, out_dir=tmp_path / "b")
    c = build_tiny_model("tiny", seed=6, out_dir=tmp_path / "c")
    da, db, dc = digest(a), digest(b), digest(c)
    assert da == db
    assert da["tokenizer.model"] == dc["tokenizer.model"]  # the tokenizer depends on the corpus only
    assert da["model.safetensors"] != dc["model.safetensors"]


def test_cache_returns_the_built_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BEZOAR_CACHE", str(tmp_path))
    first = build_tiny_model("tiny", seed=1)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = build_tiny_model("tiny", seed=1)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.build-*")), "no half-built folder may be left behind"
