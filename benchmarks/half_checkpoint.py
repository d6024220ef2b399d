"""The embedded model as a 16-bit checkpoint, as most models on the Hugging Face hub are stored.

    python -m benchmarks.half_checkpoint OUT_DIR [--dtype bfloat16|float16]

SmolLM2-135M-Instruct's float32 weights (as the embedded GGUF file loads) rounded to ``--dtype`` and
saved with its tokenizer and generation settings as a Hugging Face folder: load it with ``--model
OUT_DIR`` (in float32, restspec's default) to measure restspec on a bfloat16 or float16 checkpoint
without downloading one. Rounding makes it a slightly different model from the embedded one.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from restspec.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    loaded = load_model("smollm2")
    config = copy.deepcopy(loaded.model.config)
    if hasattr(config, "quantization_config"):  # the GGUF loader's: the saved folder is not quantized
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.model.state_dict().items()})
    model.generation_config = loaded.model.generation_config
    model.save_pretrained(args.out)
    loaded.tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
