"""GPU: the exact route of `--cache-size auto` (`--policy full` in chunks of the stride, through Runner) against
the model's own dense forward (transformers sdpa, all tokens at once), random-weight Llama-3.1-8B shape, bf16.

For each T in --tokens, alternating for --rounds rounds: `model.model(ids)` (the decoder only: no LM head, as
our ingest computes none) and Runner.step over the same ids in chunks of --stride; median seconds, the ratio
(route / dense; the issue's target is <= 1.10) and peak memory of each. Work per token at T: 2 x 7.0B decoder
weights = 14 GFLOP for the linear layers plus 4 x T/2 x 4096 x 32 (causal attention, 0.27 MFLOP per context
token): the two do the same FLOPs, so the ratio is the overhead of chunking and of our attention path.

    python bench/exact_fit_gpu.py --tokens 32768 --rounds 2 [--stride 4096]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from bench.gpu_model import build_model  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.runner import Runner  # noqa: E402


def dense(model, ids) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        model.model(ids, use_cache=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def route(model, ids, stride: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    with Runner(model, CacheConfig(policy="full", stride=stride), n_sinks=0, expected_tokens=ids.shape[1]) as r, \
            torch.inference_mode():
        for start in range(0, ids.shape[1], stride):
            r.step(ids[:, start:start + stride])
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    model = build_model(args, "cuda")
    for n in (int(x) for x in args.tokens.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).cuda()
        route(model, ids[:, :args.stride], args.stride)  # warm up both (kernels compile once)
        dense(model, ids[:, :args.stride])
        times = {"dense": [], "route": []}
        peaks = {}
        for _ in range(args.rounds):
            for name, fn in (("dense", lambda: dense(model, ids)), ("route", lambda: route(model, ids, args.stride))):
                torch.cuda.reset_peak_memory_stats()
                times[name].append(fn())
                peaks[name] = torch.cuda.max_memory_allocated()
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"tokens": n, "stride": args.stride, "dense_s": round(med["dense"], 3),
                          "route_s": round(med["route"], 3), "route/dense": round(med["route"] / med["dense"], 3),
                          "runs": times, "peak_bytes": peaks, "provenance": provenance()}), flush=True)


if __name__ == "__main__":
    main()
