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
