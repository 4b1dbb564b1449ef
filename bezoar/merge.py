"""``python -m bezoar.merge``: fold a LoRA adapter into its dense base and write a Hugging Face checkpoint.

The merge happens in the dense weights (bf16 or fp32), never in NF4: load the base unquantized.
Merging in stages (adapter 1 into the base, adapter 2 trained on that result into it) is how the
sequential SFT recipe moves from one stage to the next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def other_base(model_dir, adapter_dir) -> str | None:
    """The local folder an adapter says it was trained on (``base_model_name_or_path``) when that folder exists
    and is not ``model_dir``; None otherwise (a hub name, or no record, cannot be compared)."""
    import json

    try:
        named = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # the adapter's own reader reports a missing or broken config
    if not isinstance(named, str) or not named or not Path(named).is_dir():
        return None
    return None if Path(named).resolve() == Path(model_dir).resolve() else named


def merge(model_dir, adapter_dir, out_dir, dtype: str | None = None, device: str = "cpu", overwrite: bool = False) -> Path:
    from bezoar.model import load, save
    from bezoar.model.checkpoint import check_out_folder, stored_float_dtype
    from bezoar.model.lora import merge_adapters

    # Checked before the merge, which loads the whole base in fp32: a target that cannot be written should
    # cost nothing.
    out = Path(out_dir)
    check_out_folder(out, overwrite, model=model_dir, adapter=adapter_dir)
    model = load(model_dir, adapter=adapter_dir, device=device, dtype="float32")
    merge_adapters(model)
    out_dtype = dtype or model.config.torch_dtype or stored_float_dtype(Path(model_dir)) or "float32"
    return save(model, out_dir, tokenizer_from=model_dir, dtype=out_dtype, overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bezoar.merge", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--model", required=True, help="base model folder (Hugging Face format, dense)")
    p.add_argument("--adapter", required=True, help="PEFT-format LoRA adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the base config's dtype, or where it names none, "
                   "that of its stored tensors)")
    p.add_argument("--device", default="cpu", help="where the merge runs (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from bezoar.model import CheckpointError, ConfigError
    from bezoar.model.lora import AdapterError

    trained_on = other_base(args.model, args.adapter)
    if trained_on is not None:  # shapes that fit say nothing of the weights: merged as asked, with a word
        print(f"bezoar.merge: warning: {args.adapter} was trained on {trained_on} (its base_model_name_or_path), "
              f"not on {args.model}", file=sys.stderr)
    try:
        out = merge(args.model, args.adapter, args.out, args.dtype, args.device, args.overwrite)
    except (CheckpointError, ConfigError, AdapterError, FileExistsError, ValueError) as e:
        print(f"bezoar.merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
