"""README.md stays true: CI runs exactly the test command it gives, and every entry it lists exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f"README's test command {test_cmd!r} is not what .ci/run runs"
    assert "pip install -q torch==2.13.0" in ci


def entries():
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"`python -m (bezoar\.[a-z_]+)", text)))


@pytest.mark.parametrize("module", entries())
def test_every_listed_entry_answers_help(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage" in run.stdout.lower()
