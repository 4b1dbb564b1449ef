"""python -m bezoar.train: flags and values that do not fit are refused with one message, before anything runs."""

from __future__ import annotations

import pytest

from bezoar.train.__main__ import main
from tests.train.helpers import DEMO

TINY = ["model.path=tiny:tiny", "model.quant=none", "train.progress=false", "data.max_seq_len=128", "lora.r=4",
        "eval_path=", "merge=false", "train.max_steps=1"]


@pytest.mark.parametrize("flag", [["--dry-run"], ["--out", "elsewhere"]])
def test_recipe_only_flags_with_a_stage_config_are_refused(tmp_path, capsys, flag):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([str(DEMO / "sft.toml"), f"out={out}", *TINY, *flag])
    assert e.value.code == 2
    assert flag[0] in capsys.readouterr().err
    assert not out.exists(), "nothing may run"
