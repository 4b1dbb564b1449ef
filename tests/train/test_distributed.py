"""torchrun + DDP on CPU (gloo): two processes equal one process with the same global batch."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from bezoar.train.loop import list_checkpoints
from tests.train.helpers import paused_train_script, read_metrics, repo_env

CONFIG = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "sft.toml"
COMMON = ["model.path=tiny:tiny", "model.quant=nf4", "train.progress=false", "data.max_seq_len=128",
          "train.batch_size=4", "lora.r=4", "lora.dropout=0.0", "eval_path=", "merge=false",
          "train.max_steps=20", "train.save_every=5", "train.keep_last=10", "optim.lr=1e-3"]


def torchrun(out, *extra, nproc=2, wait=True, entry=("-m", "bezoar.train")):
    env = repo_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           *map(str, entry), str(CONFIG), f"out={out}", *COMMON, *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def single(out, *extra):
    return subprocess.run([sys.executable, "-m", "bezoar.train", str(CONFIG), f"out={out}", *COMMON, *extra],
                          capture_output=True, text=True, timeout=900)


def adapter(out):
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "one"
    r = single(out)
    assert r.returncode == 0, r.stderr
    return out


def test_two_processes_equal_one(one_process, tmp_path):
    out = tmp_path / "two"
    r = torchrun(out)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = read_metrics(one_process), read_metrics(out)
    la = [m["loss"] for m in a if "loss" in m]
    lb = [m["loss"] for m in b if "loss" in m]
    assert len(la) == len(lb) == 20
    for i, (x, y) in enumerate(zip(la, lb)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), f"step {i + 1}: {x} vs {y}"
    wa, wb = adapter(one_process), adapter(out)
    for k in wa:
        err = (wa[k] - wb[k]).abs().max().item()
        assert err <= 1e-5, f"{k}: max |diff| {err:.2e}"


def _wait_for_step(proc, out, step: int) -> None:
    """Until the run that ``proc`` (torchrun) started into ``out`` has logged ``step`` (600 s at most)."""
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and any(m.get("step", 0) >= step for m in read_metrics(out))):
        assert proc.poll() is None, f"torchrun ended before step {step}"
        assert time.time() < deadline, f"step {step} not logged within 600 s"
        time.sleep(0.05)


def test_killed_two_process_run_resumes_equal(tmp_path):
    straight = tmp_path / "straight"
    r = torchrun(straight)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    # The ranks stop after step 7 is logged (between checkpoints 5 and 10) and are killed there. Killed when
    # the test first saw step 7, they went on past checkpoint 10 whenever the test was slower than 3 steps.
    # torchrun starts each worker in a session of its own, so killing torchrun's process group left them
    # training to the end, into the folder the resumed run then used: the workers are killed one by one.
    proc = torchrun(killed, wait=False, entry=(paused_train_script(tmp_path), 7))
    try:
        _wait_for_step(proc, killed, 7)
    finally:
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:  # torchrun already ended
            workers = []
        os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        proc.wait()
        psutil.wait_procs(workers, timeout=60)
    assert [m["step"] for m in read_metrics(killed) if "loss" in m] == list(range(1, 8))
    assert [s for s, _ in list_checkpoints(killed)] == [5]
    r = torchrun(killed, "--resume")
    assert r.returncode == 0, r.stderr
    wa, wb = adapter(straight), adapter(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed 2-process run differs from the uninterrupted one"
    assert [m["loss"] for m in read_metrics(killed) if "loss" in m] == [m["loss"] for m in read_metrics(straight) if "loss" in m]


def _rank_script(tmp_path, body: str) -> Path:
    """A torchrun entry that runs ``body`` (with ``rank`` set) before ``python -m bezoar.train``."""
    script = tmp_path / "rank_entry.py"
    script.write_text("import os\nrank = int(os.environ['RANK'])\n" + body
                      + "\nfrom bezoar.train.__main__ import run_as_script\nrun_as_script()\n")
    return script


def test_a_resume_whose_ranks_see_different_checkpoints_stops_every_rank_with_one_error(tmp_path):
    """Two machines with disks of their own under `out`: only rank 0 writes checkpoints, so on --resume rank 1
    found none and started from step 0 while rank 0 went on from its checkpoint. Their collectives no longer
    matched, rank 0 wrote a checkpoint from the mismatched exchange, and the run hung for the process group's
    30-minute timeout. It now stops at once on every rank, saying why."""
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in machines:
        folder.mkdir()
    script = _rank_script(tmp_path, f"os.chdir({[str(m) for m in machines]!r}[rank])")  # `out` relative: per machine
    r = torchrun("run", "train.max_steps=4", "train.save_every=2", entry=(script,))
    assert r.returncode == 0, r.stdout + r.stderr
    run = machines[0] / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4] and not (machines[1] / "run" / "checkpoints").exists()
    # Complete on rank 0 only: rank 0 ended at once (status 0), rank 1 waited for it in the process group
    r = torchrun("run", "train.max_steps=4", "train.save_every=2", "--resume", entry=(script,))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "the ranks see different runs in it (rank 0: complete; rank 1: no checkpoint)" in out, out
    for name in ("summary.json", "adapter", "checkpoints/step-4"):  # as if killed after step 2's checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    r = torchrun("run", "train.max_steps=4", "train.save_every=2", "--resume", entry=(script,))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "the ranks see different runs in it (rank 0: checkpoint step 2; rank 1: no checkpoint)" in out, out
    assert "storage every machine sees" in out
    assert [s for s, _ in list_checkpoints(run)] == [2]  # nothing written from the mismatch


def test_a_recipe_whose_ranks_see_different_stages_done_stops_every_rank_with_one_error(tmp_path):
    """A recipe's ranks each skipped the stages they found complete: rank 0 went on to dpo while rank 1 (another
    machine's disk) started sft, and the two trained different stages against each other until the process group's
    30-minute timeout."""
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in machines:
        folder.mkdir()
    stages = ["sft.train.max_steps=2", "sft.train.epochs=0", "sft.eval_path=", "sft.train.progress=false",
              "dpo.train.max_steps=2", "dpo.train.epochs=0", "dpo.train.progress=false"]
    env = repo_env(OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bezoar.train", "--recipe", "demo", "--out", "run", *stages],
                       capture_output=True, text=True, env=env, cwd=machines[0], timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(machines[0] / "run" / "dpo")  # sft complete on machine 0; nothing on machine 1
    script = _rank_script(tmp_path, f"os.chdir({[str(m) for m in machines]!r}[rank])")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", str(script),
                        "--recipe", "demo", "--out", "run", *stages], capture_output=True, text=True, env=env,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "the ranks see different runs in it (rank 0: complete; rank 1: no checkpoint)" in out, out
    assert not (machines[0] / "run" / "dpo").exists()


def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank_with_bezoars_message(tmp_path):
    """Rank 1 raised alone before its backward; rank 0, waiting in the backward's all-reduce, printed gloo's
    "Connection closed by peer" traceback instead of the reason."""
    script = _rank_script(tmp_path, """
import bezoar.train.sft as sft
loss, calls = sft.SFTStage.loss, [0]
def poisoned(self, model, batch):
    calls[0] += 1
    out = loss(self, model, batch)
    return (out[0] * float("nan"), out[1]) if rank == 1 and calls[0] == 3 else out
sft.SFTStage.loss = poisoned
""")
    out_dir = tmp_path / "run"
    r = torchrun(out_dir, "train.max_steps=6", entry=(script,))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "non-finite loss at step 3 in micro-batch 0" in out, out  # rank 1's own message
    assert "non-finite loss at step 3 on rank(s) 1" in out, out  # rank 0's
    assert "Connection closed" not in out, out
    assert len(re.findall(r"bezoar.train: error \(rank \d\)", out)) == 2, out  # one line each, no traceback of ours
    assert [m["step"] for m in read_metrics(out_dir) if "loss" in m] == [1, 2]


def test_ranks_stop_with_a_checkpoint_when_torchrun_is_killed(tmp_path):
    """torchrun killed outright (SIGKILL: nothing forwarded) left its workers, each in a session of its own,
    training to the end; now each rank sees its parent gone, stops as on SIGTERM (the step finished, a
    checkpoint written) and exits, letting go of the folder's lock, so that --resume can take the run over."""
    from bezoar.train.run import hold_out

    out = tmp_path / "orphaned"
    proc = torchrun(out, "train.max_steps=100000", "train.save_every=0", wait=False)
    workers = []
    try:
        _wait_for_step(proc, out, 2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2, workers
        proc.kill()  # the launcher alone
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=180)
        assert not alive, f"ranks still running 180 s after torchrun was killed: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert 2 <= steps[-1] < 100000 and steps == list(range(1, steps[-1] + 1))
    assert [s for s, _ in list_checkpoints(out)] == [steps[-1]], "the ranks stop at a step with its checkpoint"
    assert not (out / "summary.json").exists()
    hold_out(out).close()  # the lock was let go


# ---- model.device under torchrun ----------------------------------------------------------------


@pytest.fixture()
def two_gpus(monkeypatch):
    """torch reports two CUDA devices (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_rank_device_follows_model_device(two_gpus, monkeypatch):
    from bezoar.config import ConfigError
    from bezoar.train.distributed import rank_device

    assert rank_device("auto", 1) == torch.device("cuda", 1)
    assert rank_device("cuda", 1) == torch.device("cuda", 1)
    assert rank_device("cpu", 1) == torch.device("cpu")
    for name in ("cuda:0", "cuda:1"):
        for local_rank in (0, 1):  # every rank refuses it, whichever GPU it would have had
            with pytest.raises(ConfigError, match=rf'model.device = "{name}" names one GPU.*torchrun assigns by '
                                                  rf"LOCAL_RANK \(cuda:{local_rank} for this rank\).*CUDA_VISIBLE"):
                rank_device(name, local_rank)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 2, but torch sees 2 GPUs.*model.device = \"cpu\""):
        rank_device("auto", 2)
    with pytest.raises(ConfigError, match='model.device = "meta": under torchrun'):
        rank_device("meta", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match='model.device = "cuda": this machine has no CUDA device'):
        rank_device("cuda", 0)


def test_dist_starts_the_process_group_on_the_stages_device(two_gpus, monkeypatch):
    """model.device = "cpu" on a GPU machine: every rank on the CPU with gloo (the process group used to
    start before the config was read, on cuda:LOCAL_RANK with NCCL, whatever model.device said)."""
    import torch.distributed as torch_dist

    from bezoar.config import ConfigError
    from bezoar.train.distributed import Dist

    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    dist = Dist()
    assert dist.device is None and calls == [], "nothing may start before the stage's model.device is known"
    assert dist.start("cpu") == torch.device("cpu") and dist.backend == "gloo"
    assert calls == [("init", "gloo")]
    assert dist.start("cpu") == torch.device("cpu") and len(calls) == 1  # a later stage on the same device
    with pytest.raises(ConfigError, match="earlier stage.*same device"):
        dist.start("auto")
    on_gpu = Dist()
    assert on_gpu.start("auto") == torch.device("cuda", 1) and on_gpu.backend == "nccl"
    assert calls[1:] == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_a_recipe_under_torchrun_trains_every_stage_on_one_device(two_gpus, tmp_path):
    from types import SimpleNamespace

    from bezoar.config import ConfigError
    from bezoar.train.recipe import run_recipe

    with pytest.raises(ConfigError, match=r"stage 'dpo': model.device = \"auto\" trains on cuda:0, but stage 'sft' "
                                          r"\(model.device = \"cpu\"\) trains on cpu"):
        run_recipe("demo", tmp_path, ["sft.model.device=cpu"], log=lambda *a: None,
                   dist=SimpleNamespace(rank=0, world_size=2, local_rank=0))
    assert not any(tmp_path.iterdir()), "nothing may run before the stages' devices are checked"


def test_an_explicit_gpu_under_torchrun_is_refused_before_training(tmp_path):
    """model.device = "cuda:1" was dropped without a word under torchrun (each rank trained on its own
    device); now the ranks stop with one error naming model.device and LOCAL_RANK, before training.
    Every rank reads the same config and refuses it (test_rank_device_follows_model_device checks the
    refusal for each LOCAL_RANK), but torchrun stops the other ranks with SIGTERM as soon as one fails, so
    whether a second rank gets to print its own error is a race: only the first one's is sure to appear."""
    out = tmp_path / "refused"
    r = torchrun(out, "model.device=cuda:1", "train.max_steps=2")
    assert r.returncode != 0, r.stdout
    printed = re.findall(r'bezoar\.train: error \(rank (\d)\): model\.device = "cuda:1" names one GPU, but under '
                         r"torchrun every rank trains on a GPU of its own, which torchrun assigns by LOCAL_RANK "
                         r"\(cuda:(\d) for this rank\)", r.stderr)
    assert printed, r.stderr
    for rank, local_rank in printed:  # each rank names its own LOCAL_RANK (RANK = LOCAL_RANK on one node)
        assert rank == local_rank and rank in ("0", "1"), printed
    assert re.search(r"exitcode\s*: 2\b", r.stderr), "the ranks should stop with bezoar.train's error status 2"
    assert not (out / "metrics.jsonl").exists()


# A sitecustomize for the ranks of the test below: each leaves gloo collectives in flight on tensors owned by
# Python objects as it closes its process group (the state in which interpreter finalization aborted ranks),
# and records, through atexit, that its interpreter finalized.
RANK_EXIT_PROBE = '''
import atexit, os
from pathlib import Path

import torch
import torch.distributed as torch_dist

import bezoar.train.distributed as distributed

close = distributed.Dist.close


def close_with_work_in_flight(self):
    for i in range(8):
        t = torch.ones(1_000_000)
        t.probe = i  # a Python attribute: the tensor's Python object lives as long as the tensor
        torch_dist.all_reduce(t, async_op=True)
    close(self)


if "RANK" in os.environ:  # a worker (or the check below), not torchrun's launcher
    atexit.register((Path(os.environ["PROBE_DIR"]) / f"finalized-rank{os.environ['RANK']}").touch)
    distributed.Dist.close = close_with_work_in_flight
'''


def test_a_finished_rank_exits_without_finalizing_beside_live_gloo_threads(tmp_path):
    """A finished two-process run failed now and then on a clean exit: rank 1 died of SIGABRT ("terminate called
    without an active exception") after its work was written, and torchrun reported the run as failed. DDP keeps
    the gloo process group, and its threads, alive past destroy_process_group; a gloo thread that lets go of a
    Python-owned tensor while the interpreter finalizes is ended mid C++ frame. Ranks now end with os._exit
    (exit_rank) once their output is flushed. The probe leaves such work in flight at the close; finalizing
    after it failed 3 runs of 6 here (SIGABRT), so the deterministic check is that no rank finalizes."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(RANK_EXIT_PROBE)
    env = repo_env(OMP_NUM_THREADS="1", PROBE_DIR=str(probe))
    env["PYTHONPATH"] = os.pathsep.join([str(probe), env["PYTHONPATH"]])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "bezoar.train",
           str(CONFIG), f"out={out}", *COMMON, "train.max_steps=2", "train.save_every=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "terminate called" not in r.stderr and "Error in sitecustomize" not in r.stderr, r.stderr
    assert f"run directory: {out.resolve()}" in r.stdout, "rank 0's last line must be flushed before os._exit"
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in probe.glob("finalized-*")) == [], "a rank finalized its interpreter"
    # The probe itself works: a process that is not a torchrun rank finalizes and leaves its marker.
    single = subprocess.run([sys.executable, "-c", "pass"], env=dict(env, RANK="9"), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    assert (probe / "finalized-rank9").exists()


@pytest.mark.parametrize("raised, code, printed", [
    (None, 0, ""), (RuntimeError("boom"), 1, "RuntimeError: boom"), (SystemExit(2), 2, ""),
    (SystemExit("usage: bad"), 1, "usage: bad"), (KeyboardInterrupt(), 130, "KeyboardInterrupt")])
def test_a_rank_exits_with_mains_status_and_prints_an_unexpected_error(raised, code, printed, monkeypatch, capsys):
    import bezoar.train.__main__ as entry
    import bezoar.train.distributed as distributed

    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)

    def fake_main():
        if raised is not None:
            raise raised
        return 0

    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(entry, "main", fake_main)
    monkeypatch.setattr(distributed, "exit_rank", fake_exit)
    with pytest.raises(Exited) as got:
        entry.run_as_script()
    assert got.value.args == (code,)
    err = capsys.readouterr().err
    assert printed in err and (printed or err == "")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not a torchrun rank: Python's own exit
    monkeypatch.setattr(entry, "main", lambda: 3)
    with pytest.raises(SystemExit) as got:
        entry.run_as_script()
    assert got.value.code == 3
