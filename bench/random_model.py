"""Write a random-weight copy of a model's architecture, with its tokenizer, as a `--model` directory.

For GPU machines without the embedded model (its GGUF is not there and nothing can be downloaded): the shapes,
tokenizer and chat template are the real ones, the weights are random, so speed and memory are representative and
answers are not.

    python bench/random_model.py SRC_DIR DEST_DIR [--layers N] [--dtype bf16]

SRC_DIR holds config.json and the tokenizer files (e.g. the embedded model's converted cache under
~/.cache/cascadectl/models/)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--layers", type=int, default=0, help="keep only this many decoder layers (0 = all)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    print(f"wrote {dest} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random parameters)")


if __name__ == "__main__":
    main()
