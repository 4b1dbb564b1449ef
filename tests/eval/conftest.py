"""Fixtures for the evaluation tests: the tiny model loaded once, a server on it, local tasks."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from bezoar.model import load

    return load(tiny_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from bezoar.model import Tokenizer

    return Tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def served(tiny_model, tiny_tokenizer):
    """bezoar.serve on the tiny model, in a background thread on a free port; model name "tiny"."""
    from bezoar.serve import BackgroundServer, Server

    server = Server(tiny_model, tiny_tokenizer, "tiny", max_batch_size=8, batch_window_s=0.02)
    with BackgroundServer(server) as background:
        yield background
