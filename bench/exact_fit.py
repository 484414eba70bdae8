"""Ingest cost of `--cache-size auto`'s exact route against the model's own forward, at the same length.

For each length (default 4K and 8K tokens of the bundled novel, embedded model), alternates for ROUNDS rounds:
the transformers forward over all tokens at once (the decoder only, `model.model(ids)`: no LM head, as our
ingest computes none), the exact route as `ppl`/`summarize`/`ask` take it (`--policy full` in chunks of the
stride) and the old default, a 4,096-token cascade (which evicts above 4K). Prints the median seconds of each,
the ratio route/forward and the provenance. The target (issue 17): route within 1.10x of the forward.

FLOPs per token at length T on this model: 2 x 106M decoder weights = 212M for the linear layers, plus
4 x T/2 x 576 x 30 for causal attention (about 283M at T = 8K): the forward and the route do the same work.

    python bench/exact_fit.py [--rounds 3] [--lengths 4096,8000] [--stride 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.reading import ingest  # noqa: E402
from engine.tokens import rechunk  # noqa: E402

BOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "pride_and_prejudice.txt")


def forward(lm, ids: list[int]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        lm.model.model(torch.tensor([ids]), use_cache=False)
    return time.perf_counter() - start


def route(lm, ids: list[int], config: CacheConfig) -> float:
    start = time.perf_counter()
    with Runner(lm.model, config, n_sinks=config.sinks, expected_tokens=len(ids)) as runner:
        ingest(runner, [], rechunk([ids], config.stride))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", default="4096,8000")
    ap.add_argument("--stride", type=int, default=1024)
    args = ap.parse_args()
    lm = load_model(None, "cpu", "auto")
    with open(BOOK, encoding="utf-8") as f:
        book = lm.tokenizer.encode(f.read()[:200_000], add_special_tokens=False)
    exact = CacheConfig(policy="full", stride=args.stride)
    cascade = CacheConfig(policy="cascade", cache_size=4096, stride=1024)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = book[:n]
        times = {"forward": [], "exact route": [], "cascade 4096": []}
        forward(lm, ids[:256])  # warm up
        for _ in range(args.rounds):
            times["forward"].append(forward(lm, ids))
            times["exact route"].append(route(lm, ids, exact))
            times["cascade 4096"].append(route(lm, ids, cascade))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"tokens": n, **{f"{k} s": round(v, 3) for k, v in med.items()},
               "route / forward": round(med["exact route"] / med["forward"], 3),
               "cascade / forward": round(med["cascade 4096"] / med["forward"], 3), "runs": times}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    print(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))


if __name__ == "__main__":
    main()
