"""The cascade's cache update alone: `CascadeCache.update` for one layer, at a full cache, on CPU or GPU.

The update is launch-bound on a GPU (many small gathers over a few thousand items per sub-cache), so this times
it in isolation and counts its device kernels (CUDA) or top-level torch ops (CPU) per chunk. `--module FILE`
loads another implementation of engine/cache/cascade.py (e.g. `git show REV:engine/cache/cascade.py > old.py`)
so that two versions are compared on the same machine in one run.

    python bench/cache_update.py --device cuda --cache-size 65536 --cascades 8 --stride 4096,1
    python bench/cache_update.py --module old.py --label before ...

Prints one JSON row per (implementation, stride) with the provenance (command, machine, versions, git revision).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.cache.base import CacheShape  # noqa: E402


def load_cache_class(path: str | None):
    if not path:
        from engine.cache.cascade import CascadeCache
        return CascadeCache
    spec = importlib.util.spec_from_file_location("engine.cache._cascade_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module.CascadeCache


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_update(cls, args, stride: int, dev: torch.device) -> dict:
    torch.manual_seed(0)
    h, d = args.kv_heads, args.head_dim
    shape = CacheShape(1, 1, h, d, torch.bfloat16, dev)
    cache = cls(shape, args.sinks, args.cache_size, args.cascades, args.beta)
    k = torch.randn(1, h, stride, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)

    def chunk(timed: bool) -> float:
        cache.begin(stride)
        score = torch.rand(1, h, cache.n_past - cache.n_sinks_filled + stride, device=dev)
        sync(dev)
        t0 = time.perf_counter()
        cache.update(0, k, v, score)
        sync(dev)
        dt = time.perf_counter() - t0
        cache.end()
        return dt

    fill = max(stride, 4096)  # fill the cache in long chunks (a decode-step run would take 65K steps), then a few more
    k_fill = torch.randn(1, h, fill, d, dtype=torch.bfloat16, device=dev)
    for _ in range((args.sinks + args.cache_size) // fill + 1):
        cache.begin(fill)
        cache.update(0, k_fill, k_fill, torch.rand(1, h, cache.n_past - cache.n_sinks_filled + fill, device=dev))
        cache.end()
    for _ in range(3):
        chunk(False)
    times = sorted(chunk(True) for _ in range(args.reps))
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        chunk(True)
    if dev.type == "cuda":
        events = [e for e in prof.key_averages() if (getattr(e, "self_device_time_total", 0) or 0) > 0]
        launches = sum(e.count for e in events)
        device_ms = sum(e.self_device_time_total for e in events) / 1000
    else:
        launches = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
        device_ms = None
    return {"stride": stride, "median_ms": round(1000 * times[len(times) // 2], 4),
            "min_ms": round(1000 * times[0], 4), "kernels_or_ops": launches,
            "kernel_ms": None if device_ms is None else round(device_ms, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache-size", type=int, default=65536)
    ap.add_argument("--cascades", type=int, default=8)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.9999)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--stride", default="4096,1", help="chunk lengths (1 = a decode step)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--module", default="", help="another cascade.py to time instead of the engine's")
    ap.add_argument("--label", default="engine")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cls = load_cache_class(args.module)
    prov = provenance()
    for stride in (int(x) for x in args.stride.split(",")):
        row = {"bench": "cache_update", "label": args.label, "cache_size": args.cache_size,
               "cascades": args.cascades, "sinks": args.sinks, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               **time_update(cls, args, stride, dev), **prov}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
