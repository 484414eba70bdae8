"""CPU decode with the embedded model: the step that reads the cache in place against the plain gather path.

Reads `--tokens` of the novel (data/pride_and_prejudice.txt) through a cascade of `--cache-size` (4 sub-caches,
stride 1024, the model in `--dtype`: auto is bf16 on AVX512 CPUs and fp32 on others; the cache ends full and
evicting), then alternates rounds of 10 greedy decode steps with `Runner.in_place_decode` on (engine/slot_decode.py:
keys rotated at their slots, runs read where they lie) and off (the plain path: gather the past into age order,
rotate every key at its rank), 6 rounds each, and prints the median and every round's ms/token with the
provenance. Then, on the same cache, it alternates 6 rounds of 10 in-place steps with `--weights native` (the dense
linears) and `--weights auto` (for the embedded model: the decoder layers' linears packed to int4,
engine/weight_pack.py, measured lossless, and an fp32 model's head given its bf16 copy; swapped in and out between
rounds). `--profile` then prints torch's CPU profiler table (self time per op) over 10 more in-place steps: where
a step goes now.

    python bench/cpu_decode.py [--tokens 8192] [--cache-size 4096] [--dtype auto] [--profile]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine import models  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.weight_pack import decoder_linears, pack_linears  # noqa: E402

NOVEL = Path(__file__).resolve().parent.parent / "data" / "pride_and_prejudice.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens read before decoding")
    ap.add_argument("--cache-size", type=int, default=4096)
    ap.add_argument("--dtype", default="auto", help="the model's dtype: auto, bf16 or fp32")
    ap.add_argument("--profile", action="store_true", help="also print the CPU profiler's table of 10 steps")
    args = ap.parse_args()
    loaded = models.load_model(None, "cpu", args.dtype)
    ids = loaded.tokenizer(NOVEL.read_text(encoding="utf-8")[: args.tokens * 8])["input_ids"][: args.tokens]
    ids = torch.tensor([ids])
    config = CacheConfig(policy="cascade", cache_size=args.cache_size, cascades=4, stride=1024)
    ways = {"in_place": True, "plain_gather": False}
    rounds = {name: [] for name in ways}
    with Runner(loaded.model, config) as runner:
        for i in range(0, ids.shape[1], config.stride):
            runner.step(ids[:, i : i + config.stride])
        tok = torch.tensor([[5]])

        def steps(n: int) -> None:
            nonlocal tok
            for _ in range(n):
                tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)

        steps(3)
        for _ in range(6):
            for name, flag in ways.items():
                runner.in_place_decode = flag
                t0 = time.perf_counter()
                steps(10)
                rounds[name].append(round((time.perf_counter() - t0) / 10 * 1000, 2))
        runner.in_place_decode = True
        # --weights native against auto on the same cache: the packed modules swapped in and out between rounds
        dense = [(parent, name, linear) for parent, name, linear in decoder_linears(loaded.model)]
        dense.append((loaded.model, "lm_head", loaded.model.lm_head))  # auto gives an fp32 model's head a bf16 copy
        report = pack_linears(loaded.model, "int4", lossless_only=True)  # what load_model's auto does here
        packed = [getattr(parent, name) for parent, name, _ in dense]
        weight_rounds = {"native": [], "auto": []}
        for _ in range(6):
            for name in weight_rounds:
                for (parent, attr, linear), swap in zip(dense, packed):
                    setattr(parent, attr, linear if name == "native" else swap)
                t0 = time.perf_counter()
                steps(10)
                weight_rounds[name].append(round((time.perf_counter() - t0) / 10 * 1000, 2))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps(10)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16), file=sys.stderr)
        fill = runner.cache.fill()
    row = {"bench": "cpu_decode", "dtype": str(loaded.model.dtype).removeprefix("torch."),
           "tokens_before_decode": int(ids.shape[1]), "cache_size": args.cache_size,
           "cache_fill": fill, "median_ms_per_token": {k: sorted(v)[len(v) // 2] for k, v in rounds.items()},
           "rounds_ms": rounds,
           "weights": {"auto": report.mode, "packed_linears": report.packed, "bytes_added": report.bytes_added,
                       "max_regrid_error_steps": report.max_regrid_error, "head_bf16_copy": report.head,
                       "median_ms_per_token": {k: sorted(v)[len(v) // 2] for k, v in weight_rounds.items()},
                       "rounds_ms": weight_rounds},
           **provenance()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
