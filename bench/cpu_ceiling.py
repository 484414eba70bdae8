"""This CPU's ceilings for the FLOP accounting in docs/BENCHMARKS.md: bf16/fp32 GEMM of the embedded model's
MLP shape, and torch's fused CPU flash attention at the cache-4096 / stride-1024 shape (9 query heads, 3 KV
heads, head dim 64, 5184 keys).

    python bench/cpu_ceiling.py"""
import json
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401
from bench.common import provenance  # noqa: E402


def timed(fn, reps=5):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


row = provenance()
for dtype in (torch.bfloat16, torch.float32):
    a = torch.randn(1024, 576, dtype=dtype)
    w = torch.randn(1536, 576, dtype=dtype)
    t = timed(lambda: a @ w.T)
    row[f"gemm_1024x576x1536_{str(dtype)[6:]}_gflops"] = round(2 * 1024 * 576 * 1536 / t / 1e9, 1)
q = torch.randn(1, 9, 1024, 64, dtype=torch.bfloat16)
k = torch.randn(1, 9, 5184, 64, dtype=torch.bfloat16)
t = timed(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=0.125))
row["flash_cpu_bf16_L1024_K5184_seconds"] = round(t, 4)
row["flash_cpu_bf16_gflops"] = round(4 * 9 * 1024 * 5184 * 64 / t / 1e9, 1)
print(json.dumps(row))
