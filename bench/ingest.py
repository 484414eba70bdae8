"""Ingest throughput and peak RSS of the strided prefill (what `summarize`/`ask` do before answering), or of
the model's own transformers forward over the whole input in one call (`--hf`).

    python bench/ingest.py --tokens 65536 --cache-size 4096 --stride 1024
    python bench/ingest.py --tokens 8192 --hf

Prints one JSON object per run with the command, machine and versions. Peak RSS includes the model (~0.3 GB
bf16 weights plus the Python/torch runtime)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import book_ids, peak_rss_mib, provenance  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.runner import Runner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--policy", default="cascade")
    ap.add_argument("--cache-size", type=int, default=4096)
    ap.add_argument("--cascades", type=int, default=4)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--hf", action="store_true", help="the model's own sdpa forward over all tokens at once")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model(None, "cpu", args.dtype)
    ids = torch.tensor([book_ids(lm.tokenizer, args.tokens)])
    row = provenance() | {"tokens": args.tokens, "dtype": args.dtype}
    rss_loaded = peak_rss_mib()
    with torch.inference_mode():
        if args.hf:
            start = time.perf_counter()
            lm.model.model(input_ids=ids, use_cache=False)  # hidden states only, like an ingest
            seconds = time.perf_counter() - start
            row |= {"mode": "transformers sdpa forward, one call"}
        else:
            config = CacheConfig(policy=args.policy, cache_size=args.cache_size, cascades=args.cascades,
                                 sinks=args.sinks, stride=args.stride)
            with Runner(lm.model, config) as runner:
                start = time.perf_counter()
                for i in range(0, args.tokens, args.stride):
                    runner.step(ids[:, i : i + args.stride])
                seconds = time.perf_counter() - start
                row |= {"mode": f"strided prefill ({args.policy})", "cache_size": args.cache_size,
                        "cascades": args.cascades, "sinks": args.sinks, "stride": args.stride,
                        "kv_cache_mib": runner.cache.nbytes() / 2**20}
    row |= {"seconds": round(seconds, 2), "tokens_per_s": round(args.tokens / seconds, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_load_mib": round(rss_loaded, 1)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
