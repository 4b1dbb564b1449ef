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
