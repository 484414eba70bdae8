"""The CPU one-pass attention (kernels/cpu_attention.py) against a dense float64 oracle: output and exact EMA
column sums, on random and awkward shapes (ragged last block, no cache, sinks covering most keys, G = 1/3/4,
max/mean, bf16/fp32, flat and peaked softmax), and with the zero weights of `--scores last:R`."""
from __future__ import annotations

import zlib

import pytest
import torch

from cascade_kernels.chunk_attention import chunk_attention_cpu, chunk_attention_ref, ema_weights
from cascade_kernels.cpu_attention import _bf16_math, chunk_attention_blocks, first_scored


def _dense64(q, k, v, scale, ema, n_sinks, reduce):
    """softmax(q·kᵀ·scale) with the causal chunk, in float64 over the very same input values."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    kq, vq = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    s = q.double() @ kq.transpose(-1, -2) * scale
    hidden = torch.arange(n_k) > torch.arange(n_k - n_q, n_k).unsqueeze(1)
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
    col = torch.einsum("m,bhmk->bhk", ema.double(), p).view(b, hkv, g, n_k)
    scores = col.amax(dim=2) if reduce == "max" else col.mean(dim=2)
    return p @ vq, scores[:, :, n_sinks:]


def _inputs(shape, dtype, temperature):
    b, hq, hkv, n_q, n_k, d = shape[:6]
    torch.manual_seed(zlib.crc32(repr((shape, dtype, temperature)).encode()))
    q = (torch.randn(b, n_q, hq, d) * temperature).to(dtype).transpose(1, 2)  # the engine's layout
    k = torch.randn(b, hkv, n_k, d).to(dtype)
    v = torch.randn(b, hkv, n_k, d).to(dtype)
    return q, k, v


# (B, Hq, Hkv, L, K, D, sinks, head_reduce, block)
SHAPES = [
    (1, 9, 3, 100, 100 + 333, 64, 4, "max", 32),  # L not a multiple of the block, G = 3 (the embedded model)
    (1, 8, 2, 64, 64, 32, 0, "mean", 16),  # no cache (K = L), G = 4
    (2, 4, 4, 40, 40 + 7, 16, 0, "max", 64),  # G = 1, one block taller than the chunk, batch 2
    (1, 6, 2, 33, 33 + 200, 80, 230, "mean", 16),  # sinks cover all but the last 3 keys; D not a power of two
    (1, 12, 3, 17, 17 + 64, 64, 64, "max", 16),  # just past the few-queries threshold, the reference's 64 sinks
]
# out: (atol, rtol); scores: rtol relative to their largest value. bf16: the output's own rounding (and P rounded
# to bf16 inside P·V where oneDNN computes in bf16), while the logits and the scores stay float32-exact.
TOL = {torch.float32: (1e-5, 1e-5, 2e-6), torch.bfloat16: (2e-2, 2e-2, 2e-6), torch.float16: (3e-3, 3e-3, 2e-6)}


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blocks_match_float64(shape, dtype, temperature):
    b, hq, hkv, n_q, n_k, d, n_sinks, reduce, block = shape
    q, k, v = _inputs(shape, dtype, temperature)
    ema = ema_weights(n_q, 0.99)
    want_out, want_scores = _dense64(q, k, v, d**-0.5, ema, n_sinks, reduce)
    out, col = chunk_attention_blocks(q, k, v, d**-0.5, ema, block=block)
    atol, rtol, s_rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape and col.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
    scores = col.amax(dim=2) if reduce == "max" else col.mean(dim=2)
    torch.testing.assert_close(scores[:, :, n_sinks:].double(), want_scores, rtol=s_rtol,
                               atol=s_rtol * want_scores.abs().max().item())
    # the dispatcher's CPU path (default blocks) returns the same scores, reduced and without the sinks
    out2, scores2 = chunk_attention_cpu(q, k, v, d**-0.5, ema, n_sinks, reduce)
    torch.testing.assert_close(scores2.double(), want_scores, rtol=s_rtol, atol=s_rtol * want_scores.abs().max().item())
    torch.testing.assert_close(out2.double(), want_out, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_no_scores_same_output(dtype):
    """Without EMA weights (sink, full): the same output, no column sums; the flash route for float32 agrees."""
    shape = (1, 9, 3, 70, 70 + 150, 64)
    q, k, v = _inputs(shape, dtype, 2.0)
    ema = ema_weights(70, 0.99)
    with_scores, _ = chunk_attention_blocks(q, k, v, 0.125, ema, block=32)
    alone, none = chunk_attention_blocks(q, k, v, 0.125, None, block=32)
    assert none is None and torch.equal(alone, with_scores)
    out, none = chunk_attention_cpu(q, k, v, 0.125)
    ref_out, _ = chunk_attention_ref(q, k, v, 0.125)
    atol, rtol, _ = TOL[dtype]
    assert none is None
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)


def test_last_weights_skip_blocks_exactly():
    """`--scores last:R` weights: zero for all but the last R queries. The blocks before them skip the column
    sums, and the scores equal the oracle's with the same weights; the output does not change."""
    shape = (1, 9, 3, 100, 100 + 120, 32)
    q, k, v = _inputs(shape, torch.bfloat16, 2.0)
    w = ema_weights(100, 0.99, last=24)
    torch.testing.assert_close(w.sum(), ema_weights(100, 0.99).sum())  # the chunk's score mass is kept
    assert first_scored(w) == 76 and first_scored(None) == 0 and first_scored(torch.zeros(5)) == 5
    want_out, want_scores = _dense64(q, k, v, 32**-0.5, w, 0, "max")
    out, col = chunk_attention_blocks(q, k, v, 32**-0.5, w, block=16)
    torch.testing.assert_close(col.amax(dim=2).double(), want_scores, rtol=2e-6,
                               atol=2e-6 * want_scores.abs().max().item())
    exact_out, _ = chunk_attention_blocks(q, k, v, 32**-0.5, ema_weights(100, 0.99), block=16)
    assert torch.equal(out, exact_out)
    _, zero = chunk_attention_blocks(q, k, v, 32**-0.5, torch.zeros(100), block=16)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_bf16_math_mode_is_restored():
    """The matmul precision switch is scoped: the global setting is the same afterwards, also after an error."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    read = (lambda: mm.fp32_precision) if mm is not None and hasattr(mm, "fp32_precision") \
        else torch.get_float32_matmul_precision
    before = read()
    with pytest.raises(RuntimeError):
        with _bf16_math(True):
            raise RuntimeError("inside")
    assert read() == before
    q, k, v = _inputs((1, 4, 2, 20, 30, 16), torch.bfloat16, 1.0)
    chunk_attention_blocks(q, k, v, 0.25, ema_weights(20, 0.9))
    assert read() == before
