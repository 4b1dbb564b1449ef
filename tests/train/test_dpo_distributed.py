"""DPO under torchrun + DDP on CPU (gloo): the cached reference is built by both ranks and equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bezoar.train.dpo import METRICS
from tests.train.dpo_helpers import write_pairs
from tests.train.helpers import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "dpo.toml"


def common(data: Path) -> list[str]:
    return ["model.path=tiny:tiny", "model.quant=none", "train.progress=false", f"data.path={data}",
            "data.max_seq_len=128", "train.batch_size=4", "lora.r=4", "lora.alpha=8", "train.max_steps=4",
            "train.save_every=0", "train.epochs=1", "optim.lr=3e-3"]


def torchrun(nproc: int) -> list[str]:
    # --standalone: torchrun binds a free port itself and hands it to the workers. A port found free here and
    # passed as --master-port could be taken (by a test in another xdist worker, say) before torchrun bound it;
    # --master-port=0 hands the workers MASTER_PORT=0 (torch 2.13), and they wait forever.
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone"]


def run(out: Path, data: Path, *extra: str, nproc: int = 1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "bezoar.train", str(CONFIG), f"out={out}", *common(data), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_with_cached_reference_equal_one_on_the_fly(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 20, seed=8)
    one = run(tmp_path / "one", data, "dpo.precompute_ref=false")
    assert one.returncode == 0, one.stdout + one.stderr
    two = run(tmp_path / "two", data, "dpo.precompute_ref=true", nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "reference log-probs cached in" in two.stdout
    assert len(list((tmp_path / "two" / "ref_cache").glob("ref-logps-*.safetensors"))) == 1
    a = [m for m in read_metrics(tmp_path / "one") if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len(a) == len(b) == 4
    for ma, mb in zip(a, b):
        for key in ("loss", *METRICS):
            assert abs(ma[key] - mb[key]) <= 1e-5 * max(1.0, abs(ma[key])), (ma["step"], key, ma[key], mb[key])
    wa = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for k in wa:
        err = (wa[k] - wb[k]).abs().max().item()
        assert err <= 1e-5, f"{k}: max |diff| {err:.2e}"


# Runs bezoar.train as torchrun would, where another run sharing the cache folder finishes the same cache between
# rank 0's first look and rank 1's: rank 1 puts the file named in CACHE_FROM in place just before it looks.
CACHE_APPEARS_FOR_RANK_1 = """
import os, shutil, sys
import bezoar.train.dpo as dpo
import time
load, looked = dpo.ReferenceCache.load, [False]
marker = os.path.join(os.path.dirname(os.environ["CACHE_FROM"]), "rank0-looked")
def patched(self, quiet=False):
    if os.environ["RANK"] == "0" and not looked[0]:
        looked[0] = True
        found = load(self, quiet)
        open(marker, "w").close()  # rank 0 has looked (and found nothing): now the other run finishes
        return found
    if os.environ["RANK"] == "1" and not looked[0]:
        looked[0] = True
        deadline = time.time() + 120
        while not os.path.exists(marker) and time.time() < deadline:
            time.sleep(0.05)
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.environ["CACHE_FROM"], self.path.with_suffix(".part"))
        os.replace(self.path.with_suffix(".part"), self.path)
    return load(self, quiet)
dpo.ReferenceCache.load = patched
from bezoar.train.__main__ import run_as_script
run_as_script()
"""


def test_ranks_agree_to_build_the_cache_when_only_one_found_it(tmp_path):
    """Each rank looked for the cache on its own and only those that missed it computed it, which ends in a
    collective: a rank that found it (written meanwhile by another run sharing dpo.ref_cache_dir) trained on
    while rank 0 waited in the gather, and both hung until the process group's 30-minute timeout."""
    data = write_pairs(tmp_path / "pairs.jsonl", 20, seed=8)
    first = run(tmp_path / "first", data, "dpo.precompute_ref=true")
    assert first.returncode == 0, first.stdout + first.stderr
    (cache,) = (tmp_path / "first" / "ref_cache").glob("ref-logps-*.safetensors")
    script = tmp_path / "cache_appears.py"
    script.write_text(CACHE_APPEARS_FOR_RANK_1)
    env = dict(os.environ, OMP_NUM_THREADS="1", CACHE_FROM=str(cache),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    cmd = [*torchrun(2), str(script), str(CONFIG), f"out={tmp_path / 'two'}", *common(data), "dpo.precompute_ref=true"]
    try:
        two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        import psutil  # torchrun starts its workers in sessions of their own: end them too

        for proc in psutil.process_iter(["cmdline"]):
            if str(script) in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        raise AssertionError(f"the ranks hung: {(e.stdout or b'')[-2000:]!r}") from None
    assert two.returncode == 0, two.stdout + two.stderr
    assert "reference log-probs: one pass over 40 documents" in two.stdout  # rank 0 built it, with rank 1
    a = [m["loss"] for m in read_metrics(tmp_path / "first") if "loss" in m]
    b = [m["loss"] for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


# Runs bezoar.train as torchrun would, after making rank 1 alone receive SIGTERM in its third micro-batch: a
# signal that reaches the ranks at different moments (a scheduler's preemption, Ctrl-C while one rank is a few
# instructions ahead) must still stop every rank after the same step.
SIGNAL_ONE_RANK = """
import os, signal, sys
import bezoar.train.dpo as dpo
open(os.path.join(os.path.dirname(__file__), f"pid-{os.environ['RANK']}"), "w").write(str(os.getpid()))
loss, calls = dpo.DPOStage.loss, [0]
def patched(self, model, batch):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(self, model, batch)
dpo.DPOStage.loss = patched
from bezoar.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_on_one_rank_stops_every_rank_with_a_checkpoint_that_resumes(tmp_path):
    import signal

    from bezoar.train.loop import list_checkpoints

    data = write_pairs(tmp_path / "pairs.jsonl", 20, seed=8)
    script = tmp_path / "signal_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK)
    out = tmp_path / "stopped"
    # Unbuffered: torchrun SIGTERMs the ranks still running as soon as one has exited (with 143 here), which
    # can be rank 0 before it flushed the "stopped at step" it printed.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    cmd = [*torchrun(2), str(script), str(CONFIG), f"out={out}", *common(data), "train.max_steps=6",
           "dpo.precompute_ref=false"]
    log = tmp_path / "stopped.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: end them by the pids they wrote
        os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in tmp_path.glob("pid-*"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        proc.wait()
        raise AssertionError(f"the ranks hung after a SIGTERM on rank 1 only:\n{log.read_text()[-3000:]}") from None
    output = log.read_text()
    assert proc.returncode != 0, output[-3000:]
    assert "stopped at step" in output, output[-3000:]  # rank 0's message; no rank died in a collective:
    assert "]: Traceback" not in output and "Connection closed" not in output, output[-3000:]
    ckpts = list_checkpoints(out)
    assert ckpts and ckpts[-1][0] in (3, 4), (ckpts, output[-3000:])
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, ckpts[-1][0] + 1)), steps

    # and the run goes on from there to the state of a run that was never stopped
    resumed = run(out, data, "train.max_steps=6", "dpo.precompute_ref=false", "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    straight = run(tmp_path / "straight", data, "train.max_steps=6", "dpo.precompute_ref=false", nproc=2)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed run differs from the uninterrupted one"
