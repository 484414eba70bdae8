"""CPU decode with the embedded model: the cache's past gather as a flat row gather vs `index_select(2, ...)`.

Prefills 3,000 random tokens (cascade, cache 4096, 4 cascades, stride 1024, bf16), then alternates rounds of 10
greedy decode steps with each implementation of `engine.cache.base.gather_past` (the same values either way),
6 rounds each; prints the median and every round's ms/token, with the provenance.

    python bench/cpu_decode_gather.py
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import engine.cache.base as base  # noqa: E402
import engine.cache.cascade as cascade  # noqa: E402
from bench.common import provenance  # noqa: E402
from engine import models  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.runner import Runner  # noqa: E402


def index_select_dim2(k, v, order):
    return k.index_select(2, order), v.index_select(2, order)


def main() -> None:
    torch.manual_seed(0)
    model = models.load_model(None, "cpu", "bf16").model
    config = CacheConfig(policy="cascade", cache_size=4096, cascades=4, sinks=64, stride=1024)
    ids = torch.randint(0, 1000, (1, 3000))
    ways = {"index_select_dim2": index_select_dim2, "flat_rows": base.gather_past}
    rounds = {name: [] for name in ways}
    with Runner(model, config) as runner:
        for i in range(0, ids.shape[1], config.stride):
            runner.step(ids[:, i : i + config.stride])
        tok = torch.tensor([[5]])
        for _ in range(3):
            tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
        for _ in range(6):
            for name, fn in ways.items():
                cascade.gather_past = fn
                t0 = time.perf_counter()
                for _ in range(10):
                    tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
                rounds[name].append(round((time.perf_counter() - t0) / 10 * 1000, 2))
        cascade.gather_past = base.gather_past
    row = {"bench": "cpu_decode_gather", "tokens_before_decode": 3000,
           "median_ms_per_token": {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}, "rounds_ms": rounds,
           **provenance()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
