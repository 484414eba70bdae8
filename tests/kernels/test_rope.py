"""`rotate_queries` (kernels/rope.py): the one-kernel RoPE of a chunk's queries against `apply_rope`.

On the CPU the dispatcher is `apply_rope` itself, and the Triton kernel runs in Triton's interpreter (skipped
where triton is not installed, as in CI). On CUDA: `python -m pytest -m gpu tests/kernels/test_rope.py`."""
from __future__ import annotations

import pytest
import torch

import cascade_kernels.rope as rope
from cascade_kernels import dispatch
from cascade_kernels.rope import apply_rope, rotate_queries
from tests.kernels.interpreter import interpreted


def tables(n: int, d: int, dtype=torch.float32, device="cpu", base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def queries(b, h, t, d, dtype=torch.float32, device="cpu", transposed=True):
    """As the engine hands them: [B, T, H, D] in memory, viewed as [B, H, T, D]."""
    x = torch.randn(b, t, h, d) if transposed else torch.randn(b, h, t, d)
    x = x.to(device, dtype)
    return x.transpose(1, 2) if transposed else x


def test_cpu_dispatch_is_apply_rope():
    torch.manual_seed(0)
    x = queries(1, 4, 9, 64)
    cos, sin = tables(30, 64)
    assert torch.equal(rotate_queries(x, cos[21:], sin[21:]), apply_rope(x, cos[21:], sin[21:]))


# (B, H, T, D, first position, transposed)
SHAPES = [(1, 4, 1, 64, 100, True), (2, 3, 70, 32, 5, True), (1, 2, 64, 128, 0, False), (1, 1, 129, 16, 7, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_interpreted_kernel_matches_apply_rope(monkeypatch, shape):
    b, h, t, d, p, transposed = shape
    torch.manual_seed(t)
    x = queries(b, h, t, d, transposed=transposed)
    cos, sin = tables(p + t + 3, d)
    run = lambda m: m.rope_triton(x, cos[p : p + t], sin[p : p + t])  # noqa: E731
    interp = interpreted(monkeypatch, "rope", run)
    got = run(interp)
    assert got.is_contiguous() and got.shape == x.shape
    torch.testing.assert_close(got, apply_rope(x, cos[p : p + t], sin[p : p + t]), atol=1e-6, rtol=1e-6)


gpu = pytest.mark.gpu
needs_triton = pytest.mark.skipif(rope.triton is None or not torch.cuda.is_available(),
                                  reason="needs triton and a CUDA device")


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 32, 4096, 128, 65600, True)], ids=str)
def test_triton_rounds_once(shape, dtype):
    """The kernel rotates in fp32 and rounds once: within an ulp of the fp32 rotation of the same 16-bit inputs,
    and never further from it than torch's 16-bit `apply_rope`, which rounds after every product."""
    b, h, t, d, p, transposed = shape
    torch.manual_seed(t)
    x = queries(b, h, t, d, dtype, "cuda", transposed)
    cos, sin = tables(p + t, d, dtype, "cuda")
    got = rope.rope_triton(x, cos[p:], sin[p:])
    want = apply_rope(x.float(), cos[p:].float(), sin[p:].float())
    err = (got.float() - want).abs()
    assert (err <= torch.finfo(dtype).eps * want.abs() + 1e-5).all()  # an ulp is eps/2 to eps of |x|
    assert err.max() <= (apply_rope(x, cos[p:], sin[p:]).float() - want).abs().max() + 1e-6  # ties: fp32 noise


@gpu
@needs_triton
def test_dispatcher_choices(monkeypatch):
    """CUDA, 16-bit, head dim 32-256: the kernel; head dim 16, fp32 or CASCADECTL_KERNELS=ref: `apply_rope`."""
    cos, sin = tables(40, 128, torch.bfloat16, "cuda")
    x = queries(1, 8, 40, 128, torch.bfloat16, "cuda")
    assert torch.equal(rotate_queries(x, cos, sin), rope.rope_triton(x, cos, sin))
    for args in ((x.float(), cos.float(), sin.float()), (x[..., :16], cos[:, :16], sin[:, :16])):
        assert torch.equal(rotate_queries(*args), apply_rope(*args))
    with dispatch.use_reference():  # what CASCADECTL_KERNELS=ref asks for
        assert torch.equal(rotate_queries(x, cos, sin), apply_rope(x, cos, sin))
