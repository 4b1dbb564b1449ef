"""``python -m bezoar.quantize``: write an NF4 copy of a dense Llama checkpoint that transformers loads.

Every linear layer of the decoder blocks (q/k/v/o, gate/up/down) becomes NF4 in transformers'
bitsandbytes-4bit serialization (weight, weight.absmax, weight.quant_map, weight.nested_absmax,
weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4, and a ``quantization_config`` in
config.json); embeddings, norms and lm_head stay dense in the checkpoint's dtype (config.json's, or
where it names none, that of its stored tensors). The bytes are the ones bitsandbytes would write, so
``AutoModelForCausalLM.from_pretrained(out)`` (with bitsandbytes installed) and
``bezoar.model.load(out)`` both read it.

Each layer is quantized as it streams in from the dense checkpoint (``load(quant="nf4")``), so peak
memory stays near the size of the quantized model plus one layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def quantize(model_dir, out_dir, blocksize: int = 64, double_quant: bool = True,
             compute_dtype: str = "bfloat16", device: str | None = None, overwrite: bool = False) -> Path:
    """Quantize ``model_dir`` into ``out_dir``; returns the output folder."""
    from bezoar.model import CheckpointError, LlamaConfig, load, save
    from bezoar.model.checkpoint import check_out_folder, is_prequantized, stored_float_dtype

    check_out_folder(out_dir, overwrite, model=model_dir)  # before the quantization, which takes minutes
    config = LlamaConfig.from_file(model_dir)
    if is_prequantized(config):
        raise CheckpointError(f"{Path(model_dir) / 'config.json'}: quantization_config says this checkpoint is "
                              "already bitsandbytes 4-bit")
    dtype = config.torch_dtype or stored_float_dtype(model_dir) or "float32"
    model = load(model_dir, quant="nf4", device=device or "cpu", dtype=dtype, nf4_blocksize=blocksize,
                 nf4_double_quant=double_quant, nf4_compute_dtype=compute_dtype)
    return save(model, out_dir, tokenizer_from=model_dir, overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bezoar.quantize", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--model", required=True, help="dense model folder (Hugging Face format)")
    p.add_argument("--out", required=True, help="folder for the NF4 checkpoint")
    p.add_argument("--blocksize", type=int, choices=[64, 128], default=64, help="values per absmax block (default 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep absmax in fp32 instead of 8-bit (double quantization is on by default)")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="bnb_4bit_compute_dtype written into quantization_config (default bfloat16)")
    p.add_argument("--device", default=None, help="where quantization runs: cpu (default) or cuda (Triton kernels)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from bezoar.config import environment_error
    from bezoar.model import CheckpointError, ConfigError

    if (why := environment_error()) is not None:
        print(f"bezoar.quantize: error: {why}", file=sys.stderr)
        return 2

    try:
        out = quantize(args.model, args.out, args.blocksize, args.double_quant, args.compute_dtype, args.device,
                       args.overwrite)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"bezoar.quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"quantized {args.model} to NF4 (blocksize {args.blocksize}, double quant "
          f"{'on' if args.double_quant else 'off'}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
