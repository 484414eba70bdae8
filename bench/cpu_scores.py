"""CPU prefill with exact scores: the one-pass kernel against the two flash passes it replaced, at one layer's
shape and on the embedded model, side by side in one run.

Layer (`--layer`, default on): B 1, Hq 9, Hkv 3, D 64 (SmolLM2-135M; `--heads` for others), L = stride queries
over sinks + cache + chunk keys, bf16, the ms of one call (best of `--repeats`) for
    two flash passes   the kernel before this change (output + LSE, then flash run backwards for the scores),
                       kept below as `two_flash_passes`, the baseline;
    flash, no scores   torch's fused kernel, output only (what `sink` ran before);
    one pass           kernels/cpu_attention.py with the exact scores, without them, and with last:R weights;
and the largest score and output differences to the float32 reference.

Model (`--model`, default on): the strided prefill of `--tokens` of the novel through the embedded model at
cache `--cache-size`, stride `--stride`, tokens/s of `sink`, `cascade` (exact) and `cascade --scores last:R`
with the new kernel, then `sink` and `cascade` with the kernels before this change (monkeypatched back), in
alternating rounds (`--rounds`, best round kept), so every ratio comes from the same run and machine.

    python bench/cpu_scores.py [--tokens 12288] [--last 64] [--rounds 2] [--no-model] [--blocks 32,64,128]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

import cascade_kernels.chunk_attention as ca  # noqa: E402
from bench.common import book_ids, provenance  # noqa: E402
from cascade_kernels.cpu_attention import chunk_attention_blocks  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.runner import Runner  # noqa: E402

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _groups(x, g):
    b, h, t, d = x.shape
    return x.unsqueeze(2).expand(b, h, g, t, d).reshape(b, h * g, t, d) if g > 1 else x


def two_flash_passes(q, k, v, scale, ema=None, n_sinks=0, head_reduce="max"):
    """The CPU chunk attention of commit 36a978d (the baseline): torch's flash kernel for output and LSE, cache
    and chunk keys merged by LSE, then the exact scores as flash run backwards (keys as queries, the bias
    log w - lse folded into two extra dimensions, its LSE the log of the EMA column sum)."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g, n_c = hq // hkv, n_k - n_q
    if n_q <= ca.FEW_QUERIES:
        return ca.chunk_attention_few(q, k, v, scale, ema, n_sinks, head_reduce)
    kq, vq = _groups(k, g), _groups(v, g)
    out, lse = _flash(q, kq[:, :, n_c:], vq[:, :, n_c:], 0.0, True, scale=scale)
    if n_c:
        o1, l1 = _flash(q, kq[:, :, :n_c], vq[:, :, :n_c], 0.0, False, scale=scale)
        out, lse = ca._merge(o1, l1, out, lse)
        out = out.to(q.dtype)
    if ema is None:
        return out, None
    bias = (torch.log(ema) - lse) / scale
    hi = bias.to(q.dtype)
    lo = (bias - hi.float()).to(q.dtype)
    q_aug = torch.cat([q, hi.unsqueeze(-1), lo.unsqueeze(-1)], dim=-1)
    k_aug = _groups(torch.cat([k, k.new_ones(b, hkv, n_k, 2)], dim=-1), g)
    zeros = q.new_zeros(b, hq, n_q, d + 2)
    col = torch.empty(b, hq, n_k, dtype=torch.float32)
    if n_c:
        col[:, :, :n_c] = _flash(k_aug[:, :, :n_c], q_aug, zeros, 0.0, False, scale=scale)[1]
    rev = _flash(k_aug[:, :, n_c:].flip(2), q_aug.flip(2), zeros, 0.0, True, scale=scale)[1]
    col[:, :, n_c:] = rev.flip(2)
    return out, ca._reduce_heads(torch.exp(col).view(b, hkv, g, n_k), head_reduce, n_sinks)


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 2)


def layer_rows(args) -> list[dict]:
    torch.manual_seed(0)
    (hq, hkv, d), b, n_q = args.heads, 1, args.stride
    n_k = args.sinks + args.cache_size + n_q
    dtype = torch.bfloat16
    q = torch.randn(b, n_q, hq, d).mul(2).to(dtype).transpose(1, 2)  # the engine's layout
    k, v = torch.randn(b, hkv, n_k, d).to(dtype), torch.randn(b, hkv, n_k, d).to(dtype)
    scale, ema = d**-0.5, ca.ema_weights(n_q, args.beta)
    last = ca.ema_weights(n_q, args.beta, last=args.last)
    ref_out, ref_scores = ca.chunk_attention_ref(q, k, v, scale, ema, args.sinks, "max")
    shape = dict(B=b, Hq=hq, Hkv=hkv, D=d, L=n_q, K=n_k, dtype="bf16")

    def err(out, scores):
        e = {"out_max_abs_err": float((out.float() - ref_out.float()).abs().max())}
        if scores is not None:
            e["scores_max_err_rel_to_max"] = float((scores - ref_scores).abs().max() / ref_scores.abs().max())
        return e

    def blocks(w, block):
        out, col = chunk_attention_blocks(q, k, v, scale, w, block=block)
        return out, None if col is None else ca._reduce_heads(col, "max", args.sinks)

    runs = {
        "two flash passes (before), exact scores": lambda: two_flash_passes(q, k, v, scale, ema, args.sinks),
        "flash, no scores (sink before)": lambda: two_flash_passes(q, k, v, scale, None, args.sinks),
    }
    for block in args.blocks:
        runs[f"one pass, block {block}, exact scores"] = lambda block=block: blocks(ema, block)
        runs[f"one pass, block {block}, no scores"] = lambda block=block: blocks(None, block)
        runs[f"one pass, block {block}, last:{args.last} scores"] = lambda block=block: blocks(last, block)
    rows = []
    for name, fn in runs.items():
        ms = _best_ms(fn, args.repeats)
        out, scores = fn()
        e = err(out, scores)
        if "last:" in name:  # not the exact scores: compare with the reference under the same weights
            e = err(out, None) | {"scores_vs_exact_rel_to_max": e["scores_max_err_rel_to_max"]}
        rows.append({"bench": "layer", "kernel": name, "ms": ms} | shape | e)
    return rows


def model_rows(args) -> list[dict]:
    lm = load_model(None, "cpu", "bf16")
    ids = torch.tensor([book_ids(lm.tokenizer, args.tokens)])
    settings = dict(cache_size=args.cache_size, cascades=4, sinks=args.sinks, stride=args.stride, beta=args.beta)
    runs = [("sink", "exact", "one pass"), ("cascade", "exact", "one pass"),
            ("cascade", f"last:{args.last}", "one pass"), ("sink", "exact", "two flash passes (before)"),
            ("cascade", "exact", "two flash passes (before)")]
    best: dict[tuple, float] = {}
    new_cpu, calls = ca.chunk_attention_cpu, []

    def before(*a, **kw):
        calls.append(1)
        return two_flash_passes(*a, **kw)

    for _ in range(args.rounds):
        for policy, scores, kernel in runs:
            calls.clear()
            ca.chunk_attention_cpu = new_cpu if kernel == "one pass" else before  # what the dispatcher calls
            try:
                config = CacheConfig(policy=policy, scores=scores, **settings)
                with torch.inference_mode(), Runner(lm.model, config) as runner:
                    start = time.perf_counter()
                    for i in range(0, args.tokens, args.stride):
                        runner.step(ids[:, i : i + args.stride])
                    seconds = time.perf_counter() - start
            finally:
                ca.chunk_attention_cpu = new_cpu
            assert bool(calls) == (kernel != "one pass"), "the baseline kernel was not the one that ran"
            key = (policy, scores, kernel)
            best[key] = min(best.get(key, float("inf")), seconds)
            print(f"{policy} {scores} {kernel}: {seconds:.2f} s", file=sys.stderr, flush=True)
    rows = []
    for (policy, scores, kernel), seconds in best.items():
        sink = best[("sink", "exact", kernel)]
        rows.append({"bench": "model", "policy": policy, "scores": scores, "kernel": kernel, "tokens": args.tokens,
                     "seconds": round(seconds, 2), "tokens_per_s": round(args.tokens / seconds, 1),
                     "vs_sink_same_kernel": round(sink / seconds, 3),
                     "vs_sink_before": round(best[("sink", "exact", "two flash passes (before)")] / seconds, 3)}
                    | settings)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--cache-size", type=int, default=4096)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--beta", type=float, default=CacheConfig().beta)
    ap.add_argument("--last", type=int, default=64, help="R of the last:R rows")
    ap.add_argument("--heads", default="9,3,64", help="Hq,Hkv,D of the layer (default: the embedded model's)")
    ap.add_argument("--blocks", default="64", help="query rows per block to time at layer shape, comma separated")
    ap.add_argument("--repeats", type=int, default=5, help="layer calls timed (best kept)")
    ap.add_argument("--rounds", type=int, default=2, help="model runs of every setting, alternating (best kept)")
    ap.add_argument("--no-layer", dest="layer", action="store_false")
    ap.add_argument("--no-model", dest="model", action="store_false")
    args = ap.parse_args()
    args.blocks = [int(x) for x in args.blocks.split(",")]
    args.heads = [int(x) for x in args.heads.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    print(json.dumps(provenance()), flush=True)
    for row in (layer_rows(args) if args.layer else []) + (model_rows(args) if args.model else []):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
