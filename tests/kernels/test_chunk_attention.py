"""chunk_attention: every fast path against `chunk_attention_ref` on seeded random inputs (STYLE rule 10).

The CPU test runs in CI. The Triton tests need a CUDA device: `python -m pytest -m gpu tests/kernels`."""
from __future__ import annotations

import zlib

import pytest
import torch

import cascade_kernels.chunk_attention as ca
import cascade_kernels.prefill_triton as pt
from cascade_kernels import dispatch
from cascade_kernels.chunk_attention import chunk_attention_cpu, chunk_attention_ref, ema_weights
from tests.kernels.interpreter import interpreted

# (B, Hq, Hkv, L, K, D, sinks, head_reduce)
CPU_SHAPES = [
    (1, 4, 4, 1, 1, 64, 0, "max"),  # one query, one key (few queries: `chunk_attention_few`)
    (1, 8, 2, 1, 100, 64, 3, "mean"),  # decode over a cache
    (1, 9, 3, 5, 5 + 300, 64, 4, "max"),  # a few queries over a cache, causal among themselves, G = 3
    (2, 4, 4, 16, 16, 32, 0, "mean"),  # the most queries that take the few-queries path, no cache
    (2, 6, 2, 17, 17, 32, 0, "max"),  # no cache, G = 3, just past the few-queries threshold
    (1, 6, 2, 33, 130, 80, 3, "max"),  # D not a power of two
    (1, 8, 1, 64, 200, 64, 64, "mean"),  # G = 8, the reference's 64 sinks
]
# (dtype, atol, rtol) for out; scores are compared relative to their largest value
CPU_TOL = {
    torch.float32: (1e-5, 1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2, 2e-3),  # bf16 out rounding (8-bit mantissa) and bf16 P·V inside the CPU flash
}


def _inputs(b, hq, hkv, n_q, n_k, d, dtype, device="cpu", temperature=1.0):
    q = torch.randn(b, hq, n_q, d, device=device) * temperature
    k = torch.randn(b, hkv, n_k, d, device=device)
    v = torch.randn(b, hkv, n_k, d, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check_scores(got, want, rtol):
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=rtol * want.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("dtype", list(CPU_TOL))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_cpu_matches_ref(shape, dtype):
    b, hq, hkv, n_q, n_k, d, n_sinks, reduce = shape
    torch.manual_seed(zlib.crc32(repr(shape).encode()))
    q, k, v = _inputs(b, hq, hkv, n_q, n_k, d, dtype)
    ema = ema_weights(n_q, 0.99)
    out, scores = chunk_attention_cpu(q, k, v, d**-0.5, ema, n_sinks, reduce)
    ref_out, ref_scores = chunk_attention_ref(q, k, v, d**-0.5, ema, n_sinks, reduce)
    atol, rtol, s_rtol = CPU_TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    _check_scores(scores, ref_scores, s_rtol)


def _dense(q, k, v, scale, ema, n_sinks, reduce, softcap, window):
    """The eager formula of transformers' gemma2 attention: logits, tanh cap, [L, K] sliding-window causal mask."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    kq, vq = k.repeat_interleave(g, dim=1).double(), v.repeat_interleave(g, dim=1).double()
    s = q.double() @ kq.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    own = torch.arange(n_k - n_q, n_k).unsqueeze(1)
    keys = torch.arange(n_k)
    hidden = (keys > own) | ((keys <= own - window) if window is not None else False)
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)  # [B, Hq, L, K]
    col = torch.einsum("m,bhmk->bhk", ema.double(), p).view(b, hkv, g, n_k)
    scores = col.amax(dim=2) if reduce == "max" else col.mean(dim=2)
    return (p @ vq).float(), scores[:, :, n_sinks:].float()


# (B, Hq, Hkv, L, K, D, sinks, head_reduce, softcap, window)
CAPPED_SHAPES = [
    (1, 6, 2, 1, 100, 32, 4, "max", None, 24),  # decode past the window: cut to the last 24 keys, fast path
    (1, 6, 2, 1, 20, 32, 4, "max", None, 24),  # the window not reached: the plain dispatcher
    (1, 6, 2, 7, 100, 32, 4, "mean", 2.0, 24),  # a few queries, capped and windowed (few-queries block)
    (1, 6, 2, 64, 100, 32, 4, "max", None, 24),  # a chunk whose band crosses the cache and the chunk
    (2, 4, 4, 100, 100, 16, 0, "mean", 3.0, 30),  # no cache, the chunk alone is longer than the window
    (1, 8, 2, 40, 140, 32, 2, "max", 1.5, None),  # soft-capping only
    (1, 6, 2, 5, 10, 32, 8, "max", None, 3),  # cut-off keys fewer than the sinks
]


@pytest.mark.parametrize("shape", CAPPED_SHAPES, ids=str)
def test_softcap_and_window(shape):
    """The reference against the dense eager formula, and the dispatcher (cut-off keys, few-queries block)
    against the reference; both in float32 with scores over every column."""
    b, hq, hkv, n_q, n_k, d, n_sinks, reduce, softcap, window = shape
    torch.manual_seed(zlib.crc32(repr(shape).encode()))
    q, k, v = _inputs(b, hq, hkv, n_q, n_k, d, torch.float32, temperature=3.0)
    ema = ema_weights(n_q, 0.99)
    want_out, want_scores = _dense(q, k, v, d**-0.5, ema, n_sinks, reduce, softcap, window)
    ref_out, ref_scores = chunk_attention_ref(q, k, v, d**-0.5, ema, n_sinks, reduce, block=16, softcap=softcap,
                                              window=window)
    torch.testing.assert_close(ref_out, want_out, atol=1e-5, rtol=1e-4)
    _check_scores(ref_scores, want_scores, 1e-4)
    out, scores = ca.chunk_attention(q, k, v, d**-0.5, ema, n_sinks, reduce, softcap=softcap, window=window)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    _check_scores(scores, ref_scores, 1e-4)
    out, none = ca.chunk_attention(q, k, v, d**-0.5, None, n_sinks, reduce, softcap=softcap, window=window)
    assert none is None
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)


def test_no_softcap_no_window_is_bit_identical():
    """Without them (or with a window the keys do not reach) the dispatcher takes the very same path."""
    torch.manual_seed(0)
    q, k, v = _inputs(1, 6, 2, 33, 130, 32, torch.bfloat16)
    ema = ema_weights(33, 0.99)
    base = ca.chunk_attention(q, k, v, 32**-0.5, ema, 4, "max")
    for got in (ca.chunk_attention(q, k, v, 32**-0.5, ema, 4, "max", softcap=None, window=None),
                ca.chunk_attention(q, k, v, 32**-0.5, ema, 4, "max", window=130)):
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


# ---- Triton kernels in the interpreter (CPU; skipped where triton is not installed)


@pytest.mark.parametrize("shape", [(1, 8, 2, 40, 40 + 37, 32, 3, "max"), (1, 4, 4, 16, 16, 16, 0, "mean"),
                                   (2, 6, 2, 5, 5 + 50, 32, 1, "max"), (1, 8, 2, 1, 1 + 77, 32, 3, "mean")], ids=str)
def test_interpreted_kernels_match_ref(monkeypatch, shape):
    """Forward and scores pass with small blocks: several query and key blocks, ragged ends, a chunk with no
    cache, one shorter than a block; one query (decode: split-K over the keys, then the merge)."""
    b, hq, hkv, n_q, n_k, d, n_sinks, reduce = shape
    torch.manual_seed(zlib.crc32(repr(shape).encode()))
    q, k, v = _inputs(b, hq, hkv, n_q, n_k, d, torch.float32)
    ema = ema_weights(n_q, 0.99)
    blocks = dict(fwd_config=dict(BLOCK_M=16, BLOCK_N=16),
                  scores_config=dict(BLOCK_M=16, BLOCK_N=16), decode_config=dict(BLOCK_N=16, PROGRAMS_PER_SM=1))
    run = lambda m: m.chunk_attention_triton(q, k, v, d**-0.5, ema, n_sinks, reduce, **blocks)  # noqa: E731
    interp = interpreted(monkeypatch, "prefill_triton", run)
    out, scores = run(interp)
    ref_out, ref_scores = chunk_attention_ref(q, k, v, d**-0.5, ema, n_sinks, reduce)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    _check_scores(scores, ref_scores, 1e-4)
    out_only, none = interp.chunk_attention_triton(q, k, v, d**-0.5, None, n_sinks, reduce, **blocks)
    assert none is None
    torch.testing.assert_close(out_only, ref_out, atol=1e-4, rtol=1e-4)


# ---- Triton (CUDA)

gpu = pytest.mark.gpu
needs_triton = pytest.mark.skipif(
    pt.triton is None or not torch.cuda.is_available(), reason="needs triton and a CUDA device"
)

GPU_SHAPES = [
    (1, 32, 8, 1, 65601, 128, 64, "max"),  # decode over a full cache (split-K)
    (2, 4, 4, 1, 37, 64, 0, "mean"),  # decode, short, G = 1
    (1, 24, 8, 1, 1000, 128, 3, "max"),  # decode, G = 3
    (1, 32, 8, 4096, 4096, 128, 0, "max"),  # first chunk: no cache
    (1, 32, 8, 512, 512 + 64 + 1000, 128, 64, "max"),  # cache not a multiple of the block
    (2, 8, 1, 77, 77 + 333, 64, 3, "mean"),  # G = 8, odd L, D 64
    (1, 12, 4, 130, 130 + 127, 64, 0, "max"),  # G = 3
    (1, 4, 4, 16, 16 + 5, 128, 5, "max"),  # tiny, sinks cover the whole cache
    (1, 32, 8, 2, 2 + 500, 128, 64, "mean"),  # L = 2
]
# (dtype, atol, rtol) for out; scores rtol relative to their largest value
GPU_TOL = {
    torch.bfloat16: (2e-2, 2e-2, 2e-3),  # P rounded to bf16 before P·V, as every flash kernel does
    torch.float16: (2e-3, 1e-2, 2e-3),
}


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", list(GPU_TOL))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_matches_ref(shape, dtype):
    b, hq, hkv, n_q, n_k, d, n_sinks, reduce = shape
    torch.manual_seed(zlib.crc32(repr(shape).encode()))
    for temperature in (1.0, 4.0):  # flat and peaked softmax
        q, k, v = _inputs(b, hq, hkv, n_q, n_k, d, dtype, "cuda", temperature)
        ema = ema_weights(n_q, 0.999, "cuda")
        out, scores = pt.chunk_attention_triton(q, k, v, d**-0.5, ema, n_sinks, reduce)
        ref_out, ref_scores = chunk_attention_ref(q, k, v, d**-0.5, ema, n_sinks, reduce)
        atol, rtol, s_rtol = GPU_TOL[dtype]
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
        _check_scores(scores, ref_scores, s_rtol)
        out_only, none = pt.chunk_attention_triton(q, k, v, d**-0.5, None, n_sinks, reduce)
        assert none is None
        torch.testing.assert_close(out_only, ref_out, atol=atol, rtol=rtol)


@gpu
@needs_triton
@pytest.mark.parametrize("n_q", [1, 300])
def test_triton_engine_layout_and_repeatability(n_q):
    """q as the engine hands it ([B, L, H, D] memory transposed), K/V slices of a longer buffer; two runs agree
    bit for bit (no race), and the dispatcher takes the Triton path."""
    torch.manual_seed(n_q)
    b, hq, hkv, d, n_k = 1, 32, 8, 128, 5000
    q = torch.randn(b, n_q, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    big_k = torch.randn(b, hkv, n_k + 100, d, device="cuda", dtype=torch.bfloat16)
    big_v = torch.randn_like(big_k)
    k, v = big_k[:, :, 50 : 50 + n_k], big_v[:, :, 50 : 50 + n_k]
    ema = ema_weights(n_q, 0.9999, "cuda")
    assert dispatch.triton_supports(q, k)
    out1, s1 = ca.chunk_attention(q, k, v, d**-0.5, ema, 64, "max")
    out2, s2 = pt.chunk_attention_triton(q, k, v, d**-0.5, ema, 64, "max")
    assert torch.equal(out1, out2) and torch.equal(s1, s2)
    ref_out, ref_scores = chunk_attention_ref(q, k, v, d**-0.5, ema, 64, "max")
    torch.testing.assert_close(out1, ref_out, atol=2e-2, rtol=2e-2)
    _check_scores(s1, ref_scores, 2e-3)


@gpu
@needs_triton
def test_dispatcher_choices(monkeypatch):
    q = torch.randn(1, 4, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 20, 128, device="cuda", dtype=torch.bfloat16)
    assert dispatch.triton_supports(q, k)
    assert not dispatch.triton_supports(q.float(), k.float())
    assert not dispatch.triton_supports(q[..., :96], k[..., :96])
    called = []
    monkeypatch.setattr(ca, "chunk_attention_ref", lambda *a: called.append(1) or (None, None))
    with dispatch.use_reference():  # what CASCADECTL_KERNELS=ref asks for
        ca.chunk_attention(q, k, k, 0.1, ema_weights(8, 0.9, "cuda"))
    assert called == [1]


@gpu
@needs_triton
@pytest.mark.parametrize("n_q", [1, 256])
def test_no_host_sync(n_q):
    """A decode step and a prefill chunk launch their kernels without waiting for the GPU."""
    q, k, v = _inputs(1, 32, 8, n_q, 20000, 128, torch.bfloat16, "cuda")
    ema = ema_weights(n_q, 0.9999, "cuda")
    ca.chunk_attention(q, k, v, 128**-0.5, ema, 64, "max")  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, scores = ca.chunk_attention(q, k, v, 128**-0.5, ema, 64, "max")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scores.shape == (1, 8, 20000 - 64)
