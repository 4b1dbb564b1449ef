"""launch_fitting: fewer pipeline stages while a kernel needs more shared memory than the GPU has."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels import launch


class OutOfResources(Exception):
    """Named like triton's: launch_fitting matches the class name (its module moved between releases)."""


class FakeKernel:
    """``kernel[grid](...)``: fails with OutOfResources above ``fits`` stages, records every try."""

    def __init__(self, name: str, fits: int):
        self.__name__ = name
        self.fits = fits
        self.tries: list[int] = []

    def __getitem__(self, grid):
        def run(*args, num_stages, **kwargs):
            self.tries.append(num_stages)
            if num_stages > self.fits:
                raise OutOfResources(f"shared memory for {num_stages} stages")
            return grid, args, kwargs

        return run


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(launch, "_STAGES_THAT_FIT", {})


def test_retries_with_fewer_stages_and_remembers_what_fitted():
    kernel = FakeKernel("k_fit", fits=2)
    x = torch.zeros(2, dtype=torch.bfloat16)
    launch.launch_fitting(kernel, (4,), (x, 3), dict(BLOCK_M=128, num_warps=8, num_stages=4))
    assert kernel.tries == [4, 3, 2]
    launch.launch_fitting(kernel, (4,), (x, 3), dict(BLOCK_M=128, num_warps=8, num_stages=4))
    assert kernel.tries == [4, 3, 2, 2]  # the second launch starts at what fitted
    # other meta-parameters or dtypes are another kernel as far as shared memory goes
    launch.launch_fitting(kernel, (4,), (x, 3), dict(BLOCK_M=64, num_warps=8, num_stages=4))
    launch.launch_fitting(kernel, (4,), (x.float(), 3), dict(BLOCK_M=128, num_warps=8, num_stages=4))
    assert kernel.tries == [4, 3, 2, 2, 4, 3, 2, 4, 3, 2]


def test_a_kernel_that_fits_launches_once_with_its_stages():
    kernel = FakeKernel("k_ok", fits=8)
    launch.launch_fitting(kernel, (1,), (), dict(num_stages=3))
    assert kernel.tries == [3]


def test_gives_up_at_one_stage_with_the_kernels_error():
    kernel = FakeKernel("k_never", fits=0)
    with pytest.raises(OutOfResources, match="1 stages"):
        launch.launch_fitting(kernel, (1,), (), dict(num_stages=3))
    assert kernel.tries == [3, 2, 1]


def test_other_errors_are_not_retried():
    class Broken(FakeKernel):
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                self.tries.append(num_stages)
                raise ValueError("bad argument")

            return run

    kernel = Broken("k_bad", fits=8)
    with pytest.raises(ValueError, match="bad argument"):
        launch.launch_fitting(kernel, (1,), (), dict(num_stages=3))
    assert kernel.tries == [3]


def test_no_key_is_computed_while_every_launch_fits(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "_key", lambda *a: calls.append(a) or ("k",))
    kernel = FakeKernel("k_fast", fits=8)
    for _ in range(3):
        launch.launch_fitting(kernel, (1,), (), dict(num_stages=3))
    assert calls == [] and launch._STAGES_THAT_FIT == {}


def test_host_cdiv_and_next_power_of_2_match_triton():
    import triton

    from bezoar_kernels.launch import cdiv, next_power_of_2

    for a in (0, 1, 2, 63, 64, 65, 3200, 8640, 16385):
        for b in (1, 2, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in (1, 2, 3, 15, 16, 17, 1000, 4096, 4097):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    assert next_power_of_2(0) == 1


# ----------------------------------------------------------------------------- occupancy and waves

H100 = launch.SMLimits()  # 64K registers, 2048 threads, 228 KB of shared memory an SM
A100 = launch.SMLimits(shared=167936)


@pytest.mark.parametrize("registers,warps,shared,limits,want", [
    (178, 4, 32768, H100, 2),    # lora_dx_da, triton 3.9: 5888 registers a warp, 11 warps fit
    (168, 4, 32768, H100, 3),    # the same on triton 3.6: 5376 a warp, 12 warps
    (170, 4, 0, H100, 2),        # 170 * 32 = 5440 rounds up to 5632: 11 warps, two blocks of 4
    (125, 4, 51200, H100, 4),    # lora_da P = 3 on 3.6: registers and shared memory both allow 4
    (96, 4, 51200, H100, 4),     # 3.9: registers allow 5, shared memory (50 KB + 1 KB each) 4
    (72, 8, 116736, H100, 1),    # lora_g_db: two of 114 KB + 1 KB are more than 228 KB
    (72, 8, 116736, A100, 1),
    (32, 4, 0, H100, 16),        # threads (2048 / 128) and the block limit
    (255, 8, 0, H100, 1),        # 8192 registers a warp: 8 warps
    (64, 4, 240000, H100, 0),    # more shared memory than an SM has
    (32, 4, 45666, H100, 4),     # 46690 bytes a block would fit 5 times; rounded up to 128 (46720), 4
])
def test_blocks_per_sm_follows_the_occupancy_rules(registers, warps, shared, limits, want):
    assert launch.blocks_per_sm(registers, warps, shared, limits) == want


def _cost(blocks, tiles, resident, splits):
    steps = launch.cdiv(blocks, splits)
    used = launch.cdiv(blocks, steps)
    return launch.cdiv(tiles * used, resident) * steps


def test_wave_splits_avoids_the_short_second_wave():
    # K = 3200 in 128-column tiles (25) over 512 row blocks, 528 programs at once: 22 splits (rounding
    # 528 / 25 up, the old choice) make 550 programs, two waves of 24 blocks each; 21 make one of 25
    assert launch.wave_splits(512, 25, 528, 43) == 21
    assert _cost(512, 25, 528, 21) == 25 and _cost(512, 25, 528, 22) == 48
    # at 2 programs an SM (lora_dx_da's registers on triton 3.9) 22 splits take three waves (the third
    # of 22 programs); 21 take two full ones of 25 blocks, less than one wave of 10 splits (52 blocks)
    assert launch.wave_splits(512, 25, 264, 22) == 21
    assert (_cost(512, 25, 264, 22), _cost(512, 25, 264, 21), _cost(512, 25, 264, 10)) == (72, 50, 52)
    # ties go to fewer splits: 4 blocks, 3 tiles, 8 at once: 2 splits (6 programs, 2 steps) or 4 (12, 1)
    assert launch.wave_splits(4, 3, 8, 6) == 2


@pytest.mark.parametrize("blocks", [1, 7, 64, 256, 512, 1000])
@pytest.mark.parametrize("tiles", [1, 3, 25, 68, 75, 200, 600])
@pytest.mark.parametrize("resident", [8, 132, 264, 396, 528])
def test_wave_splits_is_never_slower_than_rounding_up(blocks, tiles, resident):
    """Within its bounds every split has rows, and the waves x steps of the choice are at most those
    of the old ``cdiv(resident, tiles)`` (which is inside the bounds), and the least of all choices."""
    most = launch.cdiv(2 * resident, tiles)
    got = launch.wave_splits(blocks, tiles, resident, most)
    assert 1 <= got <= max(1, min(blocks, most))
    assert launch.cdiv(blocks, launch.cdiv(blocks, got)) == got  # no split without rows
    old = min(launch.cdiv(resident, tiles), blocks)
    assert _cost(blocks, tiles, resident, got) <= _cost(blocks, tiles, resident, old)
    assert _cost(blocks, tiles, resident, got) == min(
        _cost(blocks, tiles, resident, s) for s in range(1, max(1, min(blocks, most)) + 1))


class _Compiled:
    def __init__(self, regs, warps, shared):
        self.n_regs = None
        self._regs = regs
        self.metadata = type("Meta", (), {"num_warps": warps, "shared": shared})()

    def _init_handles(self):
        self.n_regs = self._regs


class _WarmKernel:
    """``kernel.warmup(*args, grid=..., **kwargs)`` returning a build with the given resources."""

    def __init__(self, regs, warps, shared, fail=False):
        self.built = []
        self.build = (regs, warps, shared)
        self.fail = fail

    def warmup(self, *args, grid, **kwargs):
        self.built.append((args, grid, kwargs))
        if self.fail:
            raise RuntimeError("no build")
        return _Compiled(*self.build)


def test_resident_programs_reads_the_build_once_per_key(monkeypatch):
    monkeypatch.setattr(launch, "_RESIDENT", {})
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    monkeypatch.setattr(launch, "sm_limits", lambda device: H100)
    dev = torch.device("cuda", 0)
    kernel = _WarmKernel(168, 4, 32768)
    asked = []

    def launch_args():
        asked.append(1)
        return (torch.zeros(1), 5), dict(BLOCK=32, num_warps=4)

    assert launch.resident_programs(kernel, ("k", 1), dev, launch_args) == 3 * 132
    assert launch.resident_programs(kernel, ("k", 1), dev, launch_args) == 3 * 132
    assert len(kernel.built) == 1 and len(asked) == 1  # the second call is a lookup
    assert kernel.built[0][1] == (1,) and kernel.built[0][2] == dict(BLOCK=32, num_warps=4)
    kernel.build = (178, 4, 32768)  # another key is another build
    assert launch.resident_programs(kernel, ("k", 2), dev, launch_args) == 2 * 132
    # a build that fails or does not fit says nothing (None, remembered); off CUDA nothing is built
    assert launch.resident_programs(_WarmKernel(0, 4, 0, fail=True), ("bad",), dev, launch_args) is None
    assert launch.resident_programs(_WarmKernel(64, 4, 240000), ("big",), dev, launch_args) is None

    def never():
        raise AssertionError("built off CUDA")

    assert launch.resident_programs(kernel, ("k", 3), torch.device("cpu"), never) is None
