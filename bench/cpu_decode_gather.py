"""CPU decode with the embedded model: the cache's past gather as a flat row gather vs `index_select(2, ...)`.

Prefills 3,000 random tokens (cascade, cache 4096, 4 cascades, stride 1024, bf16), then alternates rounds of 10
greedy decode steps with each implementation of `engine.cache.base.gather_past` (the same values either way),
6 rounds each; prints the median and every round's ms/token, with the provenance. First it times the gather
alone on a buffer of the embedded model's shape (3 KV heads × 4,160 slots × 64, bf16; 4,000 rows in random order). `--profile` then prints
torch's CPU profiler table (self time per op) over 5 more steps with the engine's gather: where a step goes.

    python bench/cpu_decode_gather.py [--profile]

`--rope` alternates the two forms of `cascade_kernels.rope.apply_rope` instead, which rotates every cached key on every
CPU step: x·cos + rotate_half(x)·sin as written (five passes) and the fused form the engine uses (three).
`--few` alternates the decode step's attention: `chunk_attention_ref` (every cached value converted to float32
for P·V) and `chunk_attention_few` (P·V in bf16), which the engine uses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

import engine.attention as attention  # noqa: E402
import engine.cache.base as base  # noqa: E402
import engine.cache.cascade as cascade  # noqa: E402
import cascade_kernels.chunk_attention as ca  # noqa: E402
import cascade_kernels.rope as rope  # noqa: E402
from bench.common import provenance  # noqa: E402
from engine import models  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.runner import Runner  # noqa: E402


def index_select_dim2(k, v, order):
    return k.index_select(2, order), v.index_select(2, order)


def rope_as_written(x, cos, sin):
    return x * cos + rope.rotate_half(x) * sin


FEW = ca.chunk_attention_few


def set_few(fn) -> None:
    ca.chunk_attention_few = fn


def set_gather(fn) -> None:
    cascade.gather_past = fn


def set_rope(fn) -> None:
    attention.apply_rope = fn


def gather_alone(reps: int = 200) -> dict:
    torch.manual_seed(0)
    k = torch.randn(1, 3, 4160, 64).bfloat16()
    order = torch.randperm(4160)[:4000]
    out = {}
    for name, fn in (("index_select_dim2", index_select_dim2), ("flat_rows", base.gather_past)):
        fn(k, k, order)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(k, k, order)
        out[name] = round((time.perf_counter() - t0) / reps / 2 * 1e6, 1)  # per tensor gathered
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="also print the CPU profiler's table of 5 steps")
    ap.add_argument("--rope", action="store_true", help="alternate the two RoPE forms instead of the gathers")
    ap.add_argument("--few", action="store_true", help="alternate the two decode attentions instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = models.load_model(None, "cpu", "bf16").model
    config = CacheConfig(policy="cascade", cache_size=4096, cascades=4, sinks=64, stride=1024)
    ids = torch.randint(0, 1000, (1, 3000))
    if args.few:
        ways, swap = {"attention_ref": ca.chunk_attention_ref, "attention_few": FEW}, set_few
    elif args.rope:
        ways, swap = {"rope_as_written": rope_as_written, "rope_fused": rope.apply_rope}, set_rope
    else:
        ways, swap = {"index_select_dim2": index_select_dim2, "flat_rows": base.gather_past}, set_gather
    rounds = {name: [] for name in ways}
    with Runner(model, config) as runner:
        for i in range(0, ids.shape[1], config.stride):
            runner.step(ids[:, i : i + config.stride])
        tok = torch.tensor([[5]])
        for _ in range(3):
            tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
        for _ in range(6):
            for name, fn in ways.items():
                swap(fn)
                t0 = time.perf_counter()
                for _ in range(10):
                    tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
                rounds[name].append(round((time.perf_counter() - t0) / 10 * 1000, 2))
        set_gather(base.gather_past)
        set_rope(rope.apply_rope)
        set_few(FEW)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    alone = {} if args.rope or args.few else {"gather_alone_us": gather_alone()}
    name = "cpu_decode_few" if args.few else "cpu_decode_rope" if args.rope else "cpu_decode_gather"
    row = {"bench": name, **alone, "tokens_before_decode": 3000,
           "median_ms_per_token": {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}, "rounds_ms": rounds,
           **provenance()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
