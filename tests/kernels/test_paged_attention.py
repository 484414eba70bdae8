"""chunk_attention_paged: keys read through the cache's slot order and rotated inside the kernels.

Every path is checked against `chunk_attention_paged_ref` (gather, cat, RoPE, `chunk_attention_ref`) on seeded
random inputs with awkward shapes: decode (L = 1) and short chunks, D 64 and 128, GQA groups 1/3/4, sinks not a
multiple of the block, `order` a random subset of the slots in random order (the cache partly empty), P = 0.

On the CPU the Triton kernels run in Triton's interpreter (a private copy of the kernels package imported with
TRITON_INTERPRET=1); those tests skip where triton is not installed (CI). The interpreter's `tl.dot` mishandles
bf16, so it runs fp32 and fp16; bf16 is covered on CUDA: `python -m pytest -m gpu tests/kernels`.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import cascade_kernels.chunk_attention as ca
import cascade_kernels.paged_attention as pa
import cascade_kernels.prefill_triton as pt
from engine import attention
from engine.config import CacheConfig
from engine.runner import Runner
from cascade_kernels.chunk_attention import chunk_attention_ref, ema_weights
from cascade_kernels.paged_attention import chunk_attention_paged, chunk_attention_paged_ref, materialise
from cascade_kernels.rope import apply_rope
from tests.engine.tiny import tiny_model
from tests.kernels.interpreter import interpreted

# (B, Hq, Hkv, L, P, capacity, D, sinks, head_reduce): P keys visible in a cache of `capacity` slots
SHAPES = [
    (1, 4, 4, 1, 0, 8, 64, 0, "max"),  # decode, empty cache, G = 1
    (2, 8, 2, 1, 37, 50, 128, 3, "mean"),  # decode over a partly filled cache, G = 4
    (1, 6, 2, 7, 0, 8, 64, 0, "max"),  # first chunk: no cache, G = 3
    (1, 6, 2, 7, 45, 60, 64, 5, "max"),  # chunk 7, sinks not a multiple of the block
    (1, 12, 4, 7, 70, 70, 128, 70, "mean"),  # the sinks are the whole cache, full buffer
    (2, 4, 1, 20, 129, 200, 64, 64, "max"),  # G = 4, B = 2, two key blocks and one key
]
# small blocks: several query and key blocks, ragged ends and several decode splits on small shapes
SMALL_BLOCKS = dict(fwd_config=dict(BLOCK_M=16, BLOCK_N=16), scores_config=dict(BLOCK_M=16, BLOCK_N=16),
                    decode_config=dict(BLOCK_N=16, PROGRAMS_PER_SM=1))
SMALL_BLOCK_SHAPES = [
    (1, 6, 2, 1, 100, 120, 64, 5, "max"),  # decode in 4 splits
    (1, 12, 4, 33, 70, 90, 64, 5, "max"),  # 3 query blocks, the last one ragged
    (1, 4, 2, 33, 16, 16, 128, 3, "mean"),  # cache exactly one key block, chunk one row past two
]
# (dtype, atol, rtol) for out; scores are compared relative to their largest value
INTERP_TOL = {
    torch.float32: (1e-5, 1e-4, 1e-4),
    torch.float16: (2e-3, 1e-2, 2e-3),  # the reference rotates in fp16 steps, the kernels in fp32 with one rounding
}


def rotary(n: int, d: int, dtype: torch.dtype, device="cpu", base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style cos/sin tables [n, D] (halves repeated), in the model's dtype like the engine's."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    angle = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def paged_inputs(shape, dtype, device="cpu", temperature: float = 1.0) -> dict:
    """Random pre-RoPE buffers, a random slot order and the chunk; q rotated at P .. P+L-1 as the engine does."""
    b, hq, hkv, n_q, n_past, capacity, d, n_sinks, reduce = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    cos, sin = rotary(n_past + n_q + 3, d, dtype, device)  # a few spare rows, like the engine's longer tables
    q = apply_rope(rand(b, hq, n_q, d) * temperature, cos[n_past : n_past + n_q], sin[n_past : n_past + n_q])
    return dict(q=q, k_cache=rand(b, hkv, capacity, d), v_cache=rand(b, hkv, capacity, d),
                order=torch.randperm(capacity, generator=gen)[:n_past].to(device), k_new=rand(b, hkv, n_q, d),
                v_new=rand(b, hkv, n_q, d), cos=cos, sin=sin, scale=d**-0.5,
                ema=ema_weights(n_q, 0.99, device), n_sinks=n_sinks, head_reduce=reduce)


def check(got, want, tol) -> None:
    (out, scores), (ref_out, ref_scores) = got, want
    atol, rtol, s_rtol = tol
    assert out.dtype == ref_out.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    if ref_scores is None:
        assert scores is None
        return
    assert scores.shape == ref_scores.shape and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, ref_scores, atol=s_rtol * ref_scores.abs().max().item(), rtol=s_rtol)


# ---- CPU: the dispatcher gathers, rotates and runs the CPU kernels, exactly as the engine did before


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_dispatcher_is_the_materialised_path(shape):
    x = paged_inputs(shape, torch.bfloat16)
    k_all, v_all = materialise(x["k_cache"], x["v_cache"], x["order"], x["k_new"], x["v_new"], x["cos"], x["sin"])
    want = ca.chunk_attention(x["q"], k_all, v_all, x["scale"], x["ema"], x["n_sinks"], x["head_reduce"])
    got = chunk_attention_paged(**x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ref = chunk_attention_ref(x["q"], k_all, v_all, x["scale"], x["ema"], x["n_sinks"], x["head_reduce"])
    ref_paged = chunk_attention_paged_ref(**x)
    assert torch.equal(ref_paged[0], ref[0]) and torch.equal(ref_paged[1], ref[1])
    assert not pa.paged_supported(x["q"], x["k_cache"])  # the engine keeps its old CPU path


def test_materialise_rotates_key_j_at_position_j():
    x = paged_inputs((1, 2, 2, 3, 5, 9, 64, 2, "max"), torch.float32)
    k_all, v_all = materialise(x["k_cache"], x["v_cache"], x["order"], x["k_new"], x["v_new"], x["cos"], x["sin"])
    slot = x["order"][4].item()
    want = apply_rope(x["k_cache"][:, :, slot : slot + 1], x["cos"][4:5], x["sin"][4:5])
    torch.testing.assert_close(k_all[:, :, 4:5], want, atol=0, rtol=0)
    want_new = apply_rope(x["k_new"][:, :, 2:3], x["cos"][7:8], x["sin"][7:8])
    torch.testing.assert_close(k_all[:, :, 7:8], want_new, atol=0, rtol=0)
    assert torch.equal(v_all[:, :, 4], x["v_cache"][:, :, slot])


# ---- Triton kernels in the interpreter (CPU)


@pytest.fixture
def interp(monkeypatch):
    """The interpreted launchers (kernels/prefill_triton.py), usable for this test; skips where they cannot run."""
    x = paged_inputs((1, 2, 2, 1, 3, 4, 64, 0, "max"), torch.float32)
    return interpreted(monkeypatch, "prefill_triton", lambda module: module.chunk_attention_paged_triton(**x))


@pytest.mark.parametrize("dtype", list(INTERP_TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interpreted_kernels_match_ref(interp, shape, dtype):
    x = paged_inputs(shape, dtype)
    check(interp.chunk_attention_paged_triton(**x), chunk_attention_paged_ref(**x), INTERP_TOL[dtype])
    x["ema"] = None  # without scores (sink and full policies): out only
    check(interp.chunk_attention_paged_triton(**x), chunk_attention_paged_ref(**x), INTERP_TOL[dtype])


@pytest.mark.parametrize("launch", [{}, dict(MERGE_BLOCK_N=16)], ids=["default", "merge-16"])
@pytest.mark.parametrize("shape", SMALL_BLOCK_SHAPES, ids=str)
def test_interpreted_kernels_small_blocks(interp, shape, launch):
    """Several blocks and decode splits; a merge block smaller than the keys too."""
    x = paged_inputs(shape, torch.float16, temperature=3.0)  # peaked softmax
    blocks = {**SMALL_BLOCKS, "decode_config": {**SMALL_BLOCKS["decode_config"], **launch}}
    check(interp.chunk_attention_paged_triton(**x, **blocks), chunk_attention_paged_ref(**x),
          INTERP_TOL[torch.float16])


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[5]], ids=str)
def test_interpreted_materialise_and_prerotate(interp, shape):
    """The one-pass gather + rotate equals `materialise` with keys rotated in fp32 (exactly, in fp32), and the
    pre-rotated route of the Triton dispatch equals the reference."""
    x = paged_inputs(shape, torch.float32)
    parts = [x[name] for name in ("k_cache", "v_cache", "order", "k_new", "v_new", "cos", "sin")]
    k_all, v_all = interp.materialise_triton(*parts, block_n=16)
    want_k, want_v = materialise(*parts)
    torch.testing.assert_close(k_all, want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_all, want_v) and k_all.is_contiguous()
    check(interp.chunk_attention_paged_triton(**x, prerotate=True), chunk_attention_paged_ref(**x),
          INTERP_TOL[torch.float32])


def test_interpreted_kernels_agree_with_the_unpaged_kernels(interp):
    """The paged kernels on the cache equal the existing kernels on the materialised, rotated keys."""
    unpaged = interp  # the same kernels, PAGED off
    for shape in SHAPES[1], SHAPES[3]:
        x = paged_inputs(shape, torch.float32)
        k_all, v_all = materialise(x["k_cache"], x["v_cache"], x["order"], x["k_new"], x["v_new"], x["cos"], x["sin"])
        want = unpaged.chunk_attention_triton(x["q"], k_all, v_all, x["scale"], x["ema"], x["n_sinks"],
                                              x["head_reduce"])
        check(interp.chunk_attention_paged_triton(**x), want, INTERP_TOL[torch.float32])


# ---- the engine


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(model, config: CacheConfig, ids: list[int], n_decode: int = 3) -> torch.Tensor:
    """Logits of a prefill in chunks of `config.stride` and then of `n_decode` one-token steps: [T, V]."""
    out = []
    with Runner(model, config, expected_tokens=len(ids)) as runner:
        # decode steps through the attention dispatchers too, not the CPU's in-place decode (engine/slot_decode.py,
        # whose own oracle is tests/engine/test_slot_decode.py)
        runner.in_place_decode = False
        dev = runner.cache.shape.device
        prefill, decode = ids[: len(ids) - n_decode], ids[len(ids) - n_decode :]
        for i in range(0, len(prefill), config.stride):
            out.append(runner.logits(runner.step(torch.tensor([prefill[i : i + config.stride]], device=dev)))[0])
        for t in decode:
            out.append(runner.logits(runner.step(torch.tensor([[t]], device=dev)))[0])
    return torch.cat(out).cpu()


ENGINE_CONFIGS = [
    CacheConfig(policy="cascade", cache_size=32, cascades=4, sinks=4, stride=8),
    CacheConfig(policy="sink", cache_size=24, sinks=3, stride=8),
    CacheConfig(policy="full", stride=8),
]


@pytest.mark.parametrize("config", ENGINE_CONFIGS, ids=lambda c: c.policy)
def test_engine_logits_unchanged_on_cpu(monkeypatch, config):
    """On the CPU the engine keeps its old path; forced through `past_slots` and the paged dispatcher (which
    gathers and rotates on the CPU) every logit is bit-identical, so each cache's slots and order are right."""
    model = tiny_model("llama", head_dim=64)
    ids = _ids(90)
    calls = []

    def counted(*args):
        calls.append(args[0].shape[2])
        return chunk_attention_paged(*args)

    monkeypatch.setattr(attention, "chunk_attention_paged", counted)
    want = _run(model, config, ids)
    assert calls == []  # default CPU path: gather + torch RoPE + chunk_attention, as before
    monkeypatch.setattr(attention, "paged_supported", lambda q, k: True)
    got = _run(model, config, ids)
    assert calls == [8, 8] * 10 + [7, 7] + [1, 1] * 3  # 2 layers: 87 tokens in chunks of 8, 3 steps
    assert torch.equal(got, want)


def test_engine_through_interpreted_kernels(interp, monkeypatch):
    """Every attention call of a real run (prefill chunks over a filling and evicting cache, then decode steps)
    through the interpreted Triton kernels, checked against the reference on the same call; the reference's
    result is passed on so that both runs keep the same cache."""
    calls = []

    def checked(*args):
        want = chunk_attention_paged_ref(*args)
        check(interp.chunk_attention_paged_triton(*args), want, INTERP_TOL[torch.float32])
        calls.append(args[0].shape[2])
        return want

    model = tiny_model("llama", head_dim=64, num_hidden_layers=1)
    config = ENGINE_CONFIGS[0]  # the cascade: scores, sinks, rings (sink and full orders: the bit-exact test above)
    ids = _ids(44)
    want = _run(model, config, ids, n_decode=2)
    monkeypatch.setattr(attention, "paged_supported", lambda q, k: True)
    monkeypatch.setattr(attention, "chunk_attention_paged", checked)
    got = _run(model, config, ids, n_decode=2)
    assert calls == [8] * 5 + [2, 1, 1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- Triton on CUDA

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(pt.triton is None or not torch.cuda.is_available(), reason="needs triton and CUDA")

GPU_SHAPES = [
    (1, 32, 8, 1, 65600, 65600, 128, 64, "max"),  # decode over a full 64K cache (split-K)
    (1, 32, 8, 4096, 65600, 65600, 128, 64, "max"),  # the benchmark's chunk over a full cache
    (1, 32, 8, 512, 1064, 2000, 128, 64, "max"),  # cache partly empty, not a multiple of the block
    (2, 24, 8, 77, 333, 400, 128, 3, "mean"),  # G = 3, odd L, B = 2
    (1, 8, 2, 130, 257, 300, 64, 5, "max"),  # D 64, G = 4
    (2, 4, 4, 1, 37, 64, 64, 0, "mean"),  # decode, G = 1
    (1, 32, 8, 300, 0, 16, 128, 0, "max"),  # first chunk: no cache
    (1, 32, 8, 2, 500, 600, 128, 64, "mean"),  # L = 2
]
# against a reference whose keys are rotated in fp32 and rounded once, as the kernels do
GPU_TOL = {torch.bfloat16: (2e-2, 2e-2, 2e-3), torch.float16: (2e-3, 1e-2, 2e-3)}
# against the engine's reference, whose bf16 RoPE rounds each product (up to ~2 ulp per key element)
GPU_TOL_ENGINE_ROPE = {torch.bfloat16: (4e-2, 4e-2, 2e-2), torch.float16: (4e-3, 2e-2, 4e-3)}


def check_engine_rope(got, want, tol) -> None:
    """`check` against the bf16/fp16-RoPE reference: its rounded keys move a handful of outputs (3 of 16.8M on an
    H200) just past `tol`, so up to 1e-5 of the outputs may sit between tol and 2·tol; none beyond."""
    (out, scores), (ref_out, ref_scores) = got, want
    atol, rtol, _ = tol
    err = (out.float() - ref_out.float()).abs()
    bound = atol + rtol * ref_out.float().abs()
    assert bool((err <= 2 * bound).all()), float((err / bound).max())
    assert int((err > bound).sum()) <= max(4, int(1e-5 * err.numel())), int((err > bound).sum())
    check((ref_out, scores), (ref_out, ref_scores), tol)  # scores: the usual tolerance


def fp32_rope_ref(x: dict):
    """`chunk_attention_paged_ref` with the keys rotated in fp32 and rounded once to the input dtype."""
    f = {name: x[name].float() for name in ("k_cache", "k_new", "cos", "sin")}
    k_all, v_all = materialise(f["k_cache"], x["v_cache"], x["order"], f["k_new"], x["v_new"], f["cos"], f["sin"])
    return chunk_attention_ref(x["q"], k_all.to(x["q"].dtype), v_all, x["scale"], x["ema"], x["n_sinks"],
                               x["head_reduce"])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(GPU_TOL), ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_matches_ref(shape, dtype):
    for temperature in (1.0, 4.0):  # flat and peaked softmax
        x = paged_inputs(shape, dtype, "cuda", temperature)
        for prerotate in (False, True):  # keys rotated in the kernels, or once into a scratch copy
            got = pt.chunk_attention_paged_triton(**x, prerotate=prerotate)
            check(got, fp32_rope_ref(x), GPU_TOL[dtype])
            check_engine_rope(got, chunk_attention_paged_ref(**x), GPU_TOL_ENGINE_ROPE[dtype])
        x["ema"] = None
        check(pt.chunk_attention_paged_triton(**x), fp32_rope_ref(x), GPU_TOL[dtype])


@gpu
@needs_cuda
@pytest.mark.parametrize("n_q", [1, 300])
def test_triton_engine_layout_dispatch_and_repeatability(n_q):
    """q and the chunk's k/v as the engine hands them ([B, L, H, D] memory transposed), int64 order on the
    device, cos/sin slices of a longer table; the dispatcher takes the kernels; two runs agree bit for bit."""
    torch.manual_seed(n_q)
    b, hq, hkv, d, cap, n_past = 1, 32, 8, 128, 6000, 5000
    dt, dev = torch.bfloat16, "cuda"
    q = torch.randn(b, n_q, hq, d, device=dev, dtype=dt).transpose(1, 2)
    k_new = torch.randn(b, n_q, hkv, d, device=dev, dtype=dt).transpose(1, 2)
    v_new = torch.randn(b, n_q, hkv, d, device=dev, dtype=dt).transpose(1, 2)
    k_cache, v_cache = (torch.randn(b, hkv, cap, d, device=dev, dtype=dt) for _ in range(2))
    order = torch.randperm(cap, device=dev)[:n_past]
    cos, sin = rotary(n_past + n_q + 100, d, dt, dev)
    args = (q, k_cache, v_cache, order, k_new, v_new, cos[: n_past + n_q], sin[: n_past + n_q], d**-0.5,
            ema_weights(n_q, 0.9999, dev), 64, "max")
    assert pa.paged_supported(q, k_cache)
    out1, s1 = chunk_attention_paged(*args)
    out2, s2 = pt.chunk_attention_paged_triton(*args)
    assert torch.equal(out1, out2) and torch.equal(s1, s2)
    check_engine_rope((out1, s1), chunk_attention_paged_ref(*args), GPU_TOL_ENGINE_ROPE[dt])


@gpu
@needs_cuda
@pytest.mark.parametrize(("n_q", "prerotate"), [(1, None), (256, False), (256, True)])
def test_triton_no_host_sync(n_q, prerotate):
    x = paged_inputs((1, 32, 8, n_q, 20000, 20000, 128, 64, "max"), torch.bfloat16, "cuda")
    pt.chunk_attention_paged_triton(**x, prerotate=prerotate)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, scores = pt.chunk_attention_paged_triton(**x, prerotate=prerotate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scores.shape == (1, 8, 20000 + n_q - 64)


@gpu
@needs_cuda
@pytest.mark.parametrize("config", ENGINE_CONFIGS, ids=lambda c: c.policy)
def test_engine_on_cuda_checks_every_call(monkeypatch, config):
    """A bf16 model on CUDA through the engine: every attention call's fused result against the reference on
    the same inputs (the reference's result is passed on, so both runs keep the same cache)."""
    calls = []

    def checked(*args):
        assert pa.paged_supported(args[0], args[1])
        want = chunk_attention_paged_ref(*args)
        check_engine_rope(pt.chunk_attention_paged_triton(*args), want, GPU_TOL_ENGINE_ROPE[torch.bfloat16])
        calls.append(args[0].shape[2])
        return want

    model = tiny_model("llama", head_dim=64).to("cuda", torch.bfloat16)
    monkeypatch.setattr(attention, "chunk_attention_paged", checked)
    _run(model, config, _ids(90))
    assert 1 in calls and 8 in calls

