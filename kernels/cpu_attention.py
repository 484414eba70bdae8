"""One pass over a prefill chunk on the CPU: attention output and the exact EMA column sums from the same P.

The contract is `chunk_attention_ref`'s (kernels/chunk_attention.py): q [B, Hq, L, D], k, v [B, Hkv, K, D], the
first K - L keys seen by every query, the last L causal. Per block of queries, for all KV heads at once:

    S = q·kᵀ·scale   [B·Hkv, G·rows, keys]   the G query heads of a KV group stacked as rows: K/V never repeated
    P = softmax(S)   float32, in place; only the diagonal tile is masked, keys after the block's last query skipped
    out = P·V        (P rounded to bf16 inside the product on machines that compute bf16, as flash kernels do)
    col += w·P       float32 matrix-vector product: w_m's share of every key, summed over the block's queries

No log-sum-exp and no second walk over the keys: the probabilities that make the output also make the scores,
so the scores cost one [rows, keys] matrix-vector product per block on top of the attention. Blocks whose EMA
weights are all zero (`--scores last:R`, docs/ALGORITHM.md §3) skip it.

Why this beats torch's fused flash kernel here: with bf16 inputs the two products run as float32 matmuls in
oneDNN's bf16 math mode (`_bf16_math`). The inputs are bf16 values held in float32, so rounding them to bf16 is
exact and q·k is accumulated and returned in float32: the logits are those of the reference. torch's default
float32 matmul on x86 goes to MKL, several times slower on AMD CPUs; the bf16 mode sends it to oneDNN instead
(bench/cpu_scores.py and docs/BENCHMARKS.md have the numbers). Other dtypes take the same steps in plain float32.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

BLOCK_ROWS = 64  # queries per block and head at most (bench/cpu_scores.py --blocks)
LOGITS_BYTES = 16 << 20  # and fewer where the block's float32 logits would pass this, down to MIN_ROWS
MIN_ROWS = 16


@contextmanager
def _bf16_math(on: bool) -> Iterator[None]:
    """float32 matmuls inside may round their inputs to bf16 (oneDNN's bf16 math mode); restored on exit."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if mm is not None and hasattr(mm, "fp32_precision"):  # torch >= 2.9
        old = mm.fp32_precision
        mm.fp32_precision = "bf16" if on else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # older torch: the global float32 matmul precision selects oneDNN's bf16 path on the CPU
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium" if on else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


def first_scored(ema: Tensor | None) -> int:
    """Index of the first query with a nonzero EMA weight (L when none is): earlier ones add nothing to a score."""
    if ema is None:
        return 0
    nz = torch.nonzero(ema)
    return int(nz[0, 0]) if nz.numel() else ema.shape[0]


def chunk_attention_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    block: int = BLOCK_ROWS,
) -> tuple[Tensor, Tensor | None]:
    """Output [B, Hq, L, D] in q's dtype and the EMA column sums per query head [B, Hkv, G, K] float32 (None
    without `ema`); the caller reduces the heads and drops the sinks (`_reduce_heads`)."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g, n_c, n = hq // hkv, n_k - n_q, b * hkv
    assert hq == g * hkv and n_k >= n_q and v.shape == k.shape, (q.shape, k.shape, v.shape)
    exact_in_bf16 = q.dtype == k.dtype == v.dtype == torch.bfloat16
    kt = k.float().reshape(n, n_k, d).transpose(1, 2)  # [B·Hkv, D, K]
    vf = v.float().reshape(n, n_k, d)
    qg = q.reshape(b, hkv, g, n_q, d)  # a view for the engine's [B, L, Hq, D] memory transposed
    out = torch.empty(b, n_q, hkv, g, d, dtype=q.dtype, device=q.device)  # [B, L, Hq, D]: the engine's next layout
    col = torch.zeros(n, g, 1, n_k, dtype=torch.float32, device=q.device) if ema is not None else None
    w = ema.to(q.device, torch.float32) if ema is not None else None
    start = first_scored(ema)
    block = max(MIN_ROWS, min(block, LOGITS_BYTES // (4 * n * g * n_k)))  # long inputs (`full`): smaller blocks
    rows_max = min(block, n_q)
    logits = torch.empty(n * g * rows_max * n_k, dtype=torch.float32, device=q.device)  # reused by every block
    above = torch.ones(rows_max, rows_max, dtype=torch.bool, device=q.device).triu(1)  # key after the query
    for m0 in range(0, n_q, block):
        m1 = min(n_q, m0 + block)
        rows, seen = m1 - m0, n_c + m1  # keys after the block's last query are hidden from all of its rows
        qb = qg[:, :, :, m0:m1].float().reshape(n, g * rows, d)
        s = logits[: n * g * rows * seen].view(n, g * rows, seen)
        with _bf16_math(exact_in_bf16):
            torch.baddbmm(s, qb, kt[:, :, :seen], beta=0.0, alpha=scale, out=s)
            s4 = s.view(n, g, rows, seen)
            s4[..., n_c + m0 :].masked_fill_(above[:rows, :rows], float("-inf"))  # the diagonal tile
            torch.ops.aten._softmax.out(s, -1, False, out=s)  # row by row, so in place is safe
            o = torch.bmm(s, vf[:, :seen])  # [B·Hkv, G·rows, D]
        out[:, m0:m1] = o.view(b, hkv, g, rows, d).permute(0, 3, 1, 2, 4)
        if col is not None and m1 > start:
            with _bf16_math(False):  # the weights and P stay float32: the scores are the reference's
                col[..., :seen] += w[m0:m1].view(1, 1, 1, rows) @ s4
    out = out.view(b, n_q, hq, d).transpose(1, 2)
    return out, None if col is None else col.view(b, hkv, g, n_k)
