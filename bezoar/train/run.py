"""One stage from its config to its run directory: model, adapters, data, loop, adapter, merge."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from bezoar.config import ConfigError, dump_toml, to_dict
from bezoar.data import build_documents, make_loader
from bezoar.data.packing import batch_to
from bezoar.fingerprint import fingerprint
from bezoar.locking import Held, hold
from bezoar.model import Tokenizer, load
from bezoar.model.checkpoint import is_prequantized
from bezoar.model.lora import apply_lora
from bezoar_kernels.dispatch import backend

from .config import StageConfig
from .loop import Trainer, TrainingError, list_checkpoints

SUMMARY = "summary.json"  # written last: its presence means the stage is complete
INPUTS = "inputs.json"  # written when a stage starts at step 0: what it trains on (``started_inputs``)


class DeviceBatches:
    """A BatchLoader whose batches arrive on the training device; state and length pass through."""

    def __init__(self, loader, device):
        self.loader = loader
        self.device = device

    def __iter__(self):
        for batch in self.loader:
            yield batch_to(batch, self.device)

    def __len__(self):
        return len(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def resolve_model_path(path: str) -> Path:
    if path.startswith("tiny:"):
        from bezoar.model.tiny import PRESETS, build_tiny_model

        preset = path.split(":", 1)[1]
        if preset not in PRESETS:
            raise ConfigError(f"model.path {path!r}: no tiny-model preset {preset!r} (tiny:<preset> takes one of "
                              f"{', '.join(PRESETS)})")
        return build_tiny_model(preset, log=print)
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return download_model(path)
    what = "is a file, not a folder" if folder.exists() else "no such folder"
    raise ConfigError(f"model.path {path!r}: {what} (a Hugging Face model folder, a hub name, or tiny:<preset>)")


def download_model(repo_id: str) -> Path:
    """Fetch a hub model's safetensors, config and tokenizer into the Hugging Face cache (online only)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as e:
        raise ConfigError(f"model.path {repo_id!r}: not a local folder, and fetching it from the Hugging Face hub "
                          f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def package_path(path: str) -> str:
    """``bezoar:assets/x.jsonl`` -> that file inside the installed package; other paths unchanged."""
    if path.startswith("bezoar:"):
        return str(Path(__file__).resolve().parent.parent / path.split(":", 1)[1])
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device {name!r}: this machine has no CUDA device torch can use "
                          "(model.device = \"auto\" picks the CPU here)")
    return device


def is_complete(out: Path) -> bool:
    return (Path(out) / SUMMARY).exists()


def build_model(cfg: StageConfig, device: torch.device, dist=None):
    if dist is not None and dist.rank != 0:
        dist.barrier()  # rank 0 builds or downloads the model first; the others then read it
    path = resolve_model_path(cfg.model.path)
    if dist is not None and dist.rank == 0:
        dist.barrier()
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    model = load(path, quant=None if cfg.model.quant == "none" else "nf4", device=device, dtype=dtype)
    adapters = apply_lora(model, cfg.lora)
    if cfg.stage == "dpo" and cfg.dpo.disable_dropout:
        # dpo.disable_dropout: the policy trains without LoRA dropout; the adapter still records lora.dropout
        for module in adapters.values():
            module.dropout_p = 0.0
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model, path


# Keys a run may change without changing what it trains: how it is watched and what it keeps on disk.
# Settings that change no number a run trains: how it reports and checkpoints, and where the DPO reference cache
# lives (its key decides whether a file serves; moving it refused --resume and redid a finished DPO stage).
WATCH_KEYS = ("train.progress", "train.log_every", "train.save_every", "train.keep_last", "train.eval_every",
              "dpo.ref_cache_dir",
              # a memory switch: off, cheap and full give the same losses and adapters bit for bit (a run out of
              # memory could not resume with it on, nor a recipe turn it on without redoing its finished stages)
              "model.gradient_checkpointing")
# A resumed (unfinished) run may also be lengthened or shortened.
RESUME_FREE = WATCH_KEYS + ("train.max_steps", "train.epochs")


# Settings added after runs were recorded without them, with the value those runs ran with (not the new
# default): a DPO run recorded before dpo.disable_dropout trained its policy with LoRA dropout.
RECORDED_BEFORE = {"dpo.disable_dropout": ("dpo", False)}  # key: (the stage kind it applies to, the old value)


def _read_toml(path: Path) -> dict:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


# Settings that hold paths: in a recipe's stage, those inside the run root are compared relative to it.
PATH_KEYS = ("model.path", "data.path", "eval_path", "dpo.ref_cache_dir")


def _in_root(value, root: str):
    """``{root}/REL`` for a path inside ``root``, compared as written (a path recorded relative to a working folder
    since left cannot be resolved, but its root was written the same way); any other value unchanged."""
    if not isinstance(value, str) or not value or os.path.isabs(value) != os.path.isabs(root):
        return value
    rel = os.path.relpath(os.path.normpath(value), os.path.normpath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return value
    return "{root}" if rel == os.curdir else "{root}/" + Path(rel).as_posix()


def config_changes(out: Path, cfg: StageConfig, free: tuple[str, ...] = WATCH_KEYS,
                   root: Path | None = None) -> dict[str, tuple]:
    """``{key: (recorded, now)}`` for each setting of ``cfg`` that differs from the config.toml the run in
    ``out`` recorded, leaving out the keys in ``free``; empty when ``out`` recorded none.

    ``root``: the run root, for a stage of a recipe (written to ``<root>/<stage>``). Its paths inside the root
    (the merged model of the stage it starts from, ``{root}`` data) are compared relative to it, against the
    recorded ones relative to the root the run recorded (the parent of its recorded ``out``): a run root moved,
    copied, or named relatively one time and absolutely the next changes no setting."""
    written = Path(out) / "config.toml"
    if not written.exists():
        return {}
    from bezoar.config import load_config

    before = _flatten(to_dict(load_config(StageConfig, written)))
    recorded = _flatten(_read_toml(written))
    for key, (stage, then) in RECORDED_BEFORE.items():  # settings added since: a file without one ran the old way
        if cfg.stage == stage and key not in recorded:
            before[key] = then
    now = _flatten(to_dict(cfg))
    # run_stage records data paths resolved; a config fresh from a recipe may still say bezoar:...
    for key in ("data.path", "eval_path"):
        if isinstance(now.get(key), str):
            now[key] = package_path(now[key])
    # ``out`` is where the run is, not what it trains: a run folder moved or copied elsewhere goes on there
    same = set()
    if root is not None and isinstance(before.get("out"), str):
        root_then = os.path.dirname(os.path.normpath(before["out"])) or os.curdir
        same = {k for k in PATH_KEYS if k in now and _in_root(before.get(k), root_then) == _in_root(now[k], str(root))}
    # An SFT stage reads nothing of [dpo]: a recipe-wide dpo.beta=... (for its DPO stage) changes no SFT stage.
    unread = ("dpo.",) if cfg.stage == "sft" else ()
    return {k: (before.get(k), now[k]) for k in now
            if before.get(k) != now[k] and k not in same and k != "out" and not k.startswith(tuple(free) + unread)}


def describe_changes(changed: dict[str, tuple], limit: int = 5) -> str:
    return "; ".join(f"{k}: {then!r} -> {now!r}" for k, (then, now) in list(changed.items())[:limit])


def base_summary(cfg: StageConfig) -> Path | None:
    """The summary.json of the bezoar stage whose merged model ``model.path`` names (``<stage>/merged``, as a
    recipe's ``start_from`` stage trains on), None for any other model. The stage writes it anew each time it
    is trained (its time and final metrics), so its content tells a retrained base from the one a run
    started on without hashing gigabytes of weights (the pipeline's records do the same)."""
    path = Path(cfg.model.path).expanduser()
    summary = path.parent / SUMMARY
    return summary if path.name == "merged" and summary.is_file() else None


def started_inputs(cfg: StageConfig) -> dict:
    """What a stage records in INPUTS when it starts at step 0: the fingerprint of its base stage's summary."""
    summary = base_summary(cfg)
    fp = fingerprint(summary) if summary is not None else None
    return {"base_summary": fp} if fp is not None else {}


def base_changed(out: Path, cfg: StageConfig) -> str | None:
    """Why the run in ``out`` no longer trains on the base it started on, or None: the same base, or unknown (a
    run started before stages recorded it, a base that is not a bezoar stage's merged model, or a base stage
    whose summary is gone)."""
    try:
        recorded = json.loads((Path(out) / INPUTS).read_text()).get("base_summary")
    except (OSError, ValueError, AttributeError):
        return None
    summary = base_summary(cfg)
    now = fingerprint(summary) if summary is not None else None
    if not isinstance(recorded, dict) or now is None or now == recorded:
        return None
    return (f"its base model {cfg.model.path} is not the one it started on: the stage that made it "
            f"({summary.parent}) was trained again since ({SUMMARY} changed)")


def check_complete(out: Path, cfg: StageConfig, root: Path | None = None) -> None:
    """A finished run is skipped only when it trained with these settings; otherwise stop, naming them.
    ``root``: the run root of a recipe's stage (``config_changes``)."""
    changed = config_changes(out, cfg, root=root)
    if not changed:
        check_base(out, cfg)
        return
    if all(key in RESUME_FREE for key in changed) and list_checkpoints(out):
        # only its length differs: the end state is a checkpoint, so the run can go on from it
        raise ConfigError(f"{out}: this stage is complete ({SUMMARY} present) and was trained with other lengths "
                          f"({describe_changes(changed)}); to train it on from its last checkpoint (step "
                          f"{list_checkpoints(out)[-1][0]}), rename {out / SUMMARY} and rerun with --resume, or "
                          "choose another out=")
    raise ConfigError(f"{out}: this stage is complete ({SUMMARY} present) but was trained with other settings "
                      f"({describe_changes(changed)}); remove the folder {out} to train it again, or choose "
                      "another out=")


def check_base(out: Path, cfg: StageConfig) -> None:
    """A complete or partly trained stage goes on (skipped as done, or resumed) only on the base it started on:
    on a retrained one, its adapter or its checkpoints would belong to another model."""
    why = base_changed(out, cfg)
    if why is None:
        return
    if is_complete(out):
        raise ConfigError(f"{out}: this stage is complete, but {why}; remove the folder {out} to train it again "
                          "on the new base, or choose another out=")
    raise ConfigError(f"{out}: this stage has checkpoints (step {list_checkpoints(out)[-1][0]}), but {why}, so it "
                      f"cannot resume from them; remove the folder {out} to train it from step 0 on the new "
                      "base, or choose another out=")


def check_started(out: Path, cfg: StageConfig, root: Path | None = None) -> None:
    """A stage of a recipe with checkpoints goes on only with the settings it started with (its length and how it
    is watched aside); otherwise stop before anything runs, naming them and the two ways on."""
    changed = config_changes(out, cfg, RESUME_FREE, root=root)
    if changed:
        raise ConfigError(f"{out}: this stage was started (checkpoints up to step {list_checkpoints(out)[-1][0]}) "
                          f"with other settings ({describe_changes(changed)}); put them back to continue it, or "
                          f"remove the folder {out} to train it from step 0, or choose another --out")
    check_length(out, cfg)


def check_run_dir(out: Path, cfg: StageConfig, resume: bool, root: Path | None = None) -> None:
    """Refuse to write over a finished or started run unless resuming it with the same config (``root``: the run
    root of a recipe's stage, see ``config_changes``)."""
    if not resume:
        if is_complete(out) or list_checkpoints(out) or (out / "adapter").exists():
            raise ConfigError(f"{out}: holds a training run already; pass --resume to continue it, or choose "
                              "another out=")
        return
    if not list_checkpoints(out):
        return  # nothing to continue from (the run stopped before its first checkpoint): it starts at step 0
    changed = config_changes(out, cfg, RESUME_FREE, root=root)
    if changed:
        raise ConfigError(f"{out / 'config.toml'}: --resume with a different config ({', '.join(list(changed)[:5])}); "
                          "resume with the config the run started with")
    check_base(out, cfg)
    check_length(out, cfg)


def check_ranks_agree(out: Path, dist) -> None:
    """Every rank decides from ``out`` whether the stage is done and where it resumes, and only rank 0 writes there.
    Ranks on machines that do not share it decided differently: rank 0 found the stage complete and ended while the
    others waited for it in the process group for 30 minutes, or resumed from its checkpoint while they started at
    step 0 and their collectives no longer matched. Raises on every rank where they do not agree."""
    checkpoints = list_checkpoints(out)
    view = "complete" if is_complete(out) else f"checkpoint step {checkpoints[-1][0]}" if checkpoints else "no checkpoint"
    views = dist.gather_objects(view)
    if len(set(views)) > 1:
        seen = "; ".join(f"rank {rank}: {v}" for rank, v in enumerate(views))
        raise TrainingError(f"{out}: the ranks see different runs in it ({seen}). Only rank 0 writes there, so `out` "
                            "must be on storage every machine sees (a shared file system)")


def check_length(out: Path, cfg: StageConfig) -> None:
    """A run resumes only toward a step past its last checkpoint (a length in epochs is checked by the trainer,
    which counts the batches)."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return
    step, path = checkpoints[-1]
    if 0 < cfg.train.max_steps < step:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps}: {path} is at step {step} already; resume with at "
                          "least that many steps, or start a new run with another out=")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "fields":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


LOCK = "train.lock"  # held by the process that writes a stage's folder (rank 0 under torchrun), holding its pid


def hold_out(out: Path):
    """The lock on OUT/train.lock (``bezoar.locking.hold``), held for as long as the returned handle is open,
    so that two runs never write one stage folder: a second ``python -m bezoar.train`` (a resume started
    while the first still runs, or a torchrun whose killed launcher left its workers training) stops with an
    error naming the holder's pid. None where the file system or the platform has no flock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of the path should be, no permission, a read-only disk
        raise ConfigError(f"out={out}: cannot make the folder ({e.strerror}"
                          + (f": {e.filename}" if e.filename and str(e.filename) != str(out) else "") + ")") from None
    try:
        return hold(out / LOCK)
    except Held as e:
        raise ConfigError(f"{out}: another bezoar.train (pid {e.pid}) is training into this folder; wait for it to "
                          "finish or stop it (under torchrun, a launcher killed with SIGKILL leaves its workers "
                          "running: stop them too), or choose another out=") from None


def _same_source(a: str, b: str) -> bool:
    """Whether two data sources name the same file, folder or hub dataset."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return a.strip() == b.strip()


def _example_key(example) -> tuple:
    return tuple(getattr(example, name, None) for name in ("prompt", "response", "chosen", "rejected"))


def read_stage_data(cfg: StageConfig, log=print):
    """The stage's training examples and, with eval_path, its eval data config and examples (``read_examples``
    results), read before the model loads. An eval that would read the training split of the training source is
    refused (it read data.split whatever eval_path was: eval loss on a hub dataset's or a folder's training
    split, or on data.path itself, was training loss); eval examples also in the training data are counted in a
    warning."""
    from dataclasses import replace

    from bezoar.data import read_examples

    train_read = read_examples(cfg.data)
    if not cfg.eval_path:
        return train_read, None, None
    split = cfg.eval_split or cfg.data.split
    eval_file = Path(cfg.eval_path).expanduser().is_file()
    if cfg.eval_split and eval_file:  # a file has no splits: any name was read as the whole file
        raise ConfigError(f"eval_split = {cfg.eval_split!r}, but eval_path {cfg.eval_path} is a file, which has no "
                          "splits (eval_split names a split of a folder or hub dataset); leave eval_split empty")
    if _same_source(cfg.eval_path, cfg.data.path) and split == cfg.data.split:
        fix = ("point eval_path at held-out data" if eval_file else
               "set eval_split to a held-out split (e.g. 'test') or point eval_path at held-out data")
        raise ConfigError(f"eval_path {cfg.eval_path} is data.path, read at the same split ({split!r}): the eval "
                          f"would be the training data; {fix}")
    eval_cfg = replace(cfg.data, path=cfg.eval_path, split=split, limit=None)
    eval_read = read_examples(eval_cfg)
    seen = {_example_key(e) for e in train_read[0]}
    shared = sum(_example_key(e) in seen for e in eval_read[0])
    if shared:
        log(f"warning: {shared} of the {len(eval_read[0])} eval examples ({cfg.eval_path} [{split}]) are also in the "
            f"training data ({cfg.data.path}): the eval loss is partly training loss")
    return train_read, eval_cfg, eval_read


def run_stage(cfg: StageConfig, resume: bool = False, log=print, dist=None, root: Path | None = None) -> Path:
    """Train one stage into ``cfg.out`` (see ``_run_stage``) while holding its folder's lock (``hold_out``:
    rank 0, the only writer under torchrun). A folder the run made and left with nothing but the lock (a
    run refused before it wrote anything) is removed again. ``root``: the run root, for a stage of a recipe
    (its settings are then compared with the recorded ones as ``config_changes`` says)."""
    out = Path(cfg.out)
    if is_complete(out) or not (dist is None or dist.rank == 0):
        return _run_stage(cfg, resume, log, dist, root)  # a complete stage is only read (and not touched)
    existed = out.exists()
    lock = hold_out(out)
    try:
        return _run_stage(cfg, resume, log, dist, root)
    finally:
        if lock is not None:
            lock.close()
            if not existed and [p.name for p in out.iterdir()] == [LOCK]:  # stopped before writing anything
                (out / LOCK).unlink(missing_ok=True)
                out.rmdir()


def _run_stage(cfg: StageConfig, resume: bool = False, log=print, dist=None, root: Path | None = None) -> Path:
    out = Path(cfg.out)
    rank0 = dist is None or dist.rank == 0
    cfg.data.path = package_path(cfg.data.path)
    cfg.eval_path = package_path(cfg.eval_path)
    if dist is not None:
        # under torchrun: the rank's device for model.device, where the process group starts (first stage); started
        # before anything is decided from `out`, which every rank must see alike (check_ranks_agree)
        dist.start(cfg.model.device)
        check_ranks_agree(out, dist)
    if is_complete(out):
        check_complete(out, cfg, root)  # finished with other settings: say so rather than skip as if done
        log(f"{out}: complete already ({SUMMARY} present); nothing to do")
        return out
    check_run_dir(out, cfg, resume, root)  # every rank: an error must stop them all, not leave some waiting
    # what a stage starting at step 0 records of its base, read before the base is: a base stage retrained
    # while this one loads would otherwise be recorded as the one it trains on
    inputs = started_inputs(cfg) if rank0 and not list_checkpoints(out) else None
    device = dist.start(cfg.model.device) if dist is not None else resolve_device(cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    # the data read before the model loads (minutes for a 3B base): a bad record stops the run at once
    train_read, eval_cfg, eval_read = read_stage_data(cfg, log)
    with backend(cfg.model.kernels):
        model, base_path = build_model(cfg, device, dist)
        context = model.config.max_position_embeddings
        if cfg.data.max_seq_len > context:  # RoPE runs past it, but no position there was ever trained
            log(f"warning: data.max_seq_len = {cfg.data.max_seq_len} is above the context the model was trained "
                f"with ({context}, max_position_embeddings in {base_path}/config.json): rows longer than that train "
                "on positions it never saw (and take memory in proportion)")
        dropout = model.config.extra.get("attention_dropout")
        if dropout not in (None, 0, 0.0):  # transformers would train with it; bezoar's attention has none
            raise ConfigError(f"model.path {base_path}: config.json key 'attention_dropout' is {dropout!r}; bezoar "
                              "trains without attention dropout (set it to 0.0 there; LoRA's own is lora.dropout)")
        if cfg.merge and is_prequantized(model.config):
            # The merge folds the adapter into dense weights; finding that out after the last step would leave
            # a trained stage without its merged model (and --resume cannot drop merge).
            raise ConfigError(f"model.path {base_path}: a bitsandbytes 4-bit checkpoint, which merge = true cannot "
                              "fold an adapter into; point model.path at the dense model (training still runs in "
                              "NF4), or set merge = false and run python -m bezoar.merge on the dense model later")
        tokenizer = Tokenizer(base_path)
        docs, stats = build_documents(cfg.data, tokenizer, read=train_read)
        world, rank = (dist.world_size, dist.rank) if dist is not None else (1, 0)
        loader = _loader(cfg, cfg.data.path, docs, tokenizer, world, rank)
        eval_loader = eval_stats = None
        if cfg.eval_path:
            eval_docs, eval_stats = build_documents(eval_cfg, tokenizer, read=eval_read)
            # A capped eval (eval_max_batches) takes its batches from one fixed shuffled order, the same at every
            # eval; in file order its first batches are the longest documents' rows (packing fills rows
            # longest first), which no eval over the whole set would be like. A whole eval keeps the order that
            # pads least.
            shuffled = cfg.train.eval_max_batches > 0
            eval_loader = DeviceBatches(_loader(cfg, cfg.eval_path, eval_docs, tokenizer, world, rank,
                                                shuffle=shuffled), device)
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
            if dist is not None:
                data_note = f"; {dist.world_size} processes ({dist.backend}), each {cfg.train.batch_size // dist.world_size} rows"
            else:
                data_note = ""
            # written whole or not at all: a resume compares its settings with this file
            resolved = out / "config.toml"
            partial = resolved.with_name("config.toml.part")
            partial.write_text(dump_toml(cfg, header=f"resolved config of {out} ({time.strftime('%Y-%m-%d %H:%M:%S')})"))
            os.replace(partial, resolved)
            if inputs is not None:  # starts at step 0: record the base it trains on (check_base)
                partial = out / (INPUTS + ".part")
                partial.write_text(json.dumps(inputs, indent=2) + "\n")
                os.replace(partial, out / INPUTS)
            data_info = {"encode": stats.as_dict(), "loader": loader.stats(), "packing_efficiency": loader.efficiency}
            if eval_stats is not None:
                data_info["eval_encode"] = eval_stats.as_dict()
            (out / "data.json").write_text(json.dumps(data_info, indent=2) + "\n")
            log(f"data: {stats.summary()}; {len(loader)} batches/epoch of {cfg.train.batch_size} rows x "
                f"{cfg.data.max_seq_len}; packing efficiency {loader.efficiency:.1%}{data_note}")
            if eval_stats is not None:
                log(f"eval data: {eval_stats.summary()}")
        if cfg.stage == "sft":
            from .sft import SFTStage

            stage = SFTStage()
        else:
            from .dpo import DPOStage

            stage = DPOStage(cfg.dpo, out=out, model=model, docs=docs, data_cfg=cfg.data, batch_size=cfg.train.batch_size,
                             device=device, dist=dist, log=log)
        train_model = dist.wrap(model) if dist is not None else model
        trainer = Trainer(train_model, stage, DeviceBatches(loader, device), cfg.train, cfg.optim, out,
                          eval_batches=eval_loader, resume=resume, dist=dist, log=log,
                          base_model_name=cfg.model.name or str(base_path))
        if root is not None:  # a stage of a recipe (train --recipe, the pipeline): it has no --resume of its own
            trainer.resume_hint = "rerun the same command to continue from it"
        if hasattr(stage, "prepare"):
            stage.prepare(trainer)
        started = time.time()
        adapter = trainer.fit()
    summary = {"stage": cfg.stage, "steps": trainer.step, "tokens": trainer.tokens_seen,
               "seconds": round(time.time() - started, 2), "adapter": str(adapter), "base_model": str(base_path)}
    if cfg.merge and rank0:
        from bezoar.merge import merge

        merged = merge(base_path, adapter, out / "merged", device=str(device) if device.type == "cuda" else "cpu",
                       overwrite=True)
        summary["merged"] = str(merged)
    if rank0:
        last = _last_metrics(out)
        summary["final"] = last
        tmp = out / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out / SUMMARY)
        log(f"{cfg.stage} stage done in {summary['seconds']:.0f}s: adapter {adapter}"
            + (f", merged model {summary['merged']}" if "merged" in summary else ""))
    if dist is not None:
        dist.barrier()
    return out


def _loader(cfg: StageConfig, path: str, docs, tokenizer, world: int, rank: int, shuffle: bool = True):
    try:
        return make_loader(docs, cfg.data, tokenizer, cfg.train.batch_size, seed=cfg.train.seed, world_size=world,
                           rank=rank, shuffle=shuffle)
    except ValueError as e:  # batching settings that do not fit this data or this number of processes
        raise ConfigError(f"{path}: cannot be batched with train.batch_size = {cfg.train.batch_size}, "
                          f"data.max_seq_len = {cfg.data.max_seq_len}, data.packed = {str(cfg.data.packed).lower()}"
                          f"{f' over {world} processes' if world > 1 else ''}: {e}") from None


def _last_metrics(out: Path) -> dict:
    path = out / "metrics.jsonl"
    last = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                last = rec
    return last
