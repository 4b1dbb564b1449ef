"""Tiny Llama checkpoints for tests and the demo: real HF-format folders, built in seconds.

A sentencepiece tokenizer is trained on ``bezoar/assets/tokenizer_corpus.txt`` (text the project
ships) and weights are drawn from a seeded generator, so a (preset, seed) pair always gives the
same bytes. Folders are cached under ``$BEZOAR_CACHE`` (default ``~/.cache/bezoar``) by a hash of
everything that goes into them, and written to a temporary folder that is renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .config import PRESETS, LlamaConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CORPUS = ASSETS / "tokenizer_corpus.txt"
BUILDER_VERSION = "3"
# Presets that get a short full-parameter pretraining on the corpus, so that fine-tuning starts from a
# model that has seen text (as QLoRA does) rather than from noise: preset -> optimizer steps.
PRETRAIN_STEPS = {"demo": 200}


def cache_root() -> Path:
    return Path(os.environ.get("BEZOAR_CACHE") or Path.home() / ".cache" / "bezoar")


def train_tokenizer(out_dir: Path, vocab_size: int, corpus: Path = CORPUS) -> Path:
    """Train a Llama-style BPE sentencepiece model (byte fallback, <unk>=0 <s>=1 </s>=2)."""
    import sentencepiece as spm

    import io

    # Train from an iterator into memory, so no file path ends up inside the model's trainer spec and
    # the same corpus always gives the same bytes.
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus.read_text(encoding="utf-8").splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_tokenizer_config(out_dir: Path, max_length: int) -> None:
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_length,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def random_model(config: LlamaConfig, seed: int, dtype=torch.float32):
    """A model with HF-style random init (normal std 0.02), norms perturbed around 1 so tests see them."""
    from .llama import LlamaForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def pretrain(model, tokenizer_dir: Path, steps: int, seed: int, seq_len: int = 128, rows: int = 16,
             lr: float = 3e-3, log=None) -> list[float]:
    """Next-token training of every parameter on the corpus (rows of ``seq_len`` tokens); returns losses."""
    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    lines = CORPUS.read_text().split("\n")
    ids = torch.tensor([t for ids in tok.encode_many(lines, bos=True) for t in ids])
    n = (len(ids) // seq_len) * seq_len
    chunks = ids[:n].view(-1, seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    for step in range(steps):
        batch = chunks[torch.randint(len(chunks), (rows,), generator=g)]
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 50 == 0:
            log(f"pretraining the tiny model: step {step + 1}/{steps}, loss {loss.item():.3f}")
    model.eval()
    return losses


def build_tiny_model(preset: str = "tiny", seed: int = 0, out_dir: str | Path | None = None,
                     max_shard_size: str | int = "2GB", pretrain_steps: int | None = None, log=None,
                     **overrides) -> Path:
    """Build (or reuse from the cache) a tiny HF-format Llama checkpoint and return its folder."""
    from .checkpoint import save

    if preset not in PRESETS:
        raise KeyError(f"unknown tiny-model preset {preset!r}; known: {', '.join(PRESETS)}")
    config = LlamaConfig(**{**PRESETS[preset], **overrides})
    steps = PRETRAIN_STEPS.get(preset, 0) if pretrain_steps is None else pretrain_steps
    recipe = json.dumps({"config": dataclasses.asdict(config), "seed": seed, "shard": str(max_shard_size),
                         "pretrain_steps": steps,
                         "version": BUILDER_VERSION,
                         "corpus": hashlib.sha256(CORPUS.read_bytes()).hexdigest()}, sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    folder = Path(out_dir) if out_dir is not None else cache_root() / "tiny" / f"{preset}-s{seed}-{digest}"
    if (folder / "config.json").exists() and (folder / ".bezoar-tiny").exists():
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(folder.name + f".build-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_tokenizer(work, config.vocab_size)
    write_tokenizer_config(work, config.max_position_embeddings)
    model = random_model(config, seed)
    if steps:
        if log is not None:
            log(f"building the tiny {preset!r} model: {steps} pretraining steps on the shipped corpus (once; cached)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            pretrain(model, work, steps, seed, log=log)
    save(model, work / "model", tokenizer_from=work, max_shard_size=max_shard_size)
    for f in (work / "model").iterdir():
        f.rename(work / f.name)
    (work / "model").rmdir()
    (work / ".bezoar-tiny").write_text(recipe + "\n")
    try:
        work.rename(folder)
    except OSError:
        # Another process finished the same folder first (or out_dir exists): keep theirs if complete.
        if (folder / ".bezoar-tiny").exists():
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            work.rename(folder)
    return folder
