"""push_token: a decoded token's chain of pushes through the cascade's rings, in one kernel.

The Triton kernel must equal `push_token_ref` exactly (it only moves data). The reference itself is checked
against the per-token cascading rule through the engine (tests/engine/test_cascade_rule.py: chunks of one token
take this path). Chains cover pushes through every ring, a place into a ring with room, a compete won, lost and
tied per head, and a compete straight away; slots are given as int32 and int64; the new token's score is a
strided column view, as the engine passes it. A chain padded with SKIP codes and a stream index given as a [1]
tensor (what a decode step captured in a CUDA graph passes, engine/cache/fixed_step.py) move exactly what the
unpadded chain with an int index moves.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import cascade_kernels._triton as kt
from cascade_kernels import dispatch
from cascade_kernels.cache_push import SKIP, push_token, push_token_ref
from tests.kernels.interpreter import interpreted

B, HKV, SINKS, WIDTH, RINGS = 2, 3, 3, 5, 3
CAPACITY = SINKS + WIDTH * RINGS


def _slot(ring: int, k: int) -> int:
    return SINKS + ring * WIDTH + k


# (name, chain codes): >= 0 take the slot and carry its occupant on; < 0 compete for slot -code-1
CHAINS = [
    ("place", [_slot(0, 2)]),
    ("push-push-compete", [_slot(0, 1), _slot(1, 4), -_slot(2, 0) - 1]),
    ("push-through-all", [_slot(0, 0), _slot(1, 0), _slot(2, 3)]),
    ("compete-first", [-_slot(0, 4) - 1]),
    ("push-place", [_slot(0, 3), _slot(1, 2)]),
]


def inputs(name: str, d: int, dtype: torch.dtype, device="cpu", index_dtype=torch.int64) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{d}{dtype}".encode()))

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    chain = dict(CHAINS)[name]
    score = torch.rand(B, HKV, WIDTH * RINGS, generator=gen)
    step_scores = torch.rand(B, HKV, 7, generator=gen)  # the engine passes one column of the step's scores
    # ties and clear wins/losses per head for the compete: carried scores are the pushed occupants' (or new's)
    if chain[-1] < 0:
        carried = step_scores[:, :, 4] if len(chain) == 1 else score[:, :, chain[-2] - SINKS]
        target = -chain[-1] - 1 - SINKS
        score[:, :, target] = carried + torch.tensor([0.0, 0.1, -0.1]).view(1, HKV)  # tie, loss, win
    return dict(k_buf=rand(B, HKV, CAPACITY, d), v_buf=rand(B, HKV, CAPACITY, d), score_buf=score.to(device),
                idx_buf=torch.randint(0, 10**6, (B, HKV, CAPACITY), generator=gen).to(device),
                k_new=rand(B, HKV, 1, d), v_new=rand(B, HKV, 1, d), s_new=step_scores.to(device)[:, :, 4],
                chain=torch.tensor(chain, dtype=index_dtype, device=device), t=2**33 + 5, n_sinks=SINKS)


def run(fn, x: dict) -> dict:
    x = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    fn(**x)
    return {k: x[k] for k in ("k_buf", "v_buf", "score_buf", "idx_buf")}


def assert_same(got: dict, want: dict) -> None:
    for name in want:
        assert torch.equal(got[name].cpu(), want[name].cpu()), name


def test_reference_moves_the_chain():
    """Spelled out on one chain: the new token lands in ring 0, ring 0's and ring 1's occupants move on, and the
    compete in ring 2 goes to the newcomer on a tie and a win, to the occupant on a loss."""
    x = inputs("push-push-compete", 64, torch.float32)
    got = run(push_token_ref, x)
    s0, s1, s2 = _slot(0, 1), _slot(1, 4), _slot(2, 0)
    assert torch.equal(got["k_buf"][:, :, s0], x["k_new"][:, :, 0])
    assert (got["idx_buf"][:, :, s0] == x["t"]).all()
    assert torch.equal(got["v_buf"][:, :, s1], x["v_buf"][:, :, s0])
    assert torch.equal(got["score_buf"][:, :, s1 - SINKS], x["score_buf"][:, :, s0 - SINKS])
    won = torch.tensor([True, False, True]).expand(B, HKV)
    want_k = torch.where(won[..., None], x["k_buf"][:, :, s1], x["k_buf"][:, :, s2])
    assert torch.equal(got["k_buf"][:, :, s2], want_k)
    assert torch.equal(got["idx_buf"][:, :, s2], torch.where(won, x["idx_buf"][:, :, s1], x["idx_buf"][:, :, s2]))
    untouched = [s for s in range(CAPACITY) if s not in (s0, s1, s2)]
    assert torch.equal(got["k_buf"][:, :, untouched], x["k_buf"][:, :, untouched])


def fixed_form(x: dict, pad: int = 2) -> dict:
    """The same push as a captured decode step passes it: the chain padded with SKIP, `t` a [1] int64 tensor."""
    skip = torch.full((pad,), SKIP, dtype=torch.int64, device=x["chain"].device)
    chain = torch.cat([x["chain"].long(), skip])
    return dict(x, chain=chain, t=torch.tensor([x["t"]], device=chain.device))


@pytest.mark.parametrize("name", [name for name, _ in CHAINS])
def test_reference_padded_chain_and_tensor_index_change_nothing(name):
    x = inputs(name, 64, torch.float32)
    assert_same(run(push_token_ref, fixed_form(x)), run(push_token_ref, x))


def test_reference_all_skip_chain_writes_nothing():
    x = inputs("place", 64, torch.float32)
    got = run(push_token_ref, dict(fixed_form(x, pad=3), chain=torch.full((3,), SKIP)))
    assert_same(got, {k: x[k] for k in got})


def test_dispatcher_on_cpu_is_the_reference():
    x = inputs("push-through-all", 128, torch.bfloat16)
    assert_same(run(push_token, x), run(push_token_ref, x))


@pytest.fixture
def interp(monkeypatch):
    x = inputs("place", 64, torch.float32)
    return interpreted(monkeypatch, "cache_push", lambda module: run(module.push_token_triton, x))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", [name for name, _ in CHAINS])
def test_interpreted_kernel_equals_reference(interp, name, d, dtype, index_dtype):
    x = inputs(name, d, dtype, index_dtype=index_dtype)
    assert_same(run(interp.push_token_triton, x), run(push_token_ref, x))


@pytest.mark.parametrize("name", [name for name, _ in CHAINS])
def test_interpreted_kernel_padded_chain_and_tensor_index(interp, name):
    x = inputs(name, 64, torch.float32)
    assert_same(run(interp.push_token_triton, fixed_form(x)), run(push_token_ref, x))
    skipped = dict(fixed_form(x, pad=3), chain=torch.full((3,), SKIP))
    got = run(interp.push_token_triton, skipped)
    assert_same(got, {k: x[k] for k in got})


needs_cuda = pytest.mark.skipif(kt.triton is None or not torch.cuda.is_available(), reason="needs triton and CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", [name for name, _ in CHAINS])
def test_cuda_kernel_equals_reference(name, d, dtype):
    x = inputs(name, d, dtype, device="cuda")
    assert_same(run(push_token, x), run(push_token_ref, x))
    assert_same(run(push_token, fixed_form(x)), run(push_token_ref, x))


@pytest.mark.gpu
@needs_cuda
def test_cuda_cache_decode_equals_the_reference_path():
    """The engine's cache on CUDA: a prefill, then 200 single-token steps, once through the kernel and once with
    CASCADECTL_KERNELS=ref (the torch reference); same random inputs, bitwise the same cache afterwards."""
    results = []
    for reference in (True, False):  # CASCADECTL_KERNELS=ref, then the kernel
        with dispatch.use_reference(reference):
            results.append(_cascade_decode())
    for got, want in zip(*results):
        assert torch.equal(got, want)


def _cascade_decode() -> list[torch.Tensor]:
    """Layer 0's buffers after a prefill and 200 single-token steps of a CUDA cascade on seeded random inputs."""
    from engine.cache.base import CacheShape
    from engine.cache.cascade import CascadeCache

    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = CascadeCache(CacheShape(1, 2, 4, 64, torch.bfloat16, torch.device("cuda")), 5, 48, 4, 0.99)
    for n in [30, 20, 1, 7] + [1] * 200:
        cache.begin(n)
        k, v = (torch.randn(2, 4, n, 64, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
        score = torch.rand(2, 4, cache.n_past - cache.n_sinks_filled + n, generator=gen, device="cuda")
        cache.update(0, k, v, score)
        cache.end()
    return [t.clone() for t in (cache.k[0], cache.v[0], cache.score[0], cache.idx[0])]
