"""Host-side cost of the cascade's chunk planning over a long input: is it flat in the tokens already read?

The paper's latency setting (cache 16,384, 1 sub-cache, 4 sinks, stride 4,096) over 1M tokens, on a one-layer
cache of tiny heads on the CPU, so that only the plan (CascadeCache.begin/update/end's host work and its small
index tensors) is timed. Prints ms per chunk at a few points of the input. Part of the diagnosis of issue 19's
"cost that grows faster than the input" at 1M tokens (docs/BENCHMARKS.md).

    python bench/host_plan.py [--tokens 1048576]
"""
from __future__ import annotations

import argparse
import json
import time

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

import torch

from bench.common import provenance
from engine.cache.base import CacheShape
from engine.cache.cascade import CascadeCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--cache-size", type=int, default=16384)
    ap.add_argument("--cascades", type=int, default=1)
    ap.add_argument("--sinks", type=int, default=4)
    args = ap.parse_args()
    cache = CascadeCache(CacheShape(1, 1, 1, 8, torch.float32, torch.device("cpu")), args.sinks, args.cache_size,
                         args.cascades, 0.999)
    k = torch.zeros(1, 1, args.stride, 8)
    times = []
    for _ in range(args.tokens // args.stride):
        t0 = time.perf_counter()
        cache.begin(args.stride)
        cache.update(0, k, k, torch.rand(1, 1, cache.n_past - cache.n_unscored + args.stride))
        cache.end()
        times.append(time.perf_counter() - t0)
    n = len(times)
    points = sorted({0, 4, 16, n // 4, n // 2, n - 1} & set(range(n)))
    print(json.dumps({"bench": "host_plan", "chunks": n, "tokens_read": cache.seen,
                      "ms_per_chunk_at": {str(i * args.stride): round(times[i] * 1e3, 3) for i in points},
                      "median_ms_second_half": round(sorted(times[n // 2 :])[len(times[n // 2 :]) // 2] * 1e3, 3),
                      **provenance()}))


if __name__ == "__main__":
    main()
