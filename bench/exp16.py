"""Half-precision exponentials in the chunk kernels (EXP16_SHIFT): speed and accuracy on one GPU.

The scores pass does one exp2 per (query, key) pair beside a q·k product of 2·D FLOPs. On an H100/H200 the
special-function unit does 16 fp32 exp2 per clock per SM and the tensor cores about 4,096 bf16 FLOPs, so at
D = 128 both take 1/16 clock per pair and the pass is bound by the exponential as much as by the matrix work.
PTX's ex2.approx.f16x2 does two at a time (kernels/_blocks.py::_exp2_half). This script measures what that buys
and what it costs in accuracy, in one run:

  probe    _exp2_half on a grid of x against float64: relative error where fp16 is normal, what happens below.
  chunk    Llama-3.1-8B layer-0 shapes, one chunk of --stride queries over a full cache (sinks + cache keys),
           random bf16 inputs at two softmax temperatures: GPU time of the forward alone and of forward + scores
           for each EXP16_SHIFT, and their errors against the float32 reference (`chunk_attention_ref`) next to
           the fp32-exp kernel's own.

    python bench/exp16.py --shifts 0,7,15 --out bench/results/gpu/exp16.jsonl

Prints a table and one JSON row per measurement (card, versions, git, command)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels.chunk_attention as ca  # noqa: E402
from bench.prefill_latency import D, DEV, DT, HKV, HQ, chunk_flops, gpu_time, provenance  # noqa: E402
from tests.kernels.half_exp import exp2_half  # noqa: E402


def probe(emit) -> None:
    x = torch.arange(-30 * 256, 16 * 256, device=DEV, dtype=torch.float32) / 256  # steps of 2^-8
    y = exp2_half(x)
    want = torch.exp2(x.double())
    rel = ((y.double() - want) / want).abs()
    for lo, hi in ((-1, 1), (-8, 8), (-14, 16), (-24, -14), (-30, -24)):
        sel = (x >= lo) & (x < hi)
        emit(dict(section="probe", x_from=lo, x_to=hi, max_rel_err=rel[sel].max().item(),
                  mean_rel_err=rel[sel].mean().item(), zeros=int((y[sel] == 0).sum()), n=int(sel.sum())))


def errors(out, scores, ref_out, ref_scores) -> dict:
    d_out = (out.float() - ref_out.float())
    d_sc = (scores - ref_scores).abs()
    big = ref_scores > 1e-3 * ref_scores.max()  # columns whose relative error means something
    half = ref_scores.median()
    return dict(out_max_abs=d_out.abs().max().item(), out_rel_fro=(d_out.norm() / ref_out.float().norm()).item(),
                scores_max_err_of_max=(d_sc.max() / ref_scores.max()).item(),
                scores_mean_rel=(d_sc[big] / ref_scores[big]).mean().item(),
                scores_max_rel=(d_sc[big] / ref_scores[big]).max().item(),
                median_side_flips=((scores > half) != (ref_scores > half)).float().mean().item())


def chunk(args, emit) -> None:
    n_q, n_c = args.stride, args.sinks + args.cache_size
    n_k, scale = n_c + n_q, D**-0.5
    ema = ca.ema_weights(n_q, args.beta, DEV)
    f4, f6 = chunk_flops(n_q, n_c, 4), chunk_flops(n_q, n_c, 6)
    shifts = [int(s) for s in args.shifts.split(",")]
    fwd_base, sc_base = dict(ca.FWD_CONFIG[D]), dict(ca.SCORES_CONFIG[D])
    for temperature in (1.0, 4.0):
        torch.manual_seed(0)
        q = (torch.randn(1, HQ, n_q, D, device=DEV) * temperature).to(DT)
        k = torch.randn(1, HKV, n_k, D, device=DEV, dtype=DT)
        v = torch.randn(1, HKV, n_k, D, device=DEV, dtype=DT)
        ref_out, ref_scores = ca.chunk_attention_ref(q, k, v, scale, ema, args.sinks, "max")
        for shift in shifts:
            fc, sc = dict(fwd_base, EXP16_SHIFT=shift), dict(sc_base, EXP16_SHIFT=shift)
            out, scores = ca.chunk_attention_triton(q, k, v, scale, ema, args.sinks, "max", fwd_config=fc,
                                                    scores_config=sc)
            row = dict(section="chunk", temperature=temperature, shift=shift, L=n_q, K=n_k, **errors(out, scores, ref_out, ref_scores))
            if temperature == 1.0:  # timing does not depend on the data
                t4 = gpu_time(lambda: ca.chunk_attention_triton(q, k, v, scale, None, fwd_config=fc), reps=args.reps)
                t6 = gpu_time(lambda: ca.chunk_attention_triton(q, k, v, scale, ema, args.sinks, "max", fwd_config=fc,
                                                                scores_config=sc), reps=args.reps)
                row.update(fwd_ms=t4 * 1e3, fwd_tflops=f4 / t4 / 1e12, both_ms=t6 * 1e3, both_tflops=f6 / t6 / 1e12,
                           scores_ms=(t6 - t4) * 1e3)
            emit(row)
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shifts", default="0,7,15", help="EXP16_SHIFT values; 0 is the fp32 exp2")
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--cache-size", type=int, default=65536)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.9999)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    prov = provenance()
    print(json.dumps(prov), flush=True)
    rows = []

    def emit(row: dict) -> None:
        row = dict(prov, **row)
        rows.append(row)
        print("JSON " + json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    probe(emit)
    chunk(args, emit)
    print(f"\n{prov['gpu']}  torch {prov['torch']}  triton {prov['triton']}")
    for r in rows:
        if r["section"] == "probe":
            print(f"  exp2_half x in [{r['x_from']}, {r['x_to']}): max rel err {r['max_rel_err']:.2e}, "
                  f"mean {r['mean_rel_err']:.2e}, zeros {r['zeros']}/{r['n']}")
    print(f"\n{'temp':>4} {'shift':>5} {'fwd ms':>7} {'TFLOP/s':>7} {'+scores ms':>10} {'scores ms':>9} "
          f"{'out rel':>8} {'out max':>8} {'sc err/max':>10} {'sc mean rel':>11} {'sc max rel':>10} {'flips':>7}")
    for r in rows:
        if r["section"] == "chunk":
            t = (f"{r['fwd_ms']:7.2f} {r['fwd_tflops']:7.0f} {r['both_ms']:10.2f} {r['scores_ms']:9.2f}"
                 if "fwd_ms" in r else f"{'':7} {'':7} {'':10} {'':9}")
            print(f"{r['temperature']:4.0f} {r['shift']:5d} {t} {r['out_rel_fro']:8.1e} {r['out_max_abs']:8.1e} "
                  f"{r['scores_max_err_of_max']:10.1e} {r['scores_mean_rel']:11.1e} {r['scores_max_rel']:10.1e} "
                  f"{r['median_side_flips']:7.4f}")


if __name__ == "__main__":
    main()
