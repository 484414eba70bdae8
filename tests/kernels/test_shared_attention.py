"""shared_prefix_attention: the stacked form against its definition, and the definition against plain full attention.

The CPU tests run in CI; the CUDA test (16-bit products accumulated in float32) runs with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

from cascade_kernels.chunk_attention import chunk_attention_ref
from cascade_kernels.shared_attention import BLOCK, shared_prefix_attention, shared_prefix_attention_ref

# (B, Hq, Hkv, L, P, T, D, lengths)
SHAPES = [
    (1, 4, 4, 1, 1, 1, 64, [1]),  # one prefix key, one tail key
    (3, 8, 2, 1, 100, 9, 64, [9, 1, 5]),  # decode: rows at different depths, G = 4
    (2, 9, 3, 5, 37, 12, 32, [12, 5]),  # a few queries per row, causal among themselves, G = 3
    (2, 6, 2, BLOCK + 3, 50, BLOCK + 10, 80, [BLOCK + 10, BLOCK + 3]),  # two query blocks; D not a power of two
]


def _inputs(b, hq, hkv, n_q, n_doc, n_tail, d, lengths, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    tail_len = torch.tensor(lengths, device=device)
    return r(b, hq, n_q, d), r(1, hkv, n_doc, d), r(1, hkv, n_doc, d), r(b, hkv, n_tail, d), r(b, hkv, n_tail, d), \
        tail_len


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("capped", [None, (30.0, None), (None, 7)], ids=["plain", "softcap", "window"])
def test_stacked_equals_definition(shape, masked, capped):
    b, hq, hkv, n_q, n_doc, n_tail, d, lengths = shape
    q, kd, vd, kt, vt, tail_len = _inputs(*shape)
    visible = None
    if masked:
        visible = torch.rand(b, n_doc, generator=torch.Generator().manual_seed(1)) > 0.3
        visible[:, 0] = True
    softcap, window = capped or (None, None)
    want = shared_prefix_attention_ref(q, kd, vd, visible, kt, vt, tail_len, 0.125, softcap, window)
    got = shared_prefix_attention(q, kd, vd, visible, kt, vt, tail_len, 0.125, softcap, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_tail_keys_past_the_length_do_not_matter():
    q, kd, vd, kt, vt, tail_len = _inputs(*SHAPES[1])
    before = shared_prefix_attention(q, kd, vd, None, kt, vt, tail_len, 0.125)
    for r, n in enumerate(tail_len.tolist()):
        kt[r, :, n:] = 1e4  # finite: a hidden key's weight is an exact 0 in the product
        vt[r, :, n:] = -1e4
    torch.testing.assert_close(shared_prefix_attention(q, kd, vd, None, kt, vt, tail_len, 0.125), before)


@pytest.mark.parametrize("window", [None, 6])
def test_definition_is_full_causal_attention_over_prefix_and_tail(window):
    """A row with every prefix key visible is one chunk over [prefix | its tail] (chunk_attention_ref)."""
    b, hq, hkv, n_q, n_doc, n_tail, d = 2, 8, 2, 4, 30, 11, 64
    q, kd, vd, kt, vt, tail_len = _inputs(b, hq, hkv, n_q, n_doc, n_tail, d, [11, 7])
    got = shared_prefix_attention_ref(q, kd, vd, None, kt, vt, tail_len, 0.1, window=window)
    for r, n in enumerate(tail_len.tolist()):
        k = torch.cat([kd, kt[r : r + 1, :, :n]], dim=2)
        v = torch.cat([vd, vt[r : r + 1, :, :n]], dim=2)
        want, _ = chunk_attention_ref(q[r : r + 1], k, v, 0.1, window=window)
        torch.testing.assert_close(got[r : r + 1], want, atol=1e-5, rtol=1e-5)


def test_hidden_prefix_keys_are_as_if_absent():
    """A row that may not see prefix keys gets what it would get if they were not there (at the same positions)."""
    b, hq, hkv, n_q, n_doc, n_tail, d = 1, 4, 2, 2, 20, 5, 32
    q, kd, vd, kt, vt, tail_len = _inputs(b, hq, hkv, n_q, n_doc, n_tail, d, [5])
    visible = torch.ones(1, n_doc, dtype=torch.bool)
    visible[0, 3:9] = False
    got = shared_prefix_attention(q, kd, vd, visible, kt, vt, tail_len, 0.2)
    kd2, vd2 = kd.clone(), vd.clone()
    kd2[:, :, 3:9] = 100.0  # what is hidden cannot matter
    vd2[:, :, 3:9] = 1e4
    torch.testing.assert_close(shared_prefix_attention(q, kd2, vd2, visible, kt, vt, tail_len, 0.2), got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_cuda_16bit_against_float32_definition(shape, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, kd, vd, kt, vt, tail_len = _inputs(*shape, dtype=dtype, device="cuda")
    want = shared_prefix_attention_ref(q.float(), kd.float(), vd.float(), None, kt.float(), vt.float(), tail_len,
                                       0.125)
    got = shared_prefix_attention(q, kd, vd, None, kt, vt, tail_len, 0.125)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("common", [1.0, 0.6])
def test_common_prefix_by_log_sum_exp_merged_with_the_rest_equals_definition(shape, common):
    """The CUDA route (`merge_with_rest`), its prefix op replaced by its float32 reference: the first n_common
    prefix keys seen by every row, the rest by some rows (an evidence store's shares)."""
    from cascade_kernels.shared_attention import fold_rows, merge_with_rest, prefix_attention_lse_ref

    b, n_doc = shape[0], shape[4]
    q, kd, vd, kt, vt, tail_len = _inputs(*shape)
    n_common = max(1, int(n_doc * common))
    visible = None
    if n_common < n_doc:
        visible = torch.ones(b, n_doc, dtype=torch.bool)
        visible[:, n_common:] = torch.rand(b, n_doc - n_common, generator=torch.Generator().manual_seed(2)) > 0.5
    out, lse = prefix_attention_lse_ref(fold_rows(q, kd.shape[1]), kd[:, :, :n_common], vd[:, :, :n_common], 0.125)
    x_visible = None if visible is None else visible[:, n_common:]
    got = merge_with_rest(q, out, lse, kd[:, :, n_common:], vd[:, :, n_common:], x_visible, kt, vt, tail_len, 0.125)
    want = shared_prefix_attention_ref(q, kd, vd, visible, kt, vt, tail_len, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_window_reads_the_prefix_positions():
    """A permuted prefix with its positions given attends as the unpermuted one (a window that cuts)."""
    b, hq, hkv, n_q, n_doc, n_tail, d = 2, 4, 2, 3, 40, 6, 32
    q, kd, vd, kt, vt, tail_len = _inputs(b, hq, hkv, n_q, n_doc, n_tail, d, [6, 3])
    perm = torch.randperm(n_doc, generator=torch.Generator().manual_seed(3))
    want = shared_prefix_attention(q, kd, vd, None, kt, vt, tail_len, 0.125, window=20)
    for fn in (shared_prefix_attention, shared_prefix_attention_ref):
        got = fn(q, kd[:, :, perm], vd[:, :, perm], None, kt, vt, tail_len, 0.125, window=20, doc_pos=perm)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("common", [1.0, 0.6])
def test_cuda_flash_route_equals_its_reference(shape, common):
    """torch's flash op returns what `prefix_attention_lse_ref` does (natural-log lse), and the whole CUDA route
    (common prefix in flash, the rest masked per row) is within 16-bit rounding of the float32 definition."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from cascade_kernels.dispatch import shared_prefix_path
    from cascade_kernels.shared_attention import fold_rows, prefix_attention_lse_ref, prefix_flash

    q, kd, vd, kt, vt, tail_len = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    assert shared_prefix_path(q, kd, kt.shape[2], None, None) == "flash"
    qf = fold_rows(q, kd.shape[1])
    out, lse = prefix_flash(qf, kd, vd, 0.125)
    ref_out, ref_lse = prefix_attention_lse_ref(qf, kd, vd, 0.125)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    b, n_doc = shape[0], shape[4]
    n_common = max(1, int(n_doc * common))
    visible = torch.ones(b, n_doc, dtype=torch.bool, device="cuda")
    visible[:, n_common:] = torch.rand(b, n_doc - n_common, device="cuda") > 0.5
    got = shared_prefix_attention(q, kd, vd, visible, kt, vt, tail_len, 0.125, n_common=n_common)
    want = shared_prefix_attention_ref(q.float(), kd.float(), vd.float(), visible, kt.float(), vt.float(), tail_len,
                                       0.125)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_flash_route_equals_definition(shape, dtype):
    """On the CPU the common prefix goes to torch's CPU flash kernel (natural-log lse), with evidence masks on the
    rest of the prefix."""
    from cascade_kernels.dispatch import shared_prefix_path
    from cascade_kernels.shared_attention import fold_rows, prefix_attention_lse_ref, prefix_flash

    q, kd, vd, kt, vt, tail_len = _inputs(*shape, dtype=dtype)
    assert shared_prefix_path(q, kd, kt.shape[2], None, None) == "flash"
    qf = fold_rows(q, kd.shape[1])
    out, lse = prefix_flash(qf, kd, vd, 0.125)
    ref_out, ref_lse = prefix_attention_lse_ref(qf, kd, vd, 0.125)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, **tol)
    b, n_doc = shape[0], shape[4]
    n_common = max(1, int(n_doc * 0.6))
    visible = torch.ones(b, n_doc, dtype=torch.bool)
    visible[:, n_common:] = torch.rand(b, n_doc - n_common, generator=torch.Generator().manual_seed(4)) > 0.5
    got = shared_prefix_attention(q, kd, vd, visible, kt, vt, tail_len, 0.125, n_common=n_common)
    want = shared_prefix_attention_ref(q.float(), kd.float(), vd.float(), visible, kt.float(), vt.float(), tail_len,
                                       0.125)
    torch.testing.assert_close(got.float(), want, **(dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else tol))
