"""One decode step's attention at a full cascade cache, kernel by kernel, on a GPU (CUDA graphs, no launch gaps).

Llama-3.1-8B layer shapes (32 query heads, 8 KV heads, D 128, bf16), cache 65,536 + 64 sinks, 8 cascades, filled
through the engine's own update so that the slot order is the real age order (mostly contiguous runs):

  paged       the engine's decode: split kernel over the cache's buffers (keys rotated on load) + merge with
              the exact scores; with `--grid`, every candidate of a config grid (block, stages, programs per
              SM, keys per merge program)
  unpaged     the same split + merge on an already rotated, contiguous copy (what rotating on load costs)
  sdpa        torch SDPA (flash) of the query over the same number of contiguous keys, no scores: the floor a
              dense decode reaches for the attention alone
  bytes       K and V bytes read, and the GB/s each row reaches

    python bench/decode_kernels.py --grid --out $OUT/decode_kernels.jsonl

Prints one JSON row per measurement with the card, versions and command."""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

import cascade_kernels.chunk_attention as ca  # noqa: E402
import cascade_kernels.decode_attention as da  # noqa: E402
import cascade_kernels.prefill_triton as pt  # noqa: E402
from bench.common import provenance  # noqa: E402
from bench.prefill_latency import graph_time, rotary  # noqa: E402 - the same shapes: D 128, bf16, CUDA
from engine.cache.base import CacheShape  # noqa: E402
from engine.cache.cascade import CascadeCache  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT, DEV = torch.bfloat16, "cuda"


def full_cache(args) -> CascadeCache:
    """A cascade cache filled past its capacity with random keys/values and scores, through its own update."""
    torch.manual_seed(0)
    cache = CascadeCache(CacheShape(1, 1, HKV, D, DT, torch.device(DEV)), args.sinks, args.cache_size,
                         args.cascades, args.beta)
    k = torch.randn(1, HKV, args.fill_stride, D, dtype=DT, device=DEV)
    while cache.seen < args.sinks + args.cache_size + 3 * args.fill_stride:
        cache.begin(args.fill_stride)
        cache.update(0, k, torch.randn_like(k), torch.rand(1, HKV, cache.n_past - cache.n_sinks_filled
                                                          + args.fill_stride, device=DEV))
        cache.end()
    return cache


def candidates(grid: bool) -> list[dict]:
    base = {**da.LAUNCH_DEFAULTS, **da.PAGED_DECODE_CONFIG}
    if not grid:
        return [base]
    out = [base]
    for bn, w, st, ps, merge in itertools.product((32, 64), (4,), (3, 4), (1, 2, 4), (256, 1024, 2048)):
        cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st, PROGRAMS_PER_SM=ps, MERGE_BLOCK_N=merge)
        if cfg != base:
            out.append(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-size", type=int, default=65536)
    ap.add_argument("--cascades", type=int, default=8)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.9999)
    ap.add_argument("--fill-stride", type=int, default=4096)
    ap.add_argument("--grid", action="store_true", help="time every candidate of the paged config grid")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    prov = provenance()
    sink = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        line = json.dumps({"bench": "decode_kernels", **row, **prov})
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    cache = full_cache(args)
    cache.begin(1)
    k_buf, v_buf, order = cache.past_slots(0)
    n_past = order.shape[0]
    n_k = n_past + 1
    cos, sin = rotary(n_k)
    q = torch.randn(1, HQ, 1, D, dtype=DT, device=DEV)
    k_new, v_new = (torch.randn(1, HKV, 1, D, dtype=DT, device=DEV) for _ in range(2))
    ema = ca.ema_weights(1, args.beta, DEV)
    scale = D**-0.5
    kv_bytes = 2 * HKV * n_k * D * 2
    common = dict(K=n_k, kv_MB=round(kv_bytes / 1e6, 1))
    runs = sum(1 for i in range(1, n_past) if order[i].item() != order[i - 1].item() + 1) + 1
    emit(dict(part="setup", contiguous_runs_in_order=runs, **common))

    best = (None, float("inf"))
    for cfg in candidates(args.grid):
        try:
            t = graph_time(lambda: pt.chunk_attention_paged_triton(q, k_buf, v_buf, order, k_new, v_new, cos, sin,
                                                                   scale, ema, args.sinks, "max", decode_config=cfg))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported and skipped
            emit(dict(part="paged", config=cfg, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        emit(dict(part="paged", config=cfg, us=round(t * 1e6, 2), GBps=round(kv_bytes / t / 1e9), **common))
        if t < best[1]:
            best = (cfg, t)
    emit(dict(part="paged_best", config=best[0], us=round(best[1] * 1e6, 2), **common))

    k_all, v_all = pt.materialise_triton(k_buf, v_buf, order, k_new, v_new, cos, sin)
    t = graph_time(lambda: pt.chunk_attention_triton(q, k_all, v_all, scale, ema, args.sinks, "max"))
    emit(dict(part="unpaged", config=da.DECODE_CONFIG, us=round(t * 1e6, 2), GBps=round(kv_bytes / t / 1e9),
              **common))
    t = graph_time(lambda: F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=True))
    emit(dict(part="sdpa_no_scores", us=round(t * 1e6, 2), GBps=round(kv_bytes / t / 1e9), **common))
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
