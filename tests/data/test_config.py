"""bezoar.config: TOML + overrides into nested dataclasses, type checks, errors naming key and source."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from bezoar.config import ConfigError, dump_toml, from_dict, load_config, parse_override, to_dict
from bezoar.data import DataConfig


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear"] = "cosine"
    warmup: int = 10


@dataclass
class Lora:
    r: int = 16
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    dropout: float = 0.05


@dataclass
class Stage:
    name: str = "sft"
    epochs: int = 1


@dataclass
class Root:
    out: str = "runs/x"
    seed: int = 0
    bf16: bool = True
    limit: Optional[int] = None
    note: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    optim: Optim = field(default_factory=Optim)
    lora: Lora = field(default_factory=Lora)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Stage] = field(default_factory=list)
    mixed: int | str = 0


@dataclass
class NeedsModel:
    model: str
    seed: int = 0


@dataclass
class Checked:
    steps: int = 1

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError("steps must be positive")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def test_defaults_file_and_overrides(tmp_path):
    p = write(tmp_path, 'out = "runs/a"\nseed = 3\n\n[optim]\nlr = 2\nschedule = "linear"\n\n[lora]\nr = 8\n'
                        '\n[data]\npath = "x.jsonl"\nformat = "orca"\n\n[data.template]\nsystem = "Be brief."\n')
    cfg = load_config(Root, p, ["optim.warmup=5", "lora.targets=['q_proj']", "data.max_seq_len=512", "out=runs/b c",
                                "limit=100", "optim.betas=[0.8, 0.9]"])
    assert cfg.out == "runs/b c"  # not TOML -> bare string
    assert cfg.seed == 3 and cfg.bf16 is True and cfg.limit == 100 and cfg.note is None
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # int widened to float
    assert cfg.optim.schedule == "linear" and cfg.optim.warmup == 5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.lora.r == 8 and cfg.lora.targets == ["q_proj"] and cfg.lora.dropout == 0.05
    assert cfg.data.path == "x.jsonl" and cfg.data.format == "orca" and cfg.data.max_seq_len == 512
    assert cfg.data.template.system == "Be brief." and cfg.data.template.response_header == "### Response:"


def test_no_file_means_defaults():
    assert load_config(Root) == Root()
    assert load_config(Root, None, ["seed=7"]).seed == 7


def test_unknown_key_names_key_file_and_line(tmp_path):
    p = write(tmp_path, 'seed = 1\n\n[optim]\nlr = 1e-4\nlearning_rate = 3e-4\n')
    with pytest.raises(ConfigError) as e:
        load_config(Root, p)
    msg = str(e.value)
    assert "'optim.learning_rate'" in msg and f"{p}:5" in msg and "lr" in msg  # lists what the table takes


def test_unknown_top_level_table(tmp_path):
    p = write(tmp_path, 'seed = 1\n[trainer]\nsteps = 3\n')
    with pytest.raises(ConfigError, match=r"cfg.toml:2: unknown key 'trainer'"):
        load_config(Root, p)


def test_unknown_key_from_override_names_override():
    with pytest.raises(ConfigError, match=r"command-line override 'optim.lrr=3'.*unknown key 'optim.lrr'"):
        load_config(Root, None, ["optim.lrr=3"])


@pytest.mark.parametrize("text, key, expect", [
    ("seed = 1.5\n", "seed", "an integer"),
    ("seed = true\n", "seed", "an integer"),
    ("bf16 = 1\n", "bf16", "true or false"),
    ('out = 3\n', "out", "a string"),
    ("[optim]\nlr = \"fast\"\n", "optim.lr", "a number"),
    ("[optim]\nschedule = \"step\"\n", "optim.schedule", "one of 'cosine', 'linear'"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas", "a list of 2 items"),
    ("[lora]\ntargets = [\"q\", 3]\n", "lora.targets[1]", "a string"),
    ("optim = 3\n", "optim", "table (Optim)"),
    ("[data]\nformat = \"csv\"\n", "data.format", "one of"),
    ("tags = {a = 1}\n", "tags.a", "a string"),
    ("limit = \"ten\"\n", "limit", "an integer"),
    ("mixed = 1.5\n", "mixed", "int or str"),
])
def test_wrong_types_name_the_key_and_line(tmp_path, text, key, expect):
    p = write(tmp_path, "# a comment\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(Root, p)
    msg = str(e.value)
    assert f"key {key!r}" in msg and expect in msg and str(p) in msg
    assert f"{p}:" in msg  # a line number


def test_wrong_type_from_override():
    with pytest.raises(ConfigError, match=r"override 'seed=abc'.*'seed' must be an integer"):
        load_config(Root, None, ["seed=abc"])


def test_union_keeps_exact_type():
    assert load_config(Root, None, ["mixed=3"]).mixed == 3
    assert load_config(Root, None, ["mixed=auto"]).mixed == "auto"


def test_missing_required_key_and_post_init(tmp_path):
    with pytest.raises(ConfigError, match=r"required key 'model' is missing"):
        load_config(NeedsModel, write(tmp_path, "seed = 1\n"))
    assert load_config(NeedsModel, None, ["model=tiny"]).model == "tiny"
    with pytest.raises(ConfigError, match=r"steps must be positive"):
        load_config(Checked, None, ["steps=0"])
    with pytest.raises(ConfigError, match=r"max_len .* must be between"):
        load_config(Root, None, ["data.max_seq_len=64", "data.max_len=128"])
    # max_prompt_len is checked with the config, not later when the data is encoded (after the model loads).
    with pytest.raises(ConfigError, match=r"override 'data.max_prompt_len=64'.*max_prompt_len \(64\) must be .* below"):
        load_config(Root, None, ["data.max_seq_len=64", "data.max_prompt_len=64"])
    with pytest.raises(ConfigError, match=r"max_prompt_len \(32\) must be .* below the document length \(32"):
        load_config(Root, None, ["data.max_seq_len=64", "data.format=hh_pairs", "data.max_prompt_len=32"])
    with pytest.raises(ConfigError, match=r"max_prompt_len \(0\) must be at least 1"):
        load_config(Root, None, ["data.max_prompt_len=0"])
    assert load_config(Root, None, ["data.max_seq_len=64", "data.max_prompt_len=63"]).data.max_prompt_len == 63


@dataclass
class Loop:
    steps: int = 1
    accum: int = 1
    quiet: bool = False
    mode: str = "a"

    def __post_init__(self):
        if self.accum < 1:
            raise ValueError(f"loop.accum must be at least 1, got {self.accum}")  # the dotted key first
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")  # the table's field alone
        if self.mode != "a":
            raise ValueError("give mode 'a'")  # no key to tell: the table's source


@dataclass
class HasLoop:
    loop: Loop = field(default_factory=Loop)


def test_post_init_error_names_the_source_of_the_bad_key(tmp_path):
    def error(*overrides, path=None):
        with pytest.raises(ConfigError) as e:
            load_config(HasLoop, path, list(overrides))
        return str(e.value)

    assert error("loop.quiet=true", "loop.accum=0").startswith("command-line override 'loop.accum=0': ")
    assert error("loop.quiet=true", "loop.steps=0").startswith("command-line override 'loop.steps=0': ")
    cfg = write(tmp_path, "[loop]\nquiet = true\naccum = 0\n")
    assert error("loop.steps=2", path=cfg).startswith(f"{cfg}:3: ")  # the file's line, not the override
    assert error("loop.quiet=true", "loop.mode=b").startswith("command-line override 'loop.quiet=true': ")


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(Root, write(tmp_path, "seed = = 1\n"))
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(Root, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"is a folder, not a config file"):
        load_config(Root, tmp_path)
    # saved as UTF-16 (Notepad's "Unicode"), or Latin-1 past a first good line: one error naming the line
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text("seed = 1\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(utf16))}:1: not UTF-8 text"):
        load_config(Root, utf16)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("seed = 1\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(latin))}:2: not UTF-8 text"):
        load_config(Root, latin)


@pytest.mark.parametrize("text, key, value", [
    ("a.b=2e-4", "a.b", 2e-4), ("x=true", "x", True), ("x=[1, 2]", "x", [1, 2]), ("x=runs/demo", "x", "runs/demo"),
    ('x="quoted"', "x", "quoted"), ("x={k = 1}", "x", {"k": 1}), ("x=", "x", ""), ("x = 3 ", "x", 3),
    ("x=1\ny = 2", "x", "1\ny = 2"),  # two TOML values: kept whole, not cut to the first
])
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1", "a b=1"])
def test_bad_override(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'seed.x=1': key 'seed' must be an integer"):
        load_config(Root, None, ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a table"):
        load_config(Root, None, ["seed=1", "seed.x=1"])


def test_round_trip(tmp_path):
    cfg = load_config(Root, None, [
        'out=runs/"quoted"\\path', "note=line1\nline2", "optim.lr=3e-5", "lora.targets=['q_proj', 'o_proj']",
        "tags={team = 'a b', 'odd key' = 'x'}", 'data.fields={instruction = "question", response = ["r1", "r2"]}',
        "data.limit=100000", "stages=[{name = 'lamini', epochs = 1}, {name = 'orca', epochs = 2}]", "mixed=word",
        "data.template.system=Line one.\tTab and ünïcode",
    ])
    text = dump_toml(cfg, header="resolved config\nof a run")
    assert text.startswith("# resolved config\n# of a run\n")
    p = write(tmp_path, text)
    back = load_config(Root, p)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert "# limit is unset (None)" in text


def test_dump_refuses_none_with_non_none_default():
    @dataclass
    class Bad:
        x: Optional[int] = 3

    with pytest.raises(ConfigError, match="TOML has no null"):
        dump_toml(Bad(x=None))


def test_dataclass_fields_are_complete():
    # Every DataConfig field survives a round trip with non-default values.
    cfg = DataConfig(path="p", format="hh_pairs", split="test", limit=5, shuffle_seed=1, fields={}, hh_field="c",
                     max_seq_len=128, max_len=64, max_prompt_len=10, eos=False, packed=False, skip_bad_records=True)
    assert from_dict(DataConfig, to_dict(cfg)) == cfg
    assert {f.name for f in dataclasses.fields(DataConfig)} <= set(to_dict(cfg))



def test_a_bad_list_item_is_blamed_on_the_line_or_override_that_set_its_list(tmp_path):
    p = write(tmp_path, 'seed = 1\n\n[lora]\nr = 4\n\ntargets = ["q", 3]\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}:6: key 'lora.targets\[1\]' must be a string"):
        load_config(Root, p)
    p = write(tmp_path, '[lora]\nr = 4\n')
    for path in (p, None):
        with pytest.raises(ConfigError, match=r"^command-line override 'lora.targets=\[1\]': key 'lora.targets\[0\]'"):
            load_config(Root, path, ["lora.targets=[1]"])
    p = write(tmp_path, 'seed = 1\n\n[[stages]]\nname = "a"\n\n[[stages]]\nname = 3\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}:3: key 'stages\[1\].name'"):  # its table's line
        load_config(Root, p)
    with pytest.raises(ConfigError, match=r"^command-line override 'stages=\[\{name = 3\}\]': key 'stages\[0\].name'"):
        load_config(Root, None, ["stages=[{name = 3}]"])


@pytest.mark.parametrize("value", [
    "'\"\"\"'", '"say \\"\\"\\" twice"', "'''\"\"\"'''", '"x" # a comment with """', "'''one line'''",
])
def test_triple_quotes_inside_a_one_line_value_keep_the_line_numbers(tmp_path, value):
    p = write(tmp_path, f"note = {value}\n\n[optim]\nwarmup = \"x\"\n")
    with pytest.raises(ConfigError) as e:
        load_config(Root, p)
    assert str(e.value).startswith(f"{p}:4: key 'optim.warmup'"), str(e.value)


def test_keys_after_a_multi_line_string_keep_their_line_numbers(tmp_path):
    text = 'note = """\nseed = 1\n"""\nout = """a\n\\"""\nb"""\ntags = [\n  """\n  x = 1\n  """,\n]\n\nseed = "x"\n'
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'cfg.toml'))}:13: key 'seed'"):
        load_config(Root, write(tmp_path, text))


def test_dump_escapes_what_toml_forbids(tmp_path):
    text = "del\x7f, nul\x00, esc\x1b, tab\t, bell\x07, c1\x85 and \u2028"
    cfg = Root(out=text, tags={"k\x7f": text}, note="x")
    dumped = dump_toml(cfg, header=f"of {text}")
    assert "\x7f" not in dumped and "\\u007f" in dumped
    assert load_config(Root, write(tmp_path, dumped)) == cfg
    with pytest.raises(ConfigError, match=r"key 'out': holds U\+DC80, a lone surrogate"):
        dump_toml(Root(out="bad\udc80byte"))


def test_an_override_sets_an_optional_field_back_to_none(tmp_path):
    """A bare none (or null) is None for a field that may be None; quoted, it is the string; for other fields it is
    the string it always was. A wrong value for an Optional field says how to set None."""
    p = write(tmp_path, 'limit = 5\nnote = "n"\n\n[data]\npath = "x.jsonl"\n')
    cfg = load_config(Root, p, ["limit=none", "note=null", "lora.targets=['none']"])
    assert cfg.limit is None and cfg.note is None and cfg.lora.targets == ["none"]
    assert load_config(Root, p, ['note="none"']).note == "none"
    assert to_dict(load_config(Root, p, ["out=none", "mixed=none"]))["mixed"] == "none"  # not Optional: a string
    assert load_config(Root, p, ["limit=none", "limit=7"]).limit == 7  # the last override wins
    with pytest.raises(ConfigError, match=r"^command-line override 'limit=None': key 'limit' must be an integer, "
                                          r"got \"None\" \(str\) \(or none: limit=none sets it to None\)$"):
        load_config(Root, p, ["limit=None"])
