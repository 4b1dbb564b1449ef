"""The loop's steps, eval and metrics across epochs, evals and resumes: every batch of an epoch once, the same
eval batches every time, each record once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import read_metrics, tiny_sft_config

from bezoar.train.run import run_stage


def _quiet(*args, **kwargs):
    pass


def test_eval_max_batches_takes_the_same_batches_every_time(tmp_path):
    # lr = 0 and LoRA B starting at zero: the model never changes, so every eval must give one number.
    cfg = tiny_sft_config(tmp_path / "run", "train.max_steps=4", "train.eval_every=1", "train.eval_max_batches=1",
                          "eval_path=bezoar:assets/demo/sft_eval.jsonl", "optim.lr=0", "optim.warmup_steps=0",
                          "lora.dropout=0.0")
    run_stage(cfg, log=_quiet)
    evals = [m["eval_loss"] for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    assert len(evals) == 4
    assert len(set(evals)) == 1, f"eval_max_batches=1 evaluated different batches: {evals}"


def test_a_capped_eval_reads_a_fixed_shuffled_order_not_the_longest_rows(tmp_path, monkeypatch):
    """eval_max_batches took the eval loader's first batches in file order, where packing puts the rows of the
    longest documents first: a biased eval loss. A capped eval now reads one fixed shuffled order (the same each
    eval); a whole eval keeps the order, which pads least."""
    import numpy as np

    import bezoar.train.run as run

    made = {}
    real = run._loader

    def recording(cfg, path, docs, tokenizer, world, rank, shuffle=True):
        loader = real(cfg, path, docs, tokenizer, world, rank, shuffle=shuffle)
        made.setdefault(path, []).append((shuffle, loader, docs))
        return loader

    monkeypatch.setattr(run, "_loader", recording)
    eval_path = "bezoar:assets/demo/sft_eval.jsonl"
    for cap in (1, 0):
        out = tmp_path / f"run{cap}"
        run_stage(tiny_sft_config(out, "train.max_steps=1", f"train.eval_max_batches={cap}", f"eval_path={eval_path}",
                                  "train.batch_size=2", "data.packed=false"), log=_quiet)
    (capped, loader, docs), (whole, _, _) = next(v for k, v in made.items() if k.endswith("sft_eval.jsonl"))
    assert capped and not whole
    lengths = docs.doc_length
    first = loader.batch(0, 0)["doc_table"][:, 2].numpy()
    assert first.min() < np.sort(lengths)[-len(first)], f"a capped eval began with the longest rows: {first}"


def test_resume_after_the_last_step_logs_the_final_eval_once(tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=4", "train.save_every=2", "train.eval_every=2", "eval_path=bezoar:assets/demo/sft_eval.jsonl")
    run_stage(tiny_sft_config(out, *args), log=_quiet)
    before = read_metrics(out)
    # As if the process had died after the final checkpoint but before summary.json (in the merge, say).
    (out / "summary.json").unlink()
    run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
    after = read_metrics(out)
    assert [(m["step"], "eval_loss" in m) for m in after] == [(m["step"], "eval_loss" in m) for m in before]


def test_resume_on_changed_data_is_a_training_error_naming_the_checkpoint(tmp_path):
    from bezoar.train.loop import TrainingError
    from bezoar.train.run import package_path

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(Path(package_path("bezoar:assets/demo/sft.jsonl")).read_text().splitlines(True)[:40]))
    out = tmp_path / "run"
    args = ("train.max_steps=3", "train.save_every=2", f"data.path={data}")
    run_stage(tiny_sft_config(out, *args), log=_quiet)
    (out / "summary.json").unlink()  # as if killed before the end
    data.write_text(data.read_text().replace("whale", "shark"))
    with pytest.raises(TrainingError, match="step-3") as e:
        run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
    assert "data" in str(e.value)


def test_resume_after_a_finished_loop_does_not_train_again_without_save_every(tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=3", "train.save_every=0")
    run_stage(tiny_sft_config(out, *args), log=_quiet)
    before = (out / "metrics.jsonl").read_text()
    (out / "summary.json").unlink()  # as if killed in the merge, after the last step
    said = []
    run_stage(tiny_sft_config(out, *args), resume=True, log=said.append)
    assert any("resumed from" in str(s) and "step 3" in str(s) for s in said), said
    assert (out / "metrics.jsonl").read_text() == before, "no step may run twice"


def test_unfinished_checkpoints_of_dead_processes_are_removed_and_never_read(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import torch

    out = tmp_path / "run"
    args = ("train.max_steps=4", "train.save_every=1", "train.keep_last=5")
    real_save, saves = torch.save, []

    def save_failing_the_third_time(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 3:
            raise OSError("no space left on device")
        return real_save(obj, f, *a, **k)

    from bezoar.train.loop import TrainingError

    monkeypatch.setattr(torch, "save", save_failing_the_third_time)
    with pytest.raises(TrainingError, match="no space left on device"):
        run_stage(tiny_sft_config(out, *args), log=_quiet)
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-2"]  # its own unfinished one removed
    # Unfinished saves of other processes: one that is gone, one still running (it may be writing).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid in (gone.pid, alive.pid):
            (ckpts / f".tmp-step-9-{pid}").mkdir()
            (ckpts / f".tmp-step-9-{pid}" / "trainer_state.pt").write_bytes(b"torn")  # read, it would fail
        said = []
        run_stage(tiny_sft_config(out, *args), resume=True, log=said.append)
        assert any(f"resumed from {ckpts / 'step-2'} " in str(s) for s in said), said
        assert sorted(p.name for p in ckpts.iterdir()) == [f".tmp-step-9-{alive.pid}", "step-1", "step-2", "step-3",
                                                          "step-4"]
    finally:
        alive.kill()
        alive.wait()


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_trainer_state_loads_weights_only_and_old_checkpoints_resume_exactly(tmp_path):
    import shutil

    import numpy as np
    import torch

    # Dropout on: the resumed run matches only if every RNG state comes back exactly.
    args = ("train.max_steps=4", "train.save_every=2", "train.keep_last=5", "lora.dropout=0.1")
    reference = tmp_path / "reference"
    run_stage(tiny_sft_config(reference, *args), log=_quiet)
    state = torch.load(reference / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2

    # A checkpoint as the code before this one wrote it: numpy's RNG state as an ndarray.
    out = tmp_path / "old"
    shutil.copytree(reference, out)
    for name in ("summary.json", "adapter", "checkpoints/step-4"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    (out / "config.toml").write_text((out / "config.toml").read_text().replace(str(reference), str(out)))
    name, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)
    torch.save(state, out / "checkpoints" / "step-2" / "trainer_state.pt")
    said = []
    run_stage(tiny_sft_config(out, *args), resume=True, log=said.append)
    assert any("resumed from" in str(s) and "step-2" in str(s) for s in said), said
    mine, theirs = _adapter(out), _adapter(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_trainer_state_that_would_run_code_is_refused(tmp_path):
    import torch

    from bezoar.train.loop import TrainingError

    out = tmp_path / "run"
    args = ("train.max_steps=2", "train.save_every=1", "train.keep_last=5")
    run_stage(tiny_sft_config(out, *args), log=_quiet)
    for name in ("summary.json", "checkpoints/step-2/trainer_state.pt"):
        (out / name).unlink()
    # step-2 without its trainer_state.pt is not a checkpoint: step-1 is the newest.
    file = out / "checkpoints" / "step-1" / "trainer_state.pt"
    state = torch.load(file, weights_only=False)  # this test's own file
    marker = tmp_path / "code-ran"
    state["data"]["extra"] = _RunsCode(marker)
    torch.save(state, file)
    with pytest.raises(TrainingError, match=r"step-1/trainer_state\.pt: holds objects other than tensors .*mkdir"):
        run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_a_torn_checkpoint_adapter_is_a_training_error_naming_the_file(tmp_path):

    from bezoar.train.loop import TrainingError

    out = tmp_path / "run"
    args = ("train.max_steps=2", "train.save_every=1")
    run_stage(tiny_sft_config(out, *args), log=_quiet)
    (out / "summary.json").unlink()  # as if killed before the end
    weights = out / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that filled, a copy cut short
    with pytest.raises(TrainingError, match="adapter_model.safetensors"):
        run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
    weights.unlink()
    with pytest.raises(TrainingError, match="adapter_model.safetensors") as info:
        run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
    # the step-1 checkpoint before it is whole: the message says how to go on from there, and that works
    assert f"move {out / 'checkpoints' / 'step-2'} aside and resume again to go on from step 1" in str(info.value)
    (out / "checkpoints" / "step-2").rename(tmp_path / "step-2-damaged")
    run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
    assert (out / "summary.json").exists()
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test, whatever an earlier test in this worker left installed:
    the loop gives the process's handler back before the final evaluation."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["evaluate", "save_checkpoint"])
def test_ctrl_c_after_the_last_step_keeps_the_end_state_and_resume_only_evaluates(tmp_path, monkeypatch, where,
                                                                                   default_sigint):
    # Ctrl-C while the final evaluation runs (it stops at once) or while the end state is saved (the save
    # finishes first): either way the end state is on disk, without save_every, and a resume trains nothing.
    import os
    import signal

    from bezoar.train import loop
    from bezoar.train.loop import list_checkpoints

    out = tmp_path / "run"
    args = ("train.max_steps=3", "train.save_every=0", "eval_path=bezoar:assets/demo/sft_eval.jsonl")
    real = getattr(loop.Trainer, where)

    def pressed(self):
        if self.step == self.total_steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(loop.Trainer, where, pressed)
    with pytest.raises((KeyboardInterrupt, SystemExit)) as e:
        run_stage(tiny_sft_config(out, *args), log=_quiet)
    if where == "save_checkpoint":
        assert e.value.code == 128 + signal.SIGINT
    assert [step for step, _ in list_checkpoints(out)] == [3]
    trained = [m for m in read_metrics(out) if "loss" in m]
    monkeypatch.undo()
    said = []
    run_stage(tiny_sft_config(out, *args), resume=True, log=said.append)
    assert any("resumed from" in str(s) and "step 3" in str(s) for s in said), said
    after = read_metrics(out)
    assert [m for m in after if "loss" in m] == trained, "no step may run twice"
    assert [m["step"] for m in after if "eval_loss" in m] == [3]
    assert (out / "summary.json").exists()


def _record_steps(monkeypatch) -> list[tuple]:
    """(trainer, micro-batches) of every optimizer step the loop runs from here on, in order (monkeypatched)."""
    from bezoar.train import loop

    steps, real = [], loop.Trainer.train_step

    def recording(self, group):
        steps.append((self, list(group)))
        return real(self, group)

    monkeypatch.setattr(loop.Trainer, "train_step", recording)
    return steps


def _epoch_steps(epochs: int, per_epoch: int, accum: int) -> list[list[tuple[int, int]]]:
    """(epoch, batch) of each step when an epoch's last step takes what the epoch has left."""
    return [[(e, i) for i in range(start, min(start + accum, per_epoch))]
            for e in range(epochs) for start in range(0, per_epoch, accum)]


def _positions(steps) -> list[list[tuple[int, int]]]:
    return [[(int(b["epoch"]), int(b["step"])) for b in group] for _, group in steps]


# data.limit=12 with one row per batch: 6 micro-batches an epoch.
EPOCH_OF_SIX = ("data.limit=12", "train.batch_size=1")


@pytest.mark.parametrize("length,accum,steps", [("train.epochs=1", 4, 2), ("train.epochs=1", 8, 1),
                                                 ("train.epochs=3", 4, 6), ("train.max_steps=5", 4, 5)])
def test_each_epoch_trains_every_batch_once_ending_with_a_shorter_step(tmp_path, monkeypatch, length, accum, steps):
    # Before, the steps per epoch rounded down and a step ran on across an epoch's end: epochs=1 with
    # grad_accum=4 dropped batches 4 and 5, grad_accum=8 took two batches of a second epoch into its step,
    # and epochs=3 with grad_accum=4 stopped after 3 steps, never training the third epoch. max_steps counts the
    # same steps, across as many epochs as it takes.
    from bezoar.train.sft import SFTStage

    ran = _record_steps(monkeypatch)
    # lr 0 (and LoRA B at zero): the model stays as it starts, so each step's loss can be checked after the run.
    out = tmp_path / "run"
    run_stage(tiny_sft_config(out, *EPOCH_OF_SIX, length, f"train.grad_accum={accum}", "optim.lr=0",
                              "lora.dropout=0.0"), log=_quiet)
    expected = _epoch_steps(3, 6, accum)[:steps]
    assert _positions(ran) == expected
    assert ran[0][0].total_steps == steps
    records = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in records] == list(range(1, steps + 1))
    assert records[-1]["epoch"] == round(steps / -(-6 // accum), 4)
    # Every step, an epoch's shorter last one too, is the mean over its own loss tokens.
    stage = SFTStage()
    for (trainer, group), record in zip(ran, records):
        loss = sum(float(stage.loss(trainer.model, b)[0].detach()) for b in group) / sum(stage.units(b) for b in group)
        assert record["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_resume_at_or_near_an_epoch_end_trains_as_a_run_that_never_stopped(tmp_path, monkeypatch):
    # grad_accum=4 over 6 batches: step 2 is an epoch's shorter last step (the loader then stands at the next
    # epoch); grad_accum=3: step 2 takes the epoch's last batch (the loader stands at the epoch's end).
    # Dropout on: the resumed run matches only if the data position and every RNG state come back exactly.
    import shutil

    import torch

    steps = _record_steps(monkeypatch)
    for accum, stops in ((4, (1, 2, 3)), (3, (2,))):
        args = (*EPOCH_OF_SIX, "train.epochs=2", f"train.grad_accum={accum}", "train.save_every=1",
                "train.keep_last=9", "lora.dropout=0.1")
        straight = tmp_path / f"straight-{accum}"
        del steps[:]
        run_stage(tiny_sft_config(straight, *args), log=_quiet)
        expected = _epoch_steps(2, 6, accum)
        assert _positions(steps) == expected
        for stop in stops:
            out = tmp_path / f"stopped-{accum}-{stop}"
            shutil.copytree(straight, out)
            (out / "summary.json").unlink()
            shutil.rmtree(out / "adapter")
            for later in range(stop + 1, len(expected) + 1):
                shutil.rmtree(out / "checkpoints" / f"step-{later}")
            (out / "config.toml").write_text((out / "config.toml").read_text().replace(str(straight), str(out)))
            del steps[:]
            run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
            assert _positions(steps) == expected[stop:]
            mine, theirs = _adapter(out), _adapter(straight)
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), stop
            kept = [[(m["step"], m["epoch"], m["loss"], m["lr"], m["grad_norm"]) for m in read_metrics(run)]
                    for run in (out, straight)]
            assert kept[0] == kept[1], stop


@pytest.mark.parametrize("longer", ["train.max_steps=8", "train.epochs=4"])
def test_a_run_trained_longer_takes_the_new_schedule_from_its_first_resumed_step(tmp_path, longer):
    # The README's train-longer flow: a finished run of 4 steps, its length raised, resumed. Before, the first
    # resumed step took the lr the old cosine had set for after its end (0); the steps after it were right.
    from bezoar.train.loop import lr_lambda

    out = tmp_path / "run"
    shorter = "train.max_steps=4" if "max_steps" in longer else "train.epochs=2"
    args = (*EPOCH_OF_SIX, "train.grad_accum=3", "optim.warmup_steps=1")
    run_stage(tiny_sft_config(out, *args, shorter), log=_quiet)
    (out / "summary.json").unlink()
    cfg = tiny_sft_config(out, *args, longer)
    run_stage(cfg, resume=True, log=_quiet)
    lrs = [m["lr"] for m in read_metrics(out) if "loss" in m]
    assert len(lrs) == 8 and lrs[3] == pytest.approx(cfg.optim.lr * lr_lambda(cfg.optim, 4)(3))
    schedule = lr_lambda(cfg.optim, 8)
    assert lrs[4:] == pytest.approx([cfg.optim.lr * schedule(step) for step in range(4, 8)])


def test_a_step_the_fp16_loss_scaler_skips_leaves_the_schedule_where_it_is_and_resumes_exactly(tmp_path, monkeypatch):
    # fp16 loss scaling forced on CPU with a scale of 2**127, which overflows the first steps' gradients: the
    # scaler skips those optimizer steps and halves its scale each time. Before, each skipped step moved the
    # schedule on all the same, so warmup and decay ran ahead of the steps that trained.
    import shutil

    import torch

    from bezoar.train import loop

    real = loop.Trainer.__init__

    def with_overflowing_scaler(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)

    monkeypatch.setattr(loop.Trainer, "__init__", with_overflowing_scaler)
    args = ("train.max_steps=6", "train.save_every=1", "train.keep_last=9", "optim.warmup_steps=3",
            "lora.dropout=0.1")
    straight = tmp_path / "straight"
    said = []
    cfg = tiny_sft_config(straight, *args)
    run_stage(cfg, log=said.append)
    records = [m for m in read_metrics(straight) if "loss" in m]
    skipped = [m.get("skipped", False) for m in records]
    assert [m["step"] for m in records] == list(range(1, 7))
    assert skipped[0] and not all(skipped), skipped
    assert sum("optimizer step was skipped" in str(s) for s in said) == sum(skipped)
    schedule = loop.lr_lambda(cfg.optim, 6)
    ran = [sum(not s for s in skipped[:i]) for i in range(6)]  # optimizer steps before each step
    assert [m["lr"] for m in records] == pytest.approx([cfg.optim.lr * schedule(n) for n in ran])
    first = skipped.index(False)
    b = {k: v for k, v in _adapter_at(straight, first).items() if "lora_B" in k}
    assert all(not v.any() for v in b.values()), "a skipped step left LoRA B at zero"
    # Resumed inside the skipped steps and after them, the run is the one that never stopped.
    for stop in (1, first + 1):
        out = tmp_path / f"stopped-{stop}"
        shutil.copytree(straight, out)
        (out / "summary.json").unlink()
        shutil.rmtree(out / "adapter")
        for later in range(stop + 1, 7):
            shutil.rmtree(out / "checkpoints" / f"step-{later}")
        (out / "config.toml").write_text((out / "config.toml").read_text().replace(str(straight), str(out)))
        run_stage(tiny_sft_config(out, *args), resume=True, log=_quiet)
        mine, theirs = _adapter(out), _adapter(straight)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), stop
        kept = [[(m["step"], m["loss"], m["lr"], m.get("skipped")) for m in read_metrics(run)]
                for run in (out, straight)]
        assert kept[0] == kept[1], stop


def _adapter_at(out, step):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("epochs, steps_per_epoch, total", [(1.1, 100, 110), (2.2, 100, 220), (0.5, 100, 50),
                                                            (0.3, 10, 3), (1.01, 100, 101), (0.001, 10, 1)])
def test_a_fractional_epoch_count_trains_its_steps_without_a_rounding_extra(epochs, steps_per_epoch, total):
    """epochs = 1.1 over 100 steps an epoch ran 111 steps: 1.1 * 100 is 110.00000000000001 in floats."""
    import torch

    from bezoar.train.loop import LoopConfig, OptimConfig, Trainer

    class Batches:
        def __len__(self):
            return steps_per_epoch

        def __iter__(self):
            return iter(range(steps_per_epoch))

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(torch.nn.Linear(2, 2), None, Batches(), LoopConfig(epochs=epochs, progress=False), OptimConfig(),
                      "unused")
    assert trainer.total_steps == total


def test_the_lr_schedule_against_hand_values_and_transformers():
    """Every other lr assertion is computed with lr_lambda itself: a schedule that never decayed passed them.
    Here: hand-written values, and transformers' schedulers at every step, warmup included (bezoar's warmup
    was (step + 1) / warmup, reaching full lr a step early and holding it for two steps, so that one warmup
    step was none; and a ratio's count was rounded to nearest, so that 0.03 of a short stage was none)."""
    import math

    import torch
    from transformers import (get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    from bezoar.train.loop import OptimConfig, lr_lambda

    f = lr_lambda(OptimConfig(schedule="cosine", warmup_steps=4), 14)
    assert [round(f(s), 6) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f(5) < 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0, abs=1e-12)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    f = lr_lambda(OptimConfig(schedule="linear", warmup_steps=0), 10)
    assert [f(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    f = lr_lambda(OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.1), 10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.55) and f(10) == pytest.approx(0.1)
    assert lr_lambda(OptimConfig(schedule="constant", warmup_steps=2), 10)(7) == 1.0
    assert lr_lambda(OptimConfig(schedule="cosine", warmup_ratio=0.25), 40)(9) == 0.9  # 10 warmup steps
    # a ratio's count is rounded up, as transformers counts it: 0.03 of 10 steps is 1 warmup step (none when it
    # was rounded to nearest), 0.1 of 25 is 3, 0.1 of 30 exactly 3 (not 4 by 0.1's binary error)
    assert [lr_lambda(OptimConfig(warmup_ratio=0.03), 10)(s) for s in (0, 1)] == [0.0, 1.0]
    assert [round(lr_lambda(OptimConfig(warmup_ratio=0.1), 25)(s), 6) for s in range(4)] == [0, 0.333333, 0.666667, 1]
    assert [round(lr_lambda(OptimConfig(warmup_ratio=0.1), 30)(s), 6) for s in range(4)] == [0, 0.333333, 0.666667, 1]
    assert lr_lambda(OptimConfig(warmup_ratio=0.0), 10)(0) == 1.0

    def theirs(make, **kwargs):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return make(opt, **kwargs).lr_lambdas[0]

    for total, ratio in ((50, 0.1), (10, 0.03), (20, 0.1), (4, 0.1), (1000, 0.03)):
        warmup = math.ceil(ratio * total)  # transformers' TrainingArguments.get_warmup_steps
        for schedule, make, extra, floor in (
                ("cosine", get_cosine_schedule_with_warmup, {}, 0.0),
                ("linear", get_linear_schedule_with_warmup, {}, 0.0),
                ("cosine", get_cosine_with_min_lr_schedule_with_warmup, {"min_lr_rate": 0.2}, 0.2)):
            ours = lr_lambda(OptimConfig(schedule=schedule, warmup_ratio=ratio, min_lr_ratio=floor), total)
            hf = theirs(make, num_warmup_steps=warmup, num_training_steps=total, **extra)
            for step in range(total + 1):
                assert ours(step) == pytest.approx(hf(step), abs=1e-9), (total, ratio, schedule, floor, step)


def test_a_checkpoint_that_cannot_be_written_is_one_error_and_the_last_one_is_kept(tmp_path, monkeypatch):
    """A full disk during a checkpoint came out as torch's "basic_ios::clear: iostream error", naming neither
    the file nor the cause, and left the half-written folder behind."""
    import torch

    import bezoar.train.loop as loop
    from bezoar.train.loop import TrainingError

    real, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(loop.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        run_stage(tiny_sft_config(out, "train.max_steps=4", "train.save_every=2"), log=_quiet)
    msg = str(e.value)
    assert msg.startswith(f"{out / 'checkpoints' / 'step-4'}: the checkpoint could not be written (RuntimeError: "
                          "basic_ios::clear: iostream error; ") and "GiB free in" in msg, msg
    assert msg.endswith(f"the last checkpoint, {out / 'checkpoints' / 'step-2'}, is kept"), msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_a_max_seq_len_above_the_models_context_is_warned_of(tmp_path):
    """data.max_seq_len above max_position_embeddings trained without a word (a typo of 20480 for 2048 would go
    unnoticed until the memory ran out)."""
    lines = []
    out = tmp_path / "run"
    run_stage(tiny_sft_config(out, "train.max_steps=1", "data.max_seq_len=2048"),
              log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    warned = [line for line in lines if line.startswith("warning: data.max_seq_len = 2048 is above the context")]
    assert len(warned) == 1, lines
    assert "max_position_embeddings in " in warned[0]
    lines.clear()
    run_stage(tiny_sft_config(tmp_path / "ok", "train.max_steps=1"), log=lambda *a, **k: lines.append(str(a)))
    assert not any("max_position_embeddings" in line for line in lines)
