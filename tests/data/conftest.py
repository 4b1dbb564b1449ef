"""Fixtures for the data tests: the tiny model's tokenizer and the sample files."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent / "samples"


@pytest.fixture(scope="session")
def tiny_folder():
    from bezoar.model.tiny import build_tiny_model

    return build_tiny_model("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_folder):
    from bezoar.model import Tokenizer

    return Tokenizer(tiny_folder)


@pytest.fixture
def samples() -> Path:
    return SAMPLES
