"""Test-wide setup: the Triton interpreter on machines without CUDA, the gpu marker, tiny models."""

from __future__ import annotations

import os

# The interpreter must be chosen before triton is first imported anywhere.
if os.environ.get("BEZOAR_TEST_CUDA", "") != "1":
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test worker (and per subprocess a test starts): workers already fill the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_BNB_OVERRIDE = None


def _bitsandbytes_portable_cpu() -> None:
    """On an AVX-512 host, make bitsandbytes' CPU arithmetic the oracle the tests mean: its portable torch
    implementation. Found on such a host (bitsandbytes 0.50.2, torch 2.13, 2026-11-27; docs/notes.md):
    its native ``dequantize_4bit`` treats every row as starting a block, which is wrong (0.04 off on
    weights of scale 0.02) wherever blocks cross rows (48 x 160 at blocksize 64), and a ``Linear4bit``
    in eval mode without grad repacks its weight for AVX-512 BF16 and computes in bf16. Elsewhere
    bitsandbytes runs its portable code already, and nothing changes."""
    import importlib.util
    import warnings

    if torch.backends.cpu.get_cpu_capability() != "AVX512" or importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.backends.default import ops as portable
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return portable._dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    # bitsandbytes registers its CPU kernel from Python on such a host; torch 2.11 refuses to override that
    # through torch.library.register_kernel (2.13 allows it), so the override is asked for by name
    global _BNB_OVERRIDE
    _BNB_OVERRIDE = torch.library.Library("bitsandbytes", "FRAGMENT")  # kept: the kernel lives as long as it
    with warnings.catch_warnings():  # torch warns that a kernel is overridden: that is the point
        warnings.simplefilter("ignore", UserWarning)
        _BNB_OVERRIDE.impl("dequantize_4bit", dequantize_4bit, "CPU", allow_override=True)
    bnb_modules.has_avx512bf16 = lambda: False  # read by each Linear4bit as it is built


@pytest.fixture(scope="session", autouse=True)
def _bitsandbytes_oracle():
    _bitsandbytes_portable_cpu()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_dir():
    """A tiny HF-format Llama folder (hidden 64, 2 layers, 4 heads of 16, vocab 512)."""
    from bezoar.model.tiny import build_tiny_model

    return build_tiny_model("tiny")


@pytest.fixture(scope="session")
def tiny_odd_dir():
    """A tiny Llama with head_dim 10 (not a power of two), GQA 6:3 and a tied LM head."""
    from bezoar.model.tiny import build_tiny_model

    return build_tiny_model("tiny-odd")
