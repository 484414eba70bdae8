"""The chunk kernels' configurations on one GPU: speed and accuracy of each, on one chunk.

Llama-3.1-8B layer-0 shapes, one chunk of --stride queries over a full cache (sinks + cache keys), random bf16
inputs at two softmax temperatures (flat and peaked). For each forward configuration (--fwd): the GPU time of the
forward alone; for each scores-pass configuration (--scores, after the fastest forward): the time of forward +
scores, the difference being the scores pass. Every row carries its errors against the float32 reference
(`chunk_attention_ref`): output, scores relative to the largest, and how many keys change side of the median.

Why the scores pass is the thing to tune: it does one exp2 per (query, key) pair beside a q·k product of 2·D FLOPs.
On an H100/H200 the special-function unit does 16 fp32 exp2 per clock per SM and the tensor cores about 4,096 bf16
FLOPs, so at D = 128 both take 1/16 clock per pair; and each program streams every query of its KV group past
its BLOCK_N keys, 2·D bytes per query, so BLOCK_N sets the L2 traffic per pair. Any constexpr the kernels take
can be swept the same way.

    python bench/chunk_kernels.py --fwd '[{}, {"BLOCK_N": 128, "num_stages": 3}]' --scores '[{}, {"BLOCK_N": 256, "num_warps": 8}]'

Prints a table and one JSON row per measurement (card, versions, git, command)."""
from __future__ import annotations

import argparse
import json

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

import cascade_kernels.chunk_attention as ca  # noqa: E402
import cascade_kernels.prefill_triton as pt  # noqa: E402
from bench.prefill_latency import DEV, DT, HKV, HQ, D, chunk_flops, emitter, gpu_time, provenance  # noqa: E402


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


def _configs(text: str, base: dict) -> list[dict]:
    return [{**base, **c} for c in json.loads(text)] if text else [dict(base)]


def chunk(args, emit) -> None:
    n_q, n_c = args.stride, args.sinks + args.cache_size
    n_k, scale = n_c + n_q, D**-0.5
    ema = ca.ema_weights(n_q, args.beta, DEV)
    f4, f6 = chunk_flops(n_q, n_c, 4), chunk_flops(n_q, n_c, 6)
    data = {}
    for temperature in (1.0, 4.0):  # flat and peaked softmax
        torch.manual_seed(0)
        q = (torch.randn(1, HQ, n_q, D, device=DEV) * temperature).to(DT)
        k = torch.randn(1, HKV, n_k, D, device=DEV, dtype=DT)
        v = torch.randn(1, HKV, n_k, D, device=DEV, dtype=DT)
        data[temperature] = (q, k, v, *ca.chunk_attention_ref(q, k, v, scale, ema, args.sinks, "max"))

    def run(fc, sc, what):
        q, k, v = data[1.0][:3]
        try:
            t4 = gpu_time(lambda: pt.chunk_attention_triton(q, k, v, scale, None, fwd_config=fc), reps=args.reps)
            t6 = gpu_time(lambda: pt.chunk_attention_triton(q, k, v, scale, ema, args.sinks, "max", fwd_config=fc,
                                                            scores_config=sc), reps=args.reps)
        except Exception as exc:  # a candidate that fails to compile or runs out of resources
            print(f"{what} {fc} {sc}: {type(exc).__name__} {str(exc)[:100]}", flush=True)
            return None
        row = dict(section="chunk", what=what, fwd_config=fc, scores_config=sc, L=n_q, K=n_k, fwd_ms=t4 * 1e3,
                   fwd_tflops=f4 / t4 / 1e12, both_ms=t6 * 1e3, both_tflops=f6 / t6 / 1e12, scores_ms=(t6 - t4) * 1e3)
        for temperature, (q, k, v, ref_out, ref_scores) in data.items():
            out, scores = pt.chunk_attention_triton(q, k, v, scale, ema, args.sinks, "max", fwd_config=fc,
                                                    scores_config=sc)
            row.update({f"t{temperature:.0f}_{key}": val for key, val in
                        errors(out, scores, ref_out, ref_scores).items()})
        emit(row)
        return row

    best = None
    for fc in _configs(args.fwd, pt.FWD_CONFIG[D]):
        row = run(fc, dict(pt.SCORES_CONFIG[D]), "fwd")
        if row and (best is None or row["fwd_ms"] < best["fwd_ms"]):
            best = row
    fwd = best["fwd_config"] if best else dict(pt.FWD_CONFIG[D])
    best_sc = None
    for sc in _configs(args.scores, pt.SCORES_CONFIG[D]):
        row = run(fwd, sc, "scores")
        if row and (best_sc is None or row["scores_ms"] < best_sc["scores_ms"]):
            best_sc = row
    if args.best_out:  # the fastest forward and scores pass, for a following prefill_latency run
        with open(args.best_out, "w") as f:
            json.dump(dict(fwd=fwd, scores=best_sc["scores_config"] if best_sc else pt.SCORES_CONFIG[D]), f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fwd", default="", help='JSON list of forward configs merged into the default, e.g. '
                    '\'[{}, {"BLOCK_M": 256, "num_warps": 8}]\'; the fastest is used for the scores rows')
    ap.add_argument("--scores", default="", help="JSON list of scores-pass configs merged into the default")
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--cache-size", type=int, default=65536)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.9999)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="")
    ap.add_argument("--best-out", default="", help="write the fastest configs here as JSON {fwd, scores}")
    args = ap.parse_args()
    prov = provenance()
    print(json.dumps(prov), flush=True)
    rows = []
    emit = emitter(prov, args.out, rows)

    chunk(args, emit)
    print(f"\n{prov['gpu']}  torch {prov['torch']}  triton {prov['triton']}")
    print(f"\n{'pass':<6} {'config':<70} {'fwd ms':>7} {'TFLOP/s':>7} {'scores ms':>9} {'all TFLOP/s':>11} "
          f"{'out rel':>8} {'sc err/max':>10} {'sc err/max t4':>13} {'flips t4':>8}")
    for r in rows:
        if r["section"] == "chunk":
            cfg = r["fwd_config"] if r["what"] == "fwd" else r["scores_config"]
            print(f"{r['what']:<6} {json.dumps(cfg):<70} {r['fwd_ms']:7.2f} {r['fwd_tflops']:7.0f} {r['scores_ms']:9.2f} "
                  f"{r['both_tflops']:11.0f} {r['t1_out_rel_fro']:8.1e} {r['t1_scores_max_err_of_max']:10.1e} "
                  f"{r['t4_scores_max_err_of_max']:13.1e} {r['t4_median_side_flips']:8.4f}")


if __name__ == "__main__":
    main()
